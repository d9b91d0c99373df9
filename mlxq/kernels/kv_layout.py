"""The int4/int8 store's row layout, shared by the append kernel, the attention kernel and
the oracle.

One row per token per KV head, ROW = WK + WV + MW uint32 words (WK = D*key_bits/32 and
WV = D*bits/32 code words, NG = D/group_size groups): ``[key codes WK | value codes WV |
metadata MW]``. Keys and values have the same bits unless a config sets ``key_bits`` (keys
carry most of the error: 8-bit keys with 4-bit values). Codes use MLX's affine packing
(element 0 in the low bits). The metadata is a run of uint16 halves, the keys' NG groups
then the values' NG groups, padded to a whole word (little-endian: half 2i is word i's low
half):

- an 8-bit group takes two halves, its float16 (scale, bias): ``w = scale * code + bias``
  exactly as ``mx.quantize`` writes and ``mx.dequantize`` reads them;
- a 4-bit group takes one half: its scale as a float16 with the 4 lowest mantissa bits
  cut (sign, exponent and 6 mantissa bits) and, in those 4 bits, a zero point z in
  [0, 15]: ``w = scale * (code - z)``. The rule is MLX's (the range widened to contain 0,
  which zero exactly representable then needs), with the scale rounded to 6 mantissa bits
  before the codes are chosen (``quantize_groups``). At d64 a 4-bit row is 17 words (68
  bytes) instead of the 18 of two float16 pairs: 6% fewer bytes for every stored token,
  for an attention error of 0.0168 against 0.0167 (docs/quality.md).

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
# Saved caches carry this: 2 since 2026-12-02 (4-bit groups' metadata in one half), 1 before
# ((scale, bias) float16 pairs for every group).
ROW_LAYOUT = 2


def code_words(head_dim: int, bits: int) -> int:
    return head_dim * bits // 32


def meta_halves(bits: int) -> int:
    """uint16 halves of metadata per group: 1 for 4-bit groups, 2 for 8-bit ones."""
    return 1 if bits == 4 else 2


def meta_words(head_dim: int, bits: int, group_size: int, key_bits: int | None = None) -> int:
    """Words of a row's metadata: the keys' groups then the values', padded to a word."""
    halves = head_dim // group_size * (meta_halves(key_bits or bits) + meta_halves(bits))
    return -(-halves // 2)


def row_words(head_dim: int, bits: int, group_size: int, key_bits: int | None = None) -> int:
    """Words per row; ``bits`` are the values' (and the keys', unless ``key_bits``)."""
    return (code_words(head_dim, key_bits or bits) + code_words(head_dim, bits)
            + meta_words(head_dim, bits, group_size, key_bits))


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


def _scale_6bit(scale):
    """float32 scales -> uint16: the float16 bits rounded to 6 mantissa bits (the low 4 bits
    zero; never a zero magnitude, which a code could not be divided by)."""
    h = scale.astype(mx.float16).view(mx.uint16).astype(mx.uint32)
    h6 = (h + 8) & 0xFFF0
    return mx.where((h6 & 0x7FFF) == 0, (h & 0x8000) | 0x10, h6).astype(mx.uint16)


def quantize_groups(x, bits: int, group_size: int):
    """x (..., D) -> (codes (..., D*bits/32) uint32, metadata (..., NG*meta_halves) uint16),
    the append kernel's rule in MLX ops (the oracle). 8-bit: ``mx.quantize`` and its float16
    (scale, bias) pairs. 4-bit: MLX's rule on the range widened to contain 0 (so the zero
    point is a code), then the scale rounded to 6 mantissa bits, in float32."""
    if bits != 4:
        codes, scales, biases = mx.quantize(x, group_size=group_size, bits=bits)
        pairs = mx.stack([scales.astype(mx.float16), biases.astype(mx.float16)], axis=-1)
        return codes, pairs.reshape(*scales.shape[:-1], -1).view(mx.uint16)
    *lead, D = x.shape
    w = x.astype(mx.float32).reshape(*lead, D // group_size, group_size)
    lo = mx.minimum(w.min(axis=-1, keepdims=True), 0.0)
    hi = mx.maximum(w.max(axis=-1, keepdims=True), 0.0)
    neg_edge = mx.abs(lo) > mx.abs(hi)
    scale = mx.maximum((hi - lo) / 15.0, 1e-7)
    scale = mx.where(neg_edge, scale, -scale)
    edge = mx.where(neg_edge, lo, hi)
    q0 = mx.round(edge / scale)  # in [-15, 0]: the range holds 0
    scale = mx.where(q0 != 0, edge / mx.where(q0 != 0, q0, 1.0), scale)
    meta = _scale_6bit(scale)
    s6 = meta.view(mx.float16).astype(mx.float32)
    codes = mx.clip(mx.round((w - q0 * s6) / s6), 0, 15).astype(mx.uint32)
    shifts = mx.arange(8, dtype=mx.uint32) * 4
    words = (codes.reshape(*lead, D // 8, 8) << shifts).sum(axis=-1).astype(mx.uint32)
    return words, (meta | (-q0).astype(mx.uint16)).squeeze(-1)


def pack_rows(key_parts, value_parts):
    """(codes, metadata) of keys and of values (as ``quantize_groups`` returns them) ->
    rows (..., ROW) uint32."""
    (kc, km), (vc, vm) = key_parts, value_parts
    meta = mx.concatenate([km, vm], axis=-1)
    if meta.shape[-1] % 2:
        meta = mx.concatenate([meta, mx.zeros((*meta.shape[:-1], 1), mx.uint16)], axis=-1)
    return mx.concatenate([kc, vc, _row_contiguous(meta).view(mx.uint32)], axis=-1)


def _row_contiguous(x):
    # A copy only when ``x`` is strided; unlike mx.contiguous, a graph with it can be
    # exported (the decode-step tracer exports the step that completes a key-center block).
    return x.reshape(-1).reshape(x.shape)


def _scales_biases(meta, bits: int):
    # (..., NG * meta_halves) uint16 -> float16 scales and biases (..., NG).
    if bits != 4:
        halves = meta.view(mx.float16)
        return halves[..., 0::2], halves[..., 1::2]
    scales = (meta & 0xFFF0).view(mx.float16)
    zero_points = (meta & 0xF).astype(mx.float16)
    return scales, -zero_points * scales  # exact in float16: 4 bits times 7


def unpack_rows(rows, head_dim: int, bits: int, group_size: int, key_bits: int | None = None):
    """rows (..., ROW) -> ((codes, scales, biases) of keys, same of values), the scales and
    biases float16 as ``mx.dequantize`` takes them."""
    kbits = key_bits or bits
    WK, WV = code_words(head_dim, kbits), code_words(head_dim, bits)
    NG, W = head_dim // group_size, WK + WV
    meta = _row_contiguous(rows[..., W:]).view(mx.uint16)
    KH = NG * meta_halves(kbits)
    ks, kb = _scales_biases(meta[..., :KH], kbits)
    vs, vb = _scales_biases(meta[..., KH:KH + NG * meta_halves(bits)], bits)
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
