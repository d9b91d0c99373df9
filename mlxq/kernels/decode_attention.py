"""Fused decode attention (1-8 query tokens) over the int4/int8 cache's segments.

Pass 1 (metal/segmented_decode_attention.metal) splits the keys into blocks: store blocks
(int4/int8 rows) and float16 blocks (the sink and the window ring); each threadgroup takes
one block of one (sequence, KV head) for all the query heads of the GQA group, so every
K/V row is read once per step. Pass 2 (metal/decode_merge.metal) merges the blocks, adds
the learned attention sinks (gpt_oss; once per row, only when given) and undoes the value
rotation. ``plan_decode`` picks the launch: enough simdgroups to fill a GPU
(~TARGET_SIMDGROUPS), the fewest blocks that get there.
"""

import functools
from dataclasses import dataclass

import mlx.core as mx

from ..backend import metal_kernel
from ..kernel_source import read_kernel_source
from .kv_layout import CENTER_BLOCK, center_blocks, row_bytes

MAX_QUERY_TOKENS = 8
SIMDGROUPS = 4                 # NSG: simdgroups per threadgroup (separate key steps)
TARGET_SIMDGROUPS = 1024       # MLX's fp16 2-pass SDPA launches ~2,000 at Llama-3-8B
MAX_BLOCK = 4096
LANES_PER_KEY = (1, 2, 4, 8)   # LPK, fewest first: more lanes per key = smaller blocks
REGISTER_BUDGET = 32           # RT * D/32 output accumulators per lane


@dataclass(frozen=True)
class DecodePlan:
    rows_per_tg: int   # RT: query rows handled by one threadgroup
    row_chunks: int    # threadgroups sharing one KV block when G*LQ > RT
    lanes_per_key: int
    block: int         # keys (store rows or fp slots) per threadgroup
    store_blocks: int  # nb_q
    n_blocks: int      # store blocks + fp blocks

    def threadgroups(self, batch: int, kv_heads: int) -> int:
        return self.n_blocks * kv_heads * batch * self.row_chunks

    def simdgroups(self, batch: int, kv_heads: int) -> int:
        return self.threadgroups(batch, kv_heads) * SIMDGROUPS


