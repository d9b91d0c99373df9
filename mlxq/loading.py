"""``mlxq.load``: an mlx-lm model folder (or hub id) -> (model, tokenizer)."""

from pathlib import Path

import mlx.core as mx

from .backend import compute_dtype
from .errors import MlxqError
from .model_folder import check_model_folder, read_config, resolve_model_path
from .model_config import build_checked
from .models.quantization import quantization_from_config, quantize_for_weights
from .safetensors_io import load_weights
from .tokenizer_files import check_tokenizer_files
from .weight_check import check_weights


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
    model = build_checked(config, folder / "config.json")
    weights = model.sanitize(load_weights(folder))
    quant = quantization_from_config(config)
    if quant is not None:
        quantize_for_weights(model, quant, weights)
    weights = cast_floats(weights, dtype or compute_dtype())
    check_weights(model, weights, f"{folder} does not match its config.json")
    model.load_weights(list(weights.items()), strict=True)
    model.eval()
    mx.eval(model.parameters())
    return model


def _tokenizer_model_config(config: dict):
    """What transformers' AutoTokenizer reads of the model config: only its model_type.
    Handed over so that it does not load config.json itself through its per-architecture
    config classes, which reject valid models (e.g. hidden_size 256 with 12 heads of 128)."""
    from transformers import PretrainedConfig

    model_config = PretrainedConfig()
    model_config.model_type = str(config.get("model_type") or "")
    return model_config


def load_tokenizer(folder: Path, config: dict):
    """mlx-lm's TokenizerWrapper (streaming detokenizer, chat template, eos ids); offline."""
    from mlx_lm.tokenizer_utils import load as load_mlx_lm_tokenizer

    try:
        return load_mlx_lm_tokenizer(
            Path(folder), tokenizer_config_extra={"config": _tokenizer_model_config(config)},
            eos_token_ids=config.get("eos_token_id"))
    except Exception as e:  # transformers raises many types for broken tokenizer files
        raise MlxqError(f"cannot load the tokenizer in {folder}: {type(e).__name__}: {e}") from None


def load(path_or_hub_id):
    """Load ``(model, tokenizer)`` from an mlx-lm folder or a Hugging Face hub id."""
    folder = resolve_model_path(path_or_hub_id)
    config = read_config(folder)
    check_model_folder(folder)
    tokenizer = load_tokenizer(folder, config)
    check_tokenizer_files(folder, config.get("vocab_size"), tokenizer)
    model = load_model(folder, config)
    return model, tokenizer


def load_for_cli(spec: str | None):
    """``load`` for the command lines: ``None`` means the default model, and any load
    failure becomes a one-line MlxqError."""
    if spec is None:
        from .default_model import default_model_path

        spec = str(default_model_path())
    elif not spec.strip():
        raise MlxqError("--model is empty; give a model folder or hub id")
    elif not Path(spec).exists() and "/" not in spec:
        raise MlxqError(f"--model {spec}: no such file or folder")
    try:
        return load(spec)
    except MlxqError:
        raise
    except (OSError, ValueError) as e:
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise MlxqError(f"cannot load model {spec}: {first_line}") from None
