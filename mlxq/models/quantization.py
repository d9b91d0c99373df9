"""Quantized layers from config.json's ``quantization`` section (mlx-lm format).

``{"group_size": 64, "bits": 4, "model.embed_tokens": {"group_size": 32, "bits": 8}}``:
top-level defaults plus per-layer overrides keyed by module path. A layer is quantized
when its weights carry ``.scales``; its bits/group come from the override, else from the
tensor shapes (as mlx-lm does), so a folder mixing formats loads either way.
"""

import mlx.nn as nn

from ..errors import MlxqError


def quantization_from_config(config: dict) -> dict | None:
    """The mlx-lm quantization dict of a config, or None for a float model."""
    quant = config.get("quantization")
    if quant is None:
        qc = config.get("quantization_config")
        if isinstance(qc, dict) and "bits" in qc and "group_size" in qc:
            quant = qc
        elif isinstance(qc, dict):
            method = qc.get("quant_method", "unknown")
            raise MlxqError(
                f"quantization method {method!r} is not supported; convert the float "
                "checkpoint with `python -m mlxq.convert` instead"
            )
    if quant is not None and not (isinstance(quant, dict) and "bits" in quant and "group_size" in quant):
        raise MlxqError("config.json 'quantization' needs 'bits' and 'group_size'")
    return quant


def _layer_params(path: str, module, quant: dict, weights: dict):
    """Bits/group for one layer of a checkpoint, or False to keep it in floating point."""
    if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
        return False
    override = quant.get(path)
    if isinstance(override, dict):
        return {k: override[k] for k in ("group_size", "bits", "mode") if k in override}
    if override is False:
        return False
    in_dims = module.weight.shape[-1]
    n_groups = weights[f"{path}.scales"].shape[-1]
    packed = weights[f"{path}.weight"].shape[-1]
    params = {"group_size": in_dims // n_groups, "bits": packed * 32 // in_dims}
    if "mode" in quant:
        params["mode"] = quant["mode"]
    return params


def quantize_for_weights(model: nn.Module, quant: dict, weights: dict) -> None:
    """Swap in quantized layers so that ``weights`` (a checkpoint) can be loaded."""
    nn.quantize(
        model,
        group_size=quant["group_size"],
        bits=quant["bits"],
        mode=quant.get("mode", "affine"),
        class_predicate=lambda p, m: _layer_params(p, m, quant, weights),
    )


def quantizable_layers(model: nn.Module):
    """(path, module) of every Linear / Embedding, in model order (embedding first)."""
    # named_modules() lists children last-first; reverse it for messages that read naturally.
    return [
        (path, m)
        for path, m in reversed(model.named_modules())
        if isinstance(m, (nn.Linear, nn.Embedding))
    ]
