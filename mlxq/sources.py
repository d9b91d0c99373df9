"""Conversion sources: a Hugging Face checkpoint (local folder or hub id, float
safetensors) or a GGUF file. Each gives ``config``, ``native`` (layers that arrive
quantized), ``read_weights()``, ``write_tokenizer(folder)`` and ``output_config()``."""

import shutil
from pathlib import Path

from .errors import MlxqError
from .model_config import validate_config
from .model_folder import check_model_folder, read_config, resolve_model_path
from .tokenizer_files import check_tokenizer_files

# Copied verbatim from an HF folder: transformers and mlx-lm read them as they are.
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


def open_source(spec):
    """The source ``spec`` names: a .gguf file, an HF folder, or a hub id."""
    from .gguf_import import is_gguf

    path = Path(str(spec)).expanduser()
    if path.is_file() and is_gguf(path):
        return GGUFSource(path)
    if path.is_file():
        raise MlxqError(f"{path} is a file but not a GGUF file; pass a model folder, hub id or .gguf")
    return HFSource(spec)


class GGUFSource:
    """A llama.cpp GGUF file: config and tokenizer from its metadata."""

    def __init__(self, path: Path):
        from .gguf_import import open_gguf

        self.path = path
        self.gguf = open_gguf(path)
        self.config = self.gguf.config
        validate_config(self.config, f"{path} (its metadata)")
        self.native = self.gguf.native

    def read_weights(self, progress=False):
        from .gguf_import import read_weights

        return read_weights(self.gguf, progress=progress)

    def write_tokenizer(self, out: Path) -> dict:
        from .tokenizer_build import write_tokenizer_files

        return write_tokenizer_files(
            self.gguf.meta, out, model_max_length=self.config.get("max_position_embeddings")
        )

    def output_config(self) -> dict:
        return dict(self.config)


class HFSource:
    """config.json + safetensors + tokenizer files of an HF folder or hub id."""

    def __init__(self, path_or_hub_id):
        self.folder = resolve_model_path(path_or_hub_id)
        self.path = self.folder
        self.config = read_config(self.folder)
        if "quantization" in self.config or "quantization_config" in self.config:
            raise MlxqError(f"{self.folder} is already quantized; convert a float checkpoint")
        self.native = {}  # nothing arrives pre-quantized
        # Validate every shard and tokenizer file up front, so a truncated download or a
        # broken file fails before any work.
        check_model_folder(self.folder)
        check_tokenizer_files(self.folder, self.config.get("vocab_size"))

    def read_weights(self, progress: bool = False) -> dict:
        from .safetensors_io import load_weights

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
