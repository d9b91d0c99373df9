"""The int4/int8 store's row layout, shared by the append kernel, the attention kernel and
the oracle.

One row per token per KV head, ROW = WK + WV + 2*NG uint32 words (WK = D*key_bits/32 and
WV = D*bits/32 code words, NG = D/group_size groups): ``[key codes WK | value codes WV | key
(scale, bias) NG | value (scale, bias) NG]``. Keys and values have the same bits unless a
config sets ``key_bits`` (keys carry most of the error: 8-bit keys with 4-bit values). Codes use MLX's affine packing (element 0 in the low bits); each
(scale, bias) pair is two float16 in one word (scale in the low half), so ``w = scale * code
+ bias`` exactly as ``mx.dequantize``. A token is one contiguous row: one slice update
writes it and the kernel reads it with one run of loads.

Key centering (``KVCacheConfig.key_center``): store rows come in blocks of CENTER_BLOCK
tokens; block ``c`` of keys is quantized minus a per-channel center ``centers[c]`` (D
float16, in the rotated basis) and read back as ``scale * code + bias + centers[c]``. A
block's rows are first written with the center the block started with (zero for block 0,
else the previous block's). When the block is complete and its float16 keys are at hand
(all still in the window, or in the chunk being appended), their mean becomes its center
and its rows are encoded again with it, before attention ever reads them (they are in the
window until then); the next block starts from that center. Without the float16 keys (a
window shorter than a block), the block keeps its center and the next block starts from
the block's mean as stored. Keys share a per-channel offset that moves along the sequence;
without centering it spends much of each group's int4 range. The centers cost 2 * D /
CENTER_BLOCK bytes per token per KV head (1 byte at d64: +0.4% of fp16). 128-row blocks
measured as good as 64-row ones at half the bytes (docs/quality.md).
"""

import mlx.core as mx

CENTER_BLOCK = 128  # store rows per key center (the attention kernel's template CENTER_BLOCK)


def code_words(head_dim: int, bits: int) -> int:
    return head_dim * bits // 32


def row_words(head_dim: int, bits: int, group_size: int, key_bits: int | None = None) -> int:
    """Words per row; ``bits`` are the values' (and the keys', unless ``key_bits``)."""
    return (code_words(head_dim, key_bits or bits) + code_words(head_dim, bits)
            + 2 * (head_dim // group_size))


def row_bytes(head_dim: int, bits: int, group_size: int, key_bits: int | None = None) -> int:
    """Bytes per token per KV head (keys and values)."""
    return 4 * row_words(head_dim, bits, group_size, key_bits)


def center_blocks(rows: int) -> int:
    """Centers that cover ``rows`` store rows."""
    return -(-rows // CENTER_BLOCK)


def held_centers(rows: int) -> int:
    """Centers a cache with ``rows`` store rows holds: one per completed block, and the
    one of the block its next row goes to (already chosen)."""
    return rows // CENTER_BLOCK + 1


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


def _row_contiguous(x):
    # A copy only when ``x`` is strided; unlike mx.contiguous, a graph with it can be
    # exported (the decode-step tracer exports the step that completes a key-center block).
    return x.reshape(-1).reshape(x.shape)


def unpack_rows(rows, head_dim: int, bits: int, group_size: int, key_bits: int | None = None):
    """rows (..., ROW) -> ((codes, scales, biases) of keys, same of values)."""
    WK, WV = code_words(head_dim, key_bits or bits), code_words(head_dim, bits)
    NG, W = head_dim // group_size, WK + WV

    def pairs(words):
        halves = _row_contiguous(words).view(mx.float16)
        return halves[..., 0::2], halves[..., 1::2]

    ks, kb = pairs(rows[..., W:W + NG])
    vs, vb = pairs(rows[..., W + NG:W + 2 * NG])
    return (rows[..., :WK], ks, kb), (rows[..., WK:W], vs, vb)


def dequantize_rows(rows, head_dim: int, bits: int, group_size: int, dtype=mx.float32,
                    key_bits: int | None = None):
    """rows (..., ROW) -> (keys, values) (..., D) in ``dtype``."""
    parts = unpack_rows(rows, head_dim, bits, group_size, key_bits)
    return tuple(mx.dequantize(_row_contiguous(c), s.astype(dtype), b.astype(dtype),
                               group_size=group_size, bits=nbits)
                 for (c, s, b), nbits in zip(parts, (key_bits or bits, bits)))


def add_key_centers(keys, centers, first_row: int):
    """keys (B, H, n, D) dequantized from store rows [first_row, first_row + n) plus their
    blocks' centers (``centers`` (B, H, blocks, D) float16, the cache's buffer)."""
    n = keys.shape[2]
    if n == 0:
        return keys
    c0, c1 = first_row // CENTER_BLOCK, center_blocks(first_row + n)
    per_row = mx.repeat(centers[:, :, c0:c1].astype(keys.dtype), CENTER_BLOCK, axis=2)
    skip = first_row - c0 * CENTER_BLOCK
    return keys + per_row[:, :, skip:skip + n]
