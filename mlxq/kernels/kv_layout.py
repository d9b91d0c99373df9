"""The int4/int8 store's row layout, shared by the append kernel, the attention kernel and
the oracle.

One row per token per KV head, ROW = 2*W + 2*NG uint32 words (W = D*bits/32 code words,
NG = D/group_size groups): ``[key codes W | value codes W | key (scale, bias) NG | value
(scale, bias) NG]``. Codes use MLX's affine packing (element 0 in the low bits); each
(scale, bias) pair is two float16 in one word (scale in the low half), so ``w = scale * code
+ bias`` exactly as ``mx.dequantize``. A token is one contiguous row: one slice update
writes it and the kernel reads it with one run of loads.
"""

import mlx.core as mx


def code_words(head_dim: int, bits: int) -> int:
    return head_dim * bits // 32


def row_words(head_dim: int, bits: int, group_size: int) -> int:
    return 2 * code_words(head_dim, bits) + 2 * (head_dim // group_size)


def row_bytes(head_dim: int, bits: int, group_size: int) -> int:
    """Bytes per token per KV head (keys and values)."""
    return 4 * row_words(head_dim, bits, group_size)


def fp16_bytes(batch: int, heads: int, tokens: int, key_dim: int, value_dim: int) -> int:
    """Bytes of float16 keys and values of that shape (the baseline of every bytes ratio)."""
    return batch * heads * tokens * (key_dim + value_dim) * 2


def _pair_words(scales, biases):
    # (..., NG) float16 twice -> (..., NG) uint32 with the scale in the low half.
    pairs = mx.stack([scales.astype(mx.float16), biases.astype(mx.float16)], axis=-1)
    return pairs.reshape(*scales.shape[:-1], 2 * scales.shape[-1]).view(mx.uint32)


def pack_rows(key_parts, value_parts):
    """(codes, scales, biases) of keys and of values (as ``mx.quantize`` returns them,
    shapes (..., W) and (..., NG)) -> rows (..., ROW) uint32."""
    (kc, ks, kb), (vc, vs, vb) = key_parts, value_parts
    return mx.concatenate([kc, vc, _pair_words(ks, kb), _pair_words(vs, vb)], axis=-1)


def unpack_rows(rows, head_dim: int, bits: int, group_size: int):
    """rows (..., ROW) -> ((codes, scales, biases) of keys, same of values)."""
    W, NG = code_words(head_dim, bits), head_dim // group_size

    def pairs(words):
        halves = mx.contiguous(words).view(mx.float16)
        return halves[..., 0::2], halves[..., 1::2]

    ks, kb = pairs(rows[..., 2 * W:2 * W + NG])
    vs, vb = pairs(rows[..., 2 * W + NG:2 * W + 2 * NG])
    return (rows[..., :W], ks, kb), (rows[..., W:2 * W], vs, vb)


def dequantize_rows(rows, head_dim: int, bits: int, group_size: int, dtype=mx.float32):
    """rows (..., ROW) -> (keys, values) (..., D) in ``dtype``."""
    parts = unpack_rows(rows, head_dim, bits, group_size)
    return tuple(mx.dequantize(mx.contiguous(c), s.astype(dtype), b.astype(dtype),
                               group_size=group_size, bits=bits) for c, s, b in parts)
