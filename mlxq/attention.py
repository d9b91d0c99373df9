"""The one attention entry point every mlxq model calls, and the one place that decides
which attention runs.

``attend(queries, keys, values, cache, scale, sinks)`` takes the *new* tokens (after RoPE),
has the cache store them, then attends causally over everything stored. ``sinks``: learned
attention-sink logits, one per query head (gpt_oss), or None; every row of the table
honours them (the fused kernels add them in the merge, the oracle after its last block):

| cache                          | new tokens | backend          | attention                          |
|--------------------------------|------------|------------------|------------------------------------|
| none                           | any        | any              | MLX fused SDPA                     |
| ``KVCache`` (full precision)   | any        | any              | MLX fused SDPA over the buffers    |
| ``QuantizedKVCache``           | 1-8        | metal, emulate   | segmented decode kernel + merge    |
| ``QuantizedKVCache``           | 1-8        | reference        | the oracle (``segmented_attention``)|
| ``QuantizedKVCache``           | > 8        | any              | the oracle, the chunk in float16   |
| ``BatchQuantizedKVCache``      | 1 per seq. | metal, emulate   | the same kernels, per-sequence lens|
| ``BatchQuantizedKVCache``      | 1 per seq. | reference        | the oracle, per-sequence positions |
| ``BatchKVCache`` (full prec.)  | 1 per seq. | any              | MLX fused SDPA, per-sequence mask  |
| another library's cache        | any        | any              | its ``update_and_fetch`` + SDPA    |

The quantized cache always stores first and reads after (write before read), so no step
copies a cache buffer. Its rotation is applied to the queries and undone on the output
inside the kernels where the head dim is a power of two, else with MLX ops here.
"""

import mlx.core as mx

from .batch_cache import BatchKVCache, BatchQuantizedKVCache
from .cache import KVCache
from .kernels.decode_attention import MAX_QUERY_TOKENS, segmented_decode_attention
from .kernels.kv_layout import row_words
from .kernels.segmented_attention import (
    FpSegment,
    QuantSegment,
    cache_segments,
    segmented_attention,
)
from .quantized_cache import QuantizedKVCache


def _causal_mask(q_len: int):
    # MLX aligns "causal" to the end of the keys, so new queries see all earlier tokens.
    return "causal" if q_len > 1 else None


def attend(queries, keys, values, cache=None, scale: float = 1.0, sinks=None):
    """Causal attention of ``queries`` (B, Hq, L, D) over the cache plus the new keys/values
    (B, Hkv, L, D), with learned sink logits ``sinks`` (Hq,) if given. Returns (B, Hq, L, D)."""
    L = queries.shape[2]
    if cache is None:
        return mx.fast.scaled_dot_product_attention(
            queries, keys, values, scale=scale, mask=_causal_mask(L), sinks=sinks)
    if isinstance(cache, KVCache):
        k, v = cache.update_and_fetch(keys, values)
        if queries.dtype != k.dtype:
            queries = queries.astype(k.dtype)
        return mx.fast.scaled_dot_product_attention(
            queries, k, v, scale=scale, mask=_causal_mask(L), sinks=sinks)
    if isinstance(cache, QuantizedKVCache):
        return quantized_attend(queries, keys, values, cache, scale, sinks)
    if isinstance(cache, BatchQuantizedKVCache):
        return batch_attend(queries, keys, values, cache, scale, sinks)
    if isinstance(cache, BatchKVCache):
        k, v = cache.update_and_fetch(keys, values)
        return mx.fast.scaled_dot_product_attention(
            queries.astype(k.dtype), k, v, scale=scale, mask=cache.mask, sinks=sinks)
    return _foreign_cache_attend(queries, keys, values, cache, scale, sinks)


def quantized_attend(queries, keys, values, cache: QuantizedKVCache, scale: float,
                     sinks=None):
    """Write first (the new tokens into the store and the window), then read."""
    new_rows = cache.append(keys, values)
    return attend_stored(queries, cache, scale, new_rows, sinks)


def attend_stored(queries, cache: QuantizedKVCache, scale: float, new_rows=None, sinks=None):
    """Attention of ``queries`` (the newest L tokens, already appended) over what the cache
    holds. ``new_rows``: their float16 rows from ``append`` (a prefill chunk longer than
    the window attends to them)."""
    L = queries.shape[2]
    if L <= MAX_QUERY_TOKENS and cache.backend != "reference":
        return _fused_decode(queries, cache, scale, sinks)
    return _in_rotated_basis(cache.rotation, queries, lambda q: segmented_attention(
        q, _query_positions(cache, L), _segments(cache, L, new_rows), scale, sinks=sinks))


