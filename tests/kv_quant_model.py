"""An independent model of the store's group quantizer (kv_layout's docstring), in numpy:
what the oracle (``kv_layout.quantize_groups``) and the kernels are checked against.

8-bit groups: mx.quantize's rule, (scale, bias) float16. 4-bit groups: the same rule on
the range widened to contain 0, the scale's float16 cut to 6 mantissa bits (rounded to
nearest, never zero) and a zero point z = -q0 in [0, 15]: one uint16 per group, the
scale's bits | z, read back as w = scale * (code - z)."""

import numpy as np


def quantize(x, bits: int, group_size: int):
    """x (..., D) -> (codes (..., D) uint32 unpacked, meta (..., NG, halves) uint16,
    dequantized (..., D) float32)."""
    x = np.asarray(x, np.float32)
    g = x.reshape(*x.shape[:-1], -1, group_size)
    lo, hi = g.min(-1, keepdims=True), g.max(-1, keepdims=True)
    n_bins = np.float32(2 ** bits - 1)
    if bits == 4:
        lo, hi = np.minimum(lo, np.float32(0)), np.maximum(hi, np.float32(0))
    neg_edge = np.abs(lo) > np.abs(hi)
    scale = np.maximum((hi - lo) / n_bins, np.float32(1e-7)).astype(np.float32)
    scale = np.where(neg_edge, scale, -scale)
    edge = np.where(neg_edge, lo, hi)
    q0 = np.rint(edge / scale)
    nonzero = q0 != 0
    scale = np.where(nonzero, edge / np.where(nonzero, q0, 1), scale).astype(np.float32)
    if bits == 4:
        h = scale.astype(np.float16).view(np.uint16).astype(np.uint32)
        h6 = (h + 8) & 0xFFF0
        h6 = np.where((h6 & 0x7FFF) == 0, (h & 0x8000) | 0x10, h6)
        s = h6.astype(np.uint16).view(np.float16).astype(np.float32)
        bias = (q0 * s).astype(np.float32)
        codes = np.clip(np.rint((g - bias) / s), 0, n_bins)
        meta = (h6 | (-q0).astype(np.uint32)).astype(np.uint16)
        deq = codes * s + bias
    else:
        bias = np.where(nonzero, edge, 0).astype(np.float32)
        codes = np.clip(np.rint((g - bias) / scale), 0, n_bins)
        s16, b16 = scale.astype(np.float16), bias.astype(np.float16)
        meta = np.concatenate([s16.view(np.uint16), b16.view(np.uint16)], axis=-1)
        deq = codes * s16.astype(np.float32) + b16.astype(np.float32)
    return (codes.astype(np.uint32).reshape(x.shape), meta,
            deq.astype(np.float32).reshape(x.shape))


def pack_codes(codes, bits: int):
    """Unpacked codes (..., D) -> MLX's packing (..., D*bits/32) uint32, element 0 low."""
    per = 32 // bits
    c = codes.reshape(*codes.shape[:-1], -1, per).astype(np.uint64)
    return (c << (np.arange(per, dtype=np.uint64) * bits)).sum(-1).astype(np.uint32)
