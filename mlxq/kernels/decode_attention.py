"""Fused attention of 1-8 query tokens over the int4/int8 KV cache (flash-decoding).

Pass 1 (metal/quantized_decode_attention.metal) gives each threadgroup one block of the
sequence of one (batch, KV head) and all the query heads of that GQA group, so every packed
K/V row is read once per step; pass 2 (metal/decode_merge.metal) merges the blocks. With a
single block, pass 1 writes the output directly. ``reference_decode_attention`` is the
oracle: dequantize the same codes, then exact attention in float32.
"""

import functools
import math
from dataclasses import dataclass

import mlx.core as mx

from ..backend import kernel_backend, metal_kernel
from ..kernel_source import read_kernel_source
from .blockwise_attention import blockwise_decode_attention, chunked_prefill_attention

MAX_QUERY_TOKENS = 8
LOG2E = 1.4426950408889634
TILE = 32                      # keys per tile (metal TK)
MAX_ROWS_PER_SIMDGROUP = 4     # register budget: 4 rows x D/32 accumulators per lane
MAX_SIMDGROUPS = 8
TG_MEMORY_BUDGET = 28 * 1024   # of Metal's 32 KiB per threadgroup
TARGET_THREADGROUPS = 256      # enough to fill a Max/Ultra GPU at batch 1
BLOCK_SIZES = (1024, 512, 256)  # tokens per threadgroup, largest first
# The reference backend dequantizes at most this many tokens at once (longer: key blocks).
REFERENCE_DENSE_MAX = 2048


@dataclass(frozen=True)
class DecodePlan:
    rows_per_tg: int   # RT: query rows handled by one threadgroup
    simdgroups: int    # NSG
    row_chunks: int    # threadgroups sharing one KV block when G*LQ > RT
    block: int         # tokens per threadgroup
    n_blocks: int


def _tg_bytes(rows: int, D: int, bits: int, group_size: int) -> int:
    words, groups = D * bits // 32, D // group_size
    return rows * D * 4 + rows * (groups + TILE) * 4 + TILE * (2 * words + 1 + 4 * groups) * 4


