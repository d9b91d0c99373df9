"""A Hugging Face checkpoint folder (float safetensors) as a conversion source."""

import shutil
from pathlib import Path

from .errors import MlxqError
from .loading import read_config, resolve_model_path
from .safetensors_io import check_safetensors, load_weights, weight_files

HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja", "*.tiktoken"]
# Copied verbatim: transformers and mlx-lm read them as they are.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


class HFSource:
    """config.json + safetensors + tokenizer files of an HF folder or hub id."""

    def __init__(self, path_or_hub_id):
        self.folder = resolve_model_path(path_or_hub_id, allow_patterns=HUB_PATTERNS)
        self.config = read_config(self.folder)
        if "quantization" in self.config or "quantization_config" in self.config:
            raise MlxqError(f"{self.folder} is already quantized; convert a float checkpoint")
        self.native = {}  # nothing arrives pre-quantized
        if not any((self.folder / f).exists() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
            raise MlxqError(f"{self.folder} has no tokenizer files (tokenizer.json or tokenizer.model)")
        # Validate every shard up front, so a truncated download fails before any work.
        self.files = weight_files(self.folder)
        for f in self.files:
            check_safetensors(f)

    def read_weights(self, progress: bool = False) -> dict:
        return load_weights(self.folder)

    def write_tokenizer(self, out: Path) -> dict:
        for name in TOKENIZER_FILES:
            if (self.folder / name).exists():
                shutil.copyfile(self.folder / name, out / name)
        return {}

    def output_config(self) -> dict:
        config = dict(self.config)
        config.pop("_name_or_path", None)
        return config

