"""The oracle: causal attention over a KV cache made of segments, in plain MLX ops.

A cache is a list of segments, each a run of keys/values with their token positions:
``FpSegment`` (float16 sink or window slots, or a prefill chunk's own tokens) and
``QuantSegment`` (rows of the int4/int8 store, dequantized here). A query at position
``q`` sees a key at position ``p`` iff ``0 <= p <= q`` (empty slots have position -1).

Learned attention sinks (``sinks``: one logit per query head, gpt_oss) add exp(sink) to
the softmax denominator and no value (the sink is a key every query sees, with a zero
value); not to be confused with the cache's float16 sink *tokens* (the first tokens).

This one function is what every backend is tested against, the ``reference`` backend's
attention, and the prefill path on every backend. Keys are visited in blocks with an online
softmax, so no L x S score tensor and no dequantized copy of the whole cache exists:
temporaries are O(L x block).
"""

from dataclasses import dataclass

import mlx.core as mx

from .kv_layout import add_key_centers, dequantize_rows

MAX_BLOCK_BYTES = 8 * 1024 * 1024  # float32 scores + dequantized K/V of one block, at most
MIN_BLOCK, MAX_BLOCK = 64, 4096
# Finite "minus infinity": a row with no visible key yet stays finite (weights of masked
# keys are wiped by the first visible one), as in the kernels.
NEG = -1.0e30


@dataclass
class FpSegment:
    keys: mx.array       # (B, Hkv, S, D)
    values: mx.array     # (B, Hkv, S, D)
    positions: mx.array  # (B or 1, S) int32, -1 = empty slot


@dataclass
class QuantSegment:
    rows: mx.array       # (B, Hkv, >= count, ROW) uint32: the store's whole buffer
    count: int           # rows [0, count) are read
    positions: mx.array  # (B or 1, count) int32
    bits: int            # the values' (and the keys', unless key_bits)
    group_size: int
    centers: mx.array | None = None  # (B, Hkv, blocks, D) float16 key centers, or None
    key_bits: int | None = None


def cache_segments(store, fp, lens, sink: int, recent: int, head_dim: int, bits: int,
                   group_size: int, centers=None, key_bits: int | None = None) -> list:
    """The segments of an int4/int8 cache (layout in quantized_cache.py): ``store`` rows,
    ``fp`` slots (sink, then the ring of the newest tokens), ``lens`` = [(tokens, window
    tokens)] per sequence (sequences may differ), ``centers`` the store's key centers (or
    None). Exactly what the fused kernel reads."""
    D = head_dim
    n = mx.array([t for t, _ in lens], dtype=mx.int32)[:, None]
    n_w = mx.array([w for _, w in lens], dtype=mx.int32)[:, None]
    segments = []
    store_rows = max(max(0, t - sink - w) for t, w in lens)
    if store_rows:
        i = mx.arange(store_rows, dtype=mx.int32)[None]
        pos = mx.where(i < n - sink - n_w, sink + i, -1)
        segments.append(QuantSegment(store, store_rows, pos, bits, group_size, centers,
                                     key_bits))
    slots = 0 if fp is None else min(fp.shape[2], sink + recent)
    if slots:
        j = mx.arange(slots, dtype=mx.int32)[None]
        pos = mx.where(j < mx.minimum(n, sink), j, -1)
        if recent:
            top = mx.remainder(mx.maximum(n - 1 - sink, 0), recent)
            ring = n - 1 - mx.remainder(top - (j - sink) + recent, recent)
            ok = (j >= sink) & (ring >= mx.maximum(n - n_w, sink))
            pos = mx.where(ok, ring, pos)
        segments.append(FpSegment(fp[:, :, :slots, :D], fp[:, :, :slots, D:], pos))
    return segments