def plan_decode(batch, kv_heads, gqa, q_len, head_dim, bits, store_rows, fp_slots):
    """The launch for ``store_rows`` int4/int8 rows and ``fp_slots`` float16 slots to read
    (the longest sequence's), see the kernel file; ``bits``: the keys'."""
    rows = gqa * q_len
    rt_cap = max(1, REGISTER_BUDGET // (head_dim // 32))
    chunks = -(-rows // rt_cap)
    rt = -(-rows // chunks)
    units = batch * kv_heads * chunks
    words = head_dim * bits // 32
    keys = store_rows + fp_slots
    # The block that gives TARGET_SIMDGROUPS, in whole steps of the simdgroups.
    wanted = keys * units * SIMDGROUPS // TARGET_SIMDGROUPS
    lpk_ok = [lpk for lpk in LANES_PER_KEY if words % lpk == 0]
    lpk = lpk_ok[-1]
    block = SIMDGROUPS * 32 // lpk
    for cand in lpk_ok:
        step = SIMDGROUPS * 32 // cand
        if wanted >= step:
            lpk, block = cand, min(MAX_BLOCK, wanted // step * step)
            break
    store_blocks = -(-store_rows // block)
    return DecodePlan(rt, chunks, lpk, block, store_blocks, store_blocks + -(-fp_slots // block))


@functools.cache
def _attention_kernel(backend: str):
    return metal_kernel(
        backend=backend,
        name="mlxq_segmented_decode_attention",
        input_names=["queries", "store", "fp", "centers", "signs", "lens", "params", "scale"],
        output_names=["o_part", "ml_part"],
        header=read_kernel_source("hadamard.h") + read_kernel_source("kv_row.h"),
        source=read_kernel_source("segmented_decode_attention.metal"),
    )


@functools.cache
def _merge_kernel(backend: str):
    return metal_kernel(
        backend=backend,
        name="mlxq_decode_merge",
        input_names=["o_part", "ml_part", "signs", "sinks", "params"],
        output_names=["out"],
        header=read_kernel_source("hadamard.h"),
        source=read_kernel_source("decode_merge.metal"),
    )


def segmented_decode_attention(queries, store, fp, lens, sink, recent, scale, bits,
                               group_size, signs, backend, sinks=None, centers=None,
                               key_bits=None):
    """Causal attention of ``queries`` (B, Hq, Lq<=8, D) over the cache's segments.

    store: (B, Hkv, cap, ROW) uint32 whole buffer; fp: (B, Hkv, fcap, 2D) float16 whole
    buffer; lens: list of (tokens, window tokens) per sequence; sink: the cache's float16
    first tokens; signs: (D,) float32 of the rotation applied in-kernel, or None; sinks:
    (Hq,) learned sink logits (gpt_oss; the merge adds them), or None; centers: (B, Hkv,
    blocks, D) float16 key centers of the store (kv_layout), or None; bits: the values' (and
    the keys', unless key_bits). Returns (B, Hq, Lq, D) in the queries' dtype."""
    B, Hq, Lq, D = queries.shape
    Hkv, cap = store.shape[1], store.shape[2]
    fcap = fp.shape[2]
    if not 1 <= Lq <= MAX_QUERY_TOKENS or Hq % Hkv or \
            (sinks is not None and tuple(sinks.shape) != (Hq,)):
        raise ValueError(f"bad decode shapes: queries {queries.shape}, store {store.shape}"
                         f"{'' if sinks is None else f', sinks {sinks.shape}'}")
    if queries.dtype not in (mx.float16, mx.float32):
        queries = queries.astype(mx.float32)
    store_rows = max(max(0, n - sink - n_w) for n, n_w in lens)
    fp_slots = min(fcap, sink + recent)
    p = plan_decode(B, Hkv, Hq // Hkv, Lq, D, key_bits or bits, store_rows, fp_slots)
    rows = B * Hq * Lq
    signs_in = signs if signs is not None else mx.zeros((1,), mx.float32)
    params = mx.array([cap, fcap, sink, recent, p.block, p.store_blocks, p.n_blocks,
                       p.row_chunks, Hkv, 0 if centers is None else centers.shape[2]],
                      dtype=mx.int32)
    nt = 32 * SIMDGROUPS
    o_part, ml_part = _attention_kernel(backend)(
        inputs=[queries, store, fp,
                centers if centers is not None else mx.zeros((1,), mx.float16), signs_in,
                mx.array(lens, dtype=mx.int32), params, mx.array([scale], dtype=mx.float32)],
        template=[("T", queries.dtype), ("D", D), ("BITS", bits), ("KBITS", key_bits or bits),
                  ("GS", group_size), ("G", Hq // Hkv), ("LQ", Lq), ("RT", p.rows_per_tg), ("NSG", SIMDGROUPS),
                  ("LPK", p.lanes_per_key), ("ROTATE", signs is not None),
                  ("CENTER", centers is not None), ("CENTER_BLOCK", CENTER_BLOCK)],
        grid=(p.n_blocks * nt, Hkv, B * p.row_chunks),
        threadgroup=(nt, 1, 1),
        output_shapes=[(rows, p.n_blocks, D), (rows, p.n_blocks, 2)],
        output_dtypes=[queries.dtype, mx.float32],
    )
    sinks_in = sinks.astype(mx.float32) if sinks is not None else mx.zeros((1,), mx.float32)
    (out,) = _merge_kernel(backend)(
        inputs=[o_part, ml_part, signs_in, sinks_in,
                mx.array([p.n_blocks, Lq, Hq], dtype=mx.int32)],
        template=[("T", queries.dtype), ("D", D), ("ROTATE", signs is not None),
                  ("SINKS", sinks is not None)],
        grid=(32, rows, 1),
        threadgroup=(32, 1, 1),
        output_shapes=[(B, Hq, Lq, D)],
        output_dtypes=[queries.dtype],
    )
    return out


def bytes_read(batch, kv_heads, store_rows, fp_slots, head_dim, bits, group_size,
               key_center: bool = False, key_bits: int | None = None) -> int:
    """Cache bytes pass 1 reads per step: store rows (K and V codes, scales, biases) plus
    float16 K and V of the sink and window slots (plus the store's key centers)."""
    per_head = (store_rows * row_bytes(head_dim, bits, group_size, key_bits)
                + fp_slots * 4 * head_dim)
    if key_center:
        per_head += center_blocks(store_rows) * 2 * head_dim
    return batch * kv_heads * per_head
