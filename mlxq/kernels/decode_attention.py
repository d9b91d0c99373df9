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
from .blockwise_attention import blockwise_decode_attention

MAX_QUERY_TOKENS = 8
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
    B, Hq, Lq, D = queries.shape
    _, Hkv, cap, _ = k_codes.shape
    if not 1 <= Lq <= MAX_QUERY_TOKENS or Hq % Hkv or not Lq <= length <= cap:
        raise ValueError(f"bad decode shapes: queries {queries.shape}, cache {k_codes.shape}, "
                         f"length {length}")
    out_dtype = queries.dtype
    if out_dtype not in (mx.float16, mx.float32):
        queries = queries.astype(mx.float32)
    G = Hq // Hkv
    p = plan_decode(B, Hkv, G, Lq, D, bits, group_size, length)
    single = p.n_blocks == 1
    rows = B * Hq * Lq
    nt = 32 * p.simdgroups
    params = mx.array([length, p.block, cap, Hkv, p.row_chunks, p.n_blocks], dtype=mx.int32)
    out, o_part, ml_part = _attention_kernel(backend)(
        inputs=[queries, k_codes, k_scales, k_biases, v_codes, v_scales, v_biases, params,
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
    if not single:
        (out,) = _merge_kernel(backend)(
            inputs=[o_part, ml_part, mx.array([p.n_blocks], dtype=mx.int32)],
            template=[("T", queries.dtype), ("D", D)],
            grid=(32, rows, 1),
            threadgroup=(32, 1, 1),
            output_shapes=[(B, Hq, Lq, D)],
            output_dtypes=[queries.dtype],
        )
    return out.astype(out_dtype) if out.dtype != out_dtype else out


def bytes_read(batch, kv_heads, length, D, bits, group_size) -> int:
    """Device bytes pass 1 reads from the cache per step (K and V codes, scales, biases)."""
    return 2 * batch * kv_heads * length * (D * bits // 8 + 4 * math.ceil(D / group_size))
