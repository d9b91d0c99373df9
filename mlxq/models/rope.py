"""Rotary position embeddings: plain, linear-scaled and Llama-3-scaled.

All variants rotate halves (the Hugging Face / mlx-lm layout, ``traditional=False``).
"""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import MlxqError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def llama3_inv_freq(dims: int, base: float, scaling: dict) -> np.ndarray:
    """Llama-3.1 inverse frequencies (float64): long wavelengths slowed by ``factor``,
    short ones kept, the band between blended smoothly."""
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
    inv_freq = 1.0 / base ** (np.arange(0, dims, 2, dtype=np.float64) / dims)
    wavelen = 2 * math.pi / inv_freq
    # smooth = 0 at the low-frequency edge (fully scaled), 1 at the high edge (unscaled).
    smooth = np.clip((old_ctx / wavelen - low) / (high - low), 0.0, 1.0)
    return inv_freq * (smooth + (1.0 - smooth) / factor)


class RoPE(nn.Module):
    """``mx.fast.rope`` with either a base or explicit per-pair frequencies."""

    def __init__(self, dims: int, base: float, scale: float = 1.0, inv_freq=None):
        super().__init__()
        self.dims = dims
        self.base = base
        self.scale = scale
        # mx.fast.rope takes periods (angle = position / freqs), i.e. 1 / inv_freq.
        # Stored with a leading underscore so it is not a parameter to load or save.
        self._freqs = None if inv_freq is None else mx.array(1.0 / inv_freq, dtype=mx.float32)

    def __call__(self, x, offset=0):
        return mx.fast.rope(
            x,
            self.dims,
            traditional=False,
            base=None if self._freqs is not None else self.base,
            scale=self.scale,
            offset=offset,
            freqs=self._freqs,
        )


def make_rope(head_dim: int, base: float, scaling: dict | None) -> RoPE:
    rope_type = "default"
    if scaling:
        rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type == "default":
        return RoPE(head_dim, base)
    if rope_type == "linear":
        # Positions are divided by the factor.
        return RoPE(head_dim, base, scale=1.0 / float(scaling["factor"]))
    if rope_type == "llama3":
        return RoPE(head_dim, base, inv_freq=llama3_inv_freq(head_dim, base, scaling))
    raise MlxqError(
        f"unsupported rope_scaling type {rope_type!r}; supported: "
        + ", ".join(SUPPORTED_ROPE_TYPES)
    )
