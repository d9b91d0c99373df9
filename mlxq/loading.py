"""``mlxq.load``: an mlx-lm model folder (or hub id) -> (model, tokenizer)."""

import json
import re
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from .backend import compute_dtype
from .errors import MlxqError
from .models import build_model
from .models.quantization import quantization_from_config, quantize_for_weights
from .safetensors_io import load_weights

# What a model folder needs from the hub: config, weights and tokenizer files.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_path(path_or_hub_id, allow_patterns=HUB_PATTERNS) -> Path:
    """A local folder as is; ``owner/name`` that is not a local path via the HF hub."""
    path = Path(str(path_or_hub_id)).expanduser()
    if path.exists():
        return path
    spec = str(path_or_hub_id)
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
    """config.json, with generation_config.json's eos ids merged in (as mlx-lm does)."""
    if not folder.is_dir():
        raise MlxqError(f"{folder} is not a model folder")
    config_file = folder / "config.json"
    if not config_file.exists():
        raise MlxqError(f"{folder} has no config.json (not an mlx-lm / Hugging Face model folder)")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise MlxqError(f"cannot read {config_file}: {e}") from None
    if not isinstance(config, dict):
        raise MlxqError(f"{config_file} is not a JSON object")
    gen_file = folder / "generation_config.json"
    if gen_file.exists():
        try:
            eos = json.loads(gen_file.read_text()).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            eos = None
        if eos:
            config["eos_token_id"] = eos
    return config


def cast_floats(weights: dict, dtype) -> dict:
    """Floating tensors (norms, scales, biases, float weights) to ``dtype``; packed ints kept."""
    return {
        k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v
        for k, v in weights.items()
    }


def load_model(folder: Path, config: dict | None = None, dtype=None):
    """The model of an mlx-lm folder with its floating parameters in ``dtype``
    (default: the backend's compute dtype)."""
    config = config if config is not None else read_config(folder)
    model = build_model(config)
    weights = model.sanitize(load_weights(folder))
    quant = quantization_from_config(config)
    if quant is not None:
        quantize_for_weights(model, quant, weights)
    weights = cast_floats(weights, dtype or compute_dtype())
    expected = {k for k, _ in tree_flatten(model.parameters())}
    missing = sorted(expected - weights.keys())
    extra = sorted(weights.keys() - expected)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing weights {_names(missing)}")
        if extra:
            parts.append(f"unexpected weights {_names(extra)}")
        raise MlxqError(f"{folder} does not match its config.json: " + "; ".join(parts))
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:  # shape mismatches
        raise MlxqError(f"{folder}: weights do not fit the model: {e}") from None
    model.eval()
    mx.eval(model.parameters())
    return model


def _names(names, limit=4):
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def load_tokenizer(folder: Path, config: dict):
    """mlx-lm's TokenizerWrapper (streaming detokenizer, chat template, eos ids); offline."""
    if not any((folder / f).exists() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise MlxqError(f"{folder} has no tokenizer files (tokenizer.json or tokenizer.model)")
    from mlx_lm.tokenizer_utils import load as load_mlx_lm_tokenizer

    try:
        return load_mlx_lm_tokenizer(folder, eos_token_ids=config.get("eos_token_id"))
    except Exception as e:  # transformers raises many types for broken tokenizer files
        raise MlxqError(f"cannot load the tokenizer in {folder}: {type(e).__name__}: {e}") from None


def load(path_or_hub_id):
    """Load ``(model, tokenizer)`` from an mlx-lm folder or a Hugging Face hub id."""
    folder = resolve_model_path(path_or_hub_id)
    config = read_config(folder)
    model = load_model(folder, config)
    tokenizer = load_tokenizer(folder, config)
    return model, tokenizer


def load_for_cli(spec: str | None):
    """``load`` for the command lines: ``None`` means the default model, and any load
    failure becomes a one-line MlxqError."""
    if spec is None:
        from .default_model import default_model_path

        spec = str(default_model_path())
    elif not Path(spec).exists() and "/" not in spec:
        raise MlxqError(f"--model {spec}: no such file or folder")
    try:
        return load(spec)
    except MlxqError:
        raise
    except (OSError, ValueError) as e:
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise MlxqError(f"cannot load model {spec}: {first_line}") from None
