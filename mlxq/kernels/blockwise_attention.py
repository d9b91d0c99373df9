"""Attention over the quantized cache in key blocks, with bounded temporaries (plain MLX).

Used for chunked prefill (L > 8 new tokens) on every backend, and for long decode contexts on
the ``reference`` backend. Each key block is dequantized on its own and merged with a
running max/sum (online softmax), so no L x S score tensor and no dequantized copy of the
whole cache ever exists: temporaries are O(L x block).

- ``chunked_prefill_attention``: the chunk attends to the ``cached`` quantized tokens and to
  its own keys/values in full precision (causal). A first chunk (empty cache) uses MLX's
  fused SDPA, exactly like the full-precision cache.
- ``blockwise_decode_attention``: a few query tokens over ``length`` quantized tokens, the
  last ``Lq`` of which are their own (what the fused decode kernel computes).
"""

import mlx.core as mx

MAX_BLOCK_BYTES = 8 * 1024 * 1024  # float32 scores + dequantized K/V of one block, at most
MIN_BLOCK, MAX_BLOCK = 64, 4096


def key_block(batch, q_heads, q_len, kv_heads, head_dim, cached) -> int:
    """Keys per block. One block's float32 temporaries (scores, dequantized K and V) stay
    within twice one layer's fp16 bytes for the cached tokens -- every layer saves ~0.7x
    that with int4, so the whole model's peak stays below the fp16 path's -- and within
    MAX_BLOCK_BYTES."""
    one_layer_fp16 = cached * kv_heads * head_dim * 2 * 2
    budget = min(MAX_BLOCK_BYTES, 2 * one_layer_fp16)
    per_key = batch * (q_heads * q_len + 2 * kv_heads * head_dim) * 4
    block = budget // per_key
    return max(MIN_BLOCK, min(MAX_BLOCK, block // MIN_BLOCK * MIN_BLOCK))


def _after(state, arrays):
    # Order the lazy graph: a block's inputs wait for the previous block's merge, so MLX's
    # breadth-first scheduler cannot run several blocks at once and keep their scores alive.
    return mx.depends(list(arrays), list(state))


def _merge(state, scores, values):
    """One online-softmax step. scores (B, Hkv, G, L, S) float32, values (B, Hkv, 1, S, D)."""
    m, l, o = state
    m_new = mx.maximum(m, scores.max(axis=-1, keepdims=True))
    p = mx.exp(scores - m_new)
    factor = mx.exp(m - m_new)
    return m_new, l * factor + p.sum(axis=-1, keepdims=True), o * factor + p @ values


class _Online:
    """Running (max, sum, output) of GQA queries (B, Hkv, G, L, D), pre-scaled, float32."""

    def __init__(self, queries, kv_heads, scale):
        B, Hq, L, D = queries.shape
        self.shape, self.dtype = queries.shape, queries.dtype
        # The queries wait for nothing, but a block's keys wait for the previous merge.
        self.q = (queries.astype(mx.float32) * scale).reshape(B, kv_heads, Hq // kv_heads, L, D)
        m = mx.full((B, kv_heads, Hq // kv_heads, L, 1), -float("inf"), dtype=mx.float32)
        self.state = (m, mx.zeros_like(m), mx.zeros(self.q.shape, dtype=mx.float32))

    def quantized_block(self, parts_k, parts_v, start, stop, group_size, bits):
        def dequant(parts):
            codes, scales, biases = _after(
                self.state, (x[:, :, None, start:stop, :] for x in parts))
            return mx.dequantize(codes, scales.astype(mx.float32),
                                 biases.astype(mx.float32), group_size=group_size, bits=bits)

        return dequant(parts_k), dequant(parts_v)

    def add(self, k, v, visible=None):
        """Attend to keys/values (B, Hkv, 1, S, D); ``visible`` (L, S) bool or None."""
        scores = self.q @ k.swapaxes(-1, -2)
        if visible is not None:
            scores = mx.where(visible, scores, -float("inf"))
        self.state = _merge(self.state, scores, v)

    def result(self):
        _, l, o = self.state
        return (o / l).reshape(self.shape).astype(self.dtype)


def chunked_prefill_attention(queries, keys, values, cache_keys, cache_values, cached,
                              scale, group_size, bits, block=None, sink_keys=None,
                              sink_values=None):
    """Causal attention of ``queries`` (B, Hq, L, D) over ``cached`` quantized tokens
    (``cache_keys``/``cache_values`` = (codes, scales, biases) whole buffers) followed by
    full-precision ``keys``/``values`` (B, Hkv, W, D), W >= L, whose last L tokens are the
    queries' own, and optional full-precision sink tokens (B, Hkv, S, D) older than every
    query. Returns (B, Hq, L, D)."""
    if cached == 0 and sink_keys is None:
        return mx.fast.scaled_dot_product_attention(
            queries, keys, values, scale=scale, mask="causal")
    B, Hq, L, D = queries.shape
    Hkv = keys.shape[1]
    block = block or key_block(B, Hq, L, Hkv, D, cached)
    acc = _Online(queries, Hkv, scale)
    # Every sink and cached token is visible to every query: the first block makes each
    # row's running max finite, so fully masked rows of later blocks give exp(-inf) = 0.
    if sink_keys is not None:
        acc.add(*(x.astype(mx.float32)[:, :, None] for x in (sink_keys, sink_values)))
    for start in range(0, cached, block):
        stop = min(start + block, cached)
        acc.add(*acc.quantized_block(cache_keys, cache_values, start, stop, group_size, bits))
    k_new = keys.astype(mx.float32)[:, :, None]
    v_new = values.astype(mx.float32)[:, :, None]
    W = keys.shape[2]
    # The queries are the last L of the W full-precision tokens (W > L with a window).
    rows = mx.arange(L)[:, None] + (W - L)
    for start in range(0, W, block):
        stop = min(start + block, W)
        k, v = _after(acc.state, (k_new[..., start:stop, :], v_new[..., start:stop, :]))
        acc.add(k, v, mx.arange(start, stop)[None, :] <= rows)
    return acc.result()


def blockwise_decode_attention(queries, cache_keys, cache_values, length, scale,
                               group_size, bits, block=None):
    """Causal attention of ``queries`` (B, Hq, Lq, D) over the first ``length`` quantized
    tokens, the last Lq of which are the queries' own (query i sees keys < length-Lq+i+1)."""
    B, Hq, Lq, D = queries.shape
    Hkv = cache_keys[0].shape[1]
    block = block or key_block(B, Hq, Lq, Hkv, D, length)
    acc = _Online(queries, Hkv, scale)
    last_visible = mx.arange(Lq)[:, None] + (length - Lq)
    for start in range(0, length, block):
        stop = min(start + block, length)
        k, v = acc.quantized_block(cache_keys, cache_values, start, stop, group_size, bits)
        masked = stop > length - Lq + 1  # block reaches past the first query's last key
        acc.add(k, v, mx.arange(start, stop)[None, :] <= last_visible if masked else None)
    return acc.result()
