"""Model folders: where one is (a local folder, or a Hugging Face hub id downloaded into
the hub cache), its config.json, and the one check that a folder is complete."""

import json
import re
from pathlib import Path

from .errors import MlxqError
from .model_config import validate_config

# What a model folder needs from the hub: config, weights and tokenizer files.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_path(path_or_hub_id, allow_patterns=HUB_PATTERNS) -> Path:
    """A local path as is; ``owner/name`` that is not a local path via the HF hub."""
    path = Path(str(path_or_hub_id)).expanduser()
    if path.exists():
        return path
    spec = str(path_or_hub_id)
    if spec.lower().endswith(".gguf"):
        raise MlxqError(f"GGUF file {spec} does not exist")
    if not _HUB_ID.match(spec):
        raise MlxqError(f"model path {spec!r} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec, allow_patterns=allow_patterns))
    except Exception as e:  # network, auth, missing repo: all the user's to fix
        raise MlxqError(
            f"{spec!r} is not a local path and could not be downloaded from the "
            f"Hugging Face hub ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None


def read_config(folder: Path) -> dict:
    """config.json, with generation_config.json's eos ids merged in (as mlx-lm does),
    validated by ``model_config.validate_config``."""
    check_model_folder(folder, weights=False, tokenizer=False)
    config_file = folder / "config.json"
    config = read_json_object(config_file)
    gen_file = folder / "generation_config.json"
    if gen_file.exists():
        generation = read_json_object(gen_file)
        if generation.get("eos_token_id") is not None:
            config["eos_token_id"] = generation["eos_token_id"]
            where = f"{config_file} (with eos_token_id from {gen_file.name})"
        else:
            where = config_file
    else:
        where = config_file
    validate_config(config, where)
    return config


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object (a config or tokenizer settings file)."""
    try:
        data = json.loads(Path(path).read_bytes().decode("utf-8"))
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise MlxqError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise MlxqError(f"{path} is not a JSON object")
    return data


def check_model_folder(folder: Path, weights: bool = True, tokenizer: bool = True) -> None:
    """The one completeness check of a model folder: a folder with config.json and (when
    asked) valid safetensors weights and tokenizer files; else one clear MlxqError."""
    folder = Path(folder)
    if not folder.is_dir():
        hint = ""
        if folder.suffix.lower() == ".gguf":
            hint = f"; convert it first: python -m mlxq.convert --hf-path {folder}"
        raise MlxqError(f"{folder} is not a model folder{hint}")
    if not (folder / "config.json").is_file():
        raise MlxqError(f"{folder} has no config.json (not an mlx-lm / Hugging Face model folder)")
    if weights:
        from .safetensors_io import check_safetensors, weight_files

        for f in weight_files(folder):
            check_safetensors(f)
    if tokenizer and not any((folder / f).exists() for f in TOKENIZER_FILES):
        raise MlxqError(f"{folder} has no tokenizer files (tokenizer.json or tokenizer.model)")