def key_block(batch, q_heads, q_len, kv_heads, head_dim, keys) -> int:
    """Keys per block: one block's float32 temporaries (scores, dequantized K and V) stay
    within twice one layer's fp16 bytes for ``keys`` tokens (every layer saves ~0.7x that
    with int4, so the model's peak stays below the fp16 path's) and MAX_BLOCK_BYTES."""
    budget = min(MAX_BLOCK_BYTES, 2 * keys * kv_heads * head_dim * 2 * 2)
    per_key = batch * (q_heads * q_len + 2 * kv_heads * head_dim) * 4
    block = budget // per_key
    return max(MIN_BLOCK, min(MAX_BLOCK, block // MIN_BLOCK * MIN_BLOCK))


def segmented_attention(queries, q_positions, segments, scale, block=None, sinks=None):
    """queries (B, Hq, L, D); q_positions (B or 1, L) int32; segments: FpSegment /
    QuantSegment list; sinks: (Hq,) learned sink logits (already in scaled-score units,
    as mlx-lm's) or None. Returns (B, Hq, L, D) in the queries' dtype."""
    B, Hq, L, D = queries.shape
    Hkv = segments[0].rows.shape[1] if isinstance(segments[0], QuantSegment) \
        else segments[0].keys.shape[1]
    G = Hq // Hkv
    total = sum(s.count if isinstance(s, QuantSegment) else s.keys.shape[2] for s in segments)
    block = block or key_block(B, Hq, L, Hkv, D, total)
    q = (queries.astype(mx.float32) * scale).reshape(B, Hkv, G, L, D)
    qpos = q_positions.reshape(-1, 1, 1, L, 1)
    m = mx.full((B, Hkv, G, L, 1), NEG, dtype=mx.float32)
    state = (m, mx.zeros_like(m), mx.zeros(q.shape, dtype=mx.float32))

    for seg in segments:
        n = seg.count if isinstance(seg, QuantSegment) else seg.keys.shape[2]
        for start in range(0, n, block):
            stop = min(start + block, n)
            # A block's inputs wait for the previous merge, so MLX's breadth-first
            # scheduler cannot run several blocks at once and keep their scores alive.
            if isinstance(seg, QuantSegment):
                (rows,) = mx.depends([seg.rows[:, :, start:stop]], list(state))
                k, v = dequantize_rows(rows, D, seg.bits, seg.group_size,
                                       key_bits=seg.key_bits)
                if seg.centers is not None:
                    k = add_key_centers(k, seg.centers, start)
            else:
                k, v = mx.depends([seg.keys[:, :, start:stop], seg.values[:, :, start:stop]],
                                  list(state))
                k, v = k.astype(mx.float32), v.astype(mx.float32)
            kpos = seg.positions[:, start:stop].reshape(-1, 1, 1, 1, stop - start)
            visible = (kpos >= 0) & (kpos <= qpos)
            scores = mx.where(visible, q @ k[:, :, None].swapaxes(-1, -2), NEG)
            state = _merge(state, scores, v[:, :, None])
    if sinks is not None:
        state = _merge_sinks(state, sinks.astype(mx.float32).reshape(1, Hkv, G, 1, 1))
    _, l, o = state
    return (o / l).reshape(B, Hq, L, D).astype(queries.dtype)


def _merge(state, scores, values):
    """One online-softmax step. scores (B, Hkv, G, L, S), values (B, Hkv, 1, S, D)."""
    m, l, o = state
    m_new = mx.maximum(m, scores.max(axis=-1, keepdims=True))
    p = mx.exp(scores - m_new)
    factor = mx.exp(m - m_new)
    return m_new, l * factor + p.sum(axis=-1, keepdims=True), o * factor + p @ values


def _merge_sinks(state, sinks):
    """Once, after every key: each head's sink joins the max and adds exp(sink - max) to
    the denominator; it has no value, so the output only rescales."""
    m, l, o = state
    m_new = mx.maximum(m, sinks)
    factor = mx.exp(m - m_new)
    return m_new, l * factor + mx.exp(sinks - m_new), o * factor