def batch_attend(queries, keys, values, cache: BatchQuantizedKVCache, scale: float,
                 sinks=None):
    """One decode step of a batch of sequences, each at its own length."""
    cache.append(keys, values)
    if cache.backend != "reference":
        return _decode_kernels(queries, cache, cache.store, cache.fp, cache.centers,
                               cache.lens, scale, sinks)
    segments = cache_segments(cache.store, cache.fp, cache.lens, cache.sink, cache.recent,
                              cache.head_dim, cache.bits, cache.group_size, cache.centers,
                              cache.key_bits)
    return _in_rotated_basis(cache.rotation, queries, lambda q: segmented_attention(
        q, (cache.offset - 1)[:, None], segments, scale, sinks=sinks))


def _fused_decode(queries, cache, scale, sinks):
    B = queries.shape[0]
    return _decode_kernels(queries, cache, *_buffers(cache, B), cache.centers,
                           [(cache.offset, cache.window_length)] * B, scale, sinks)


def _decode_kernels(queries, cache, store, fp, centers, lens, scale, sinks):
    # The kernels rotate in registers (power-of-two head dims), else MLX ops around them.
    signs = cache.signs if cache.kernel_rotates else None
    return _in_rotated_basis(None if cache.kernel_rotates else cache.rotation, queries,
                             lambda q: segmented_decode_attention(
                                 q, store, fp, lens, cache.sink, cache.recent, scale,
                                 cache.bits, cache.group_size, signs, cache.backend,
                                 sinks=sinks, centers=centers, key_bits=cache.key_bits))


def _in_rotated_basis(rotation, queries, attention):
    """attention(queries) with the cache's rotation applied to the queries and undone on
    the output (keys and values are stored rotated); ``rotation`` None: as is."""
    if rotation is None:
        return attention(queries)
    return rotation.inverse(attention(rotation.forward(queries)))


def _buffers(cache, B):
    """(store, fp) for the kernel; a buffer not allocated yet (no token past the sink, or
    no sink and no window) is a one-slot stand-in the kernel reads nothing from."""
    store, fp = cache.store, cache.fp
    H, D = (store if store is not None else fp).shape[1], cache.head_dim
    if store is None:
        store = mx.zeros((B, H, 1, row_words(D, cache.bits, cache.group_size, cache.key_bits)),
                         mx.uint32)
    if fp is None:
        fp = mx.zeros((B, H, 1, 2 * D), mx.float16)
    return store, fp


def _query_positions(cache, L):
    return mx.arange(cache.offset - L, cache.offset, dtype=mx.int32)[None]


def _segments(cache, L, fp_rows):
    """The cache as the oracle's segments. A prefill chunk (more than MAX_QUERY_TOKENS)
    longer than the window attends to all of its own tokens in float16 (``fp_rows``), older
    tokens as stored; decode reads exactly what the fused kernel reads."""
    n, S = cache.offset, cache.sink
    D = cache.head_dim
    segments = []
    fp = cache.fp
    sink = cache.sink_length
    if MAX_QUERY_TOKENS < L and cache.window_length < L and n > S:
        first = max(n - L, S)  # the chunk's tokens past the sink
        if sink:
            segments.append(FpSegment(fp[:, :, :sink, :D], fp[:, :, :sink, D:],
                                      mx.arange(sink, dtype=mx.int32)[None]))
        stored = first - S
        if stored:
            segments.append(QuantSegment(cache.store, stored,
                                         mx.arange(S, first, dtype=mx.int32)[None],
                                         cache.bits, cache.group_size, cache.centers,
                                         cache.key_bits))
        own = fp_rows[:, :, first - (n - L):]
        segments.append(FpSegment(own[..., :D], own[..., D:],
                                  mx.arange(first, n, dtype=mx.int32)[None]))
        return segments
    B = (cache.store if cache.store is not None else fp).shape[0]
    return cache_segments(cache.store, fp, [(n, cache.window_length)] * B,
                          S, cache.recent, D, cache.bits, cache.group_size, cache.centers,
                          cache.key_bits)


def _foreign_cache_attend(queries, keys, values, cache, scale, sinks):
    # A cache from another library (e.g. mlx-lm's), so mlx-lm tools can drive mlxq models.
    L = queries.shape[2]
    keys, values = cache.update_and_fetch(keys, values)
    if isinstance(keys, tuple):
        if sinks is not None:
            raise ValueError("mlx-lm's quantized attention does not apply attention sinks")
        from mlx_lm.models.base import quantized_scaled_dot_product_attention

        return quantized_scaled_dot_product_attention(
            queries, keys, values, scale=scale, mask=_causal_mask(L),
            group_size=cache.group_size, bits=cache.bits)
    return mx.fast.scaled_dot_product_attention(
        queries, keys, values, scale=scale, mask=_causal_mask(L), sinks=sinks)