def plan_decode(batch, kv_heads, gqa, q_len, D, bits, group_size, length) -> DecodePlan:
    """Grid and block size: see docs/int4-kv.md for the reasoning."""
    rows = gqa * q_len
    cap = MAX_ROWS_PER_SIMDGROUP * MAX_SIMDGROUPS
    while cap > 1 and _tg_bytes(cap, D, bits, group_size) > TG_MEMORY_BUDGET:
        cap -= 1
    chunks = -(-rows // cap)
    rt = -(-rows // chunks)
    nsg = -(-rt // MAX_ROWS_PER_SIMDGROUP)
    units = batch * kv_heads * chunks
    # The largest block that still gives TARGET_THREADGROUPS; else the smallest: fewer,
    # larger blocks mean less partial-result traffic and a cheaper merge.
    block = BLOCK_SIZES[-1]
    for cand in BLOCK_SIZES:
        if units * -(-length // cand) >= TARGET_THREADGROUPS:
            block = cand
            break
    return DecodePlan(rt, nsg, chunks, block, -(-length // block))


@functools.cache
def _attention_kernel(backend: str):
    return metal_kernel(
        backend=backend,
        name="mlxq_quantized_decode_attention",
        input_names=["queries", "k_codes", "k_scales", "k_biases",
                     "v_codes", "v_scales", "v_biases", "params", "scale"],
        output_names=["out", "o_part", "ml_part"],
        source=read_kernel_source("quantized_decode_attention.metal"),
    )


@functools.cache
def _merge_kernel(backend: str):
    return metal_kernel(
        backend=backend,
        name="mlxq_decode_merge",
        input_names=["o_part", "ml_part", "params"],
        output_names=["out"],
        source=read_kernel_source("decode_merge.metal"),
    )


def reference_decode_attention(queries, k_codes, k_scales, k_biases, v_codes, v_scales,
                               v_biases, length, scale, group_size, bits):
    """Dequantize the first ``length`` tokens (float32), then exact causal attention."""

    def dequant(*parts):
        # Waiting for the queries keeps MLX from dequantizing every layer's cache at once.
        codes, scales, biases = mx.depends([x[..., :length, :] for x in parts], [queries])
        return mx.dequantize(codes, scales.astype(mx.float32), biases.astype(mx.float32),
                             group_size=group_size, bits=bits)

    k = dequant(k_codes, k_scales, k_biases)
    v = dequant(v_codes, v_scales, v_biases)
    q = queries.astype(mx.float32)
    mask = "causal" if queries.shape[2] > 1 else None
    out = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    return out.astype(queries.dtype)


def quantized_decode_attention(queries, k_codes, k_scales, k_biases, v_codes, v_scales,
                               v_biases, length, scale, group_size, bits, backend=None):
    """Causal attention of ``queries`` (B, Hq, Lq<=8, D) over the first ``length`` cached
    tokens (the last Lq of which are the queries' own). Cache arrays are whole buffers
    (B, Hkv, capacity, ...). Returns (B, Hq, Lq, D) in the queries' dtype."""
    backend = backend or kernel_backend()
    if backend == "reference":
        if length > REFERENCE_DENSE_MAX:
            return blockwise_decode_attention(
                queries, (k_codes, k_scales, k_biases), (v_codes, v_scales, v_biases), length,
                scale, group_size, bits)
        return reference_decode_attention(queries, k_codes, k_scales, k_biases, v_codes,
                                          v_scales, v_biases, length, scale, group_size, bits)
    out_dtype = queries.dtype
    out, o_part, ml_part = _attention_pass(
        queries, (k_codes, k_scales, k_biases), (v_codes, v_scales, v_biases), length, scale,
        group_size, bits, backend, partials=False)
    if out is None:
        out = _merge(o_part, ml_part, queries, backend)
    return out.astype(out_dtype) if out.dtype != out_dtype else out


def _attention_pass(queries, cache_keys, cache_values, length, scale, group_size, bits,
                    backend, partials):
    """Pass 1. Returns (out, None, None) when one block covers the sequence and
    ``partials`` is False, else (None, o_part, ml_part)."""
    B, Hq, Lq, D = queries.shape
    _, Hkv, cap, _ = cache_keys[0].shape
    if not 1 <= Lq <= MAX_QUERY_TOKENS or Hq % Hkv or not Lq <= length <= cap:
        raise ValueError(f"bad decode shapes: queries {queries.shape}, cache "
                         f"{cache_keys[0].shape}, length {length}")
    if queries.dtype not in (mx.float16, mx.float32):
        queries = queries.astype(mx.float32)
    G = Hq // Hkv
    p = plan_decode(B, Hkv, G, Lq, D, bits, group_size, length)
    single = p.n_blocks == 1 and not partials
    rows = B * Hq * Lq
    nt = 32 * p.simdgroups
    params = mx.array([length, p.block, cap, Hkv, p.row_chunks, p.n_blocks], dtype=mx.int32)
    out, o_part, ml_part = _attention_kernel(backend)(
        inputs=[queries, *cache_keys, *cache_values, params,
                mx.array([scale], dtype=mx.float32)],
        template=[("T", queries.dtype), ("D", D), ("BITS", bits), ("GS", group_size),
                  ("G", G), ("LQ", Lq), ("RT", p.rows_per_tg), ("NSG", p.simdgroups),
                  ("SINGLE", single)],
        grid=(p.n_blocks * nt, Hkv, B * p.row_chunks),
        threadgroup=(nt, 1, 1),
        # Unused outputs get one element (the kernel never writes them).
        output_shapes=[(B, Hq, Lq, D) if single else (1,),
                       (1,) if single else (rows, p.n_blocks, D),
                       (1,) if single else (rows, p.n_blocks, 2)],
        output_dtypes=[queries.dtype, mx.float32, mx.float32],
    )
    return (out, None, None) if single else (None, o_part, ml_part)


def _merge(o_part, ml_part, queries, backend):
    """Pass 2: (rows, n_blocks, D) partials -> (B, Hq, Lq, D) in the queries' dtype."""
    B, Hq, Lq, D = queries.shape
    dtype = queries.dtype if queries.dtype in (mx.float16, mx.float32) else mx.float32
    (out,) = _merge_kernel(backend)(
        inputs=[o_part, ml_part, mx.array([o_part.shape[1]], dtype=mx.int32)],
        template=[("T", dtype), ("D", D)],
        grid=(32, B * Hq * Lq, 1),
        threadgroup=(32, 1, 1),
        output_shapes=[(B, Hq, Lq, D)],
        output_dtypes=[dtype],
    )
    return out


def _window_partial(queries, keys, values, scale, sink_keys=None, sink_values=None):
    """The partial (o, max, sum) of ``queries`` (B, Hq, L, D) over a short full-precision
    window (B, Hkv, W, D) whose last L tokens are the queries' own, plus optional sink
    tokens (B, Hkv, S, D) that every query sees, in the kernel's format (log2 units):
    o_part (rows, 1, D), ml_part (rows, 1, 2). The sink is a separate segment rather than
    a concatenation, so the cache's buffers are read where they are."""
    B, Hq, L, D = queries.shape
    Hkv, W = keys.shape[1], keys.shape[2]
    q = queries.astype(mx.float32).reshape(B, Hkv, Hq // Hkv, L, D) * (scale * LOG2E)

    def scores(k):  # (B, Hkv, G, L, n)
        return q @ k.astype(mx.float32)[:, :, None].swapaxes(-1, -2)

    s = scores(keys)
    if L > 1:
        visible = mx.arange(W)[None, :] <= mx.arange(L)[:, None] + (W - L)
        s = mx.where(visible, s, -float("inf"))
    segments = [(s, values)]
    if sink_keys is not None:
        segments.append((scores(sink_keys), sink_values))
    m = segments[0][0].max(axis=-1, keepdims=True)
    for s_, _ in segments[1:]:
        m = mx.maximum(m, s_.max(axis=-1, keepdims=True))
    o = total = 0
    for s_, v in segments:
        p = mx.power(2.0, s_ - m)
        o = o + p @ v.astype(mx.float32)[:, :, None]
        total = total + p.sum(axis=-1, keepdims=True)
    rows = B * Hq * L
    ml = mx.concatenate([m, total], axis=-1)
    return o.reshape(rows, 1, D), ml.reshape(rows, 1, 2)


def window_attention(queries, win_keys, win_values, cache_keys, cache_values, cached, scale,
                     group_size, bits, backend=None, sink_keys=None, sink_values=None):
    """Causal attention of ``queries`` (B, Hq, L, D) over ``cached`` quantized tokens
    followed by a full-precision window (B, Hkv, W, D), W >= L, whose last L tokens are
    the queries' own, and optional full-precision sink tokens (B, Hkv, S, D) older than
    every query. Decode (L <= 8) on the kernel backends: pass 1 over the quantized
    tokens with every query row treated as its own head (all of them see every cached
    token), the sink's and window's partial in MLX ops, and pass 2 merges both."""
    backend = backend or kernel_backend()
    L = queries.shape[2]
    if cached == 0 and sink_keys is None:
        return mx.fast.scaled_dot_product_attention(
            queries, win_keys.astype(queries.dtype), win_values.astype(queries.dtype),
            scale=scale, mask="causal" if L > 1 else None)
    if backend == "reference" or L > MAX_QUERY_TOKENS or cached == 0:
        return chunked_prefill_attention(queries, win_keys, win_values, cache_keys,
                                         cache_values, cached, scale, group_size, bits,
                                         sink_keys=sink_keys, sink_values=sink_values)
    B, Hq, _, D = queries.shape
    # (B, Hq, L, D) -> (B, Hq*L, 1, D): row h*L + t still maps to KV head h // G.
    rows_as_heads = queries.reshape(B, Hq * L, 1, D)
    _, o_q, ml_q = _attention_pass(rows_as_heads, cache_keys, cache_values, cached, scale,
                                   group_size, bits, backend, partials=True)
    o_w, ml_w = _window_partial(queries, win_keys, win_values, scale, sink_keys, sink_values)
    return _merge(mx.concatenate([o_q, o_w], axis=1), mx.concatenate([ml_q, ml_w], axis=1),
                  queries, backend)


def bytes_read(batch, kv_heads, length, D, bits, group_size) -> int:
    """Device bytes pass 1 reads from the cache per step (K and V codes, scales, biases)."""
    return 2 * batch * kv_heads * length * (D * bits // 8 + 4 * math.ceil(D / group_size))
