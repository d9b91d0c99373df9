"""The fused segmented decode kernel (through the emulator) vs the oracle.

The oracle (``segmented_attention`` over ``cache_segments``) reads the *same* stored rows and
float16 slots and runs exact float32 attention, so the only difference is float rounding
order: a tight tolerance catches any wrong index, mask, ring slot or merge. Store rows past
the longest sequence's valid length have NaN scales, so reading them poisons the output.
The parameter list covers every value of every axis without the full product (CI time).
"""

import math

import mlx.core as mx
import numpy as np
import pytest

from mlxq.kernels.decode_attention import (
    SIMDGROUPS,
    bytes_read,
    plan_decode,
    segmented_decode_attention,
)
from mlxq.kernels.kv_append import reference_append_rows
from mlxq.kernels.kv_layout import CENTER_BLOCK, row_bytes, row_words
from mlxq.kernels.segmented_attention import cache_segments, segmented_attention
from mlxq.rotation import HadamardRotation, random_signs

# (batch, q_tokens, head_dim, gqa, kv_heads, bits, group, sink, recent, lens, rotate)
# lens: (tokens, window tokens) per sequence.
CASES = [
    (1, 1, 64, 1, 2, 4, 64, 0, 0, [(1, 0)], False),            # one token, no fp segment
    (1, 1, 64, 3, 3, 4, 64, 4, 256, [(3, 0)], True),           # sink partly full
    (2, 1, 128, 2, 2, 4, 32, 4, 16, [(31, 16), (20, 16)], True),  # batch 2, own lengths
    (1, 2, 64, 4, 1, 8, 64, 2, 8, [(32, 8)], True),
    (2, 3, 128, 6, 1, 4, 128, 4, 16, [(33, 16), (33, 16)], True),
    (1, 4, 256, 2, 2, 4, 64, 4, 32, [(300, 32)], True),        # head_dim 256
    (1, 1, 64, 8, 1, 4, 32, 4, 64, [(1000, 64)], True),        # GQA 8
    (1, 8, 64, 16, 1, 4, 64, 4, 256, [(700, 256)], True),      # 128 rows in chunks
    (1, 1, 128, 16, 2, 8, 128, 0, 0, [(2048, 0)], True),       # no sink, no window
    (1, 5, 128, 4, 2, 4, 64, 4, 256, [(260, 256)], True),      # window exactly full
    (1, 1, 128, 4, 2, 4, 64, 4, 256, [(8200, 256)], True),     # long: 8K+
    (2, 1, 96, 3, 1, 4, 32, 4, 16, [(129, 16), (70, 9)], False),  # head_dim 96, trimmed window
    (1, 6, 64, 2, 4, 8, 32, 3, 5, [(40, 5)], False),           # window shorter than LQ
    (1, 7, 128, 1, 2, 8, 128, 4, 16, [(513, 16)], True),       # GQA 1
    (1, 1, 128, 4, 8, 4, 64, 0, 0, [(4096, 0)], True),         # Llama-3-8B heads: 32 whole
    (1, 1, 128, 4, 8, 4, 64, 0, 0, [(4097, 0)], True),         # blocks, then one more key
    (1, 1, 64, 3, 3, 4, 64, 4, 256, [(1024, 256)], True),      # the default model at 1K
]


def _random_cache(B, Hkv, D, bits, gs, sink, recent, lens, key, exact_capacity=False,
                  key_bits=None):
    """Store and fp buffers as appends would leave them, with random contents."""
    k0, k1, k2 = mx.random.split(key, 3)
    valid = max(max(0, n - sink) for n, _ in lens)
    cap = valid if exact_capacity else valid + 40
    x = mx.random.normal((B, Hkv, cap, D), key=k0)
    _, store = reference_append_rows(x, 0.5 * x[..., ::-1], None, bits, gs, key_bits=key_bits)
    # Poison everything past the valid rows: NaN scales and biases.
    words = row_words(D, bits, gs, key_bits)
    nan_words = mx.full((B, Hkv, cap, words), 0x7E007E00, dtype=mx.uint32)
    codes = D * (key_bits or bits) // 32 + D * bits // 32
    is_sb = mx.arange(words) >= codes
    poison = (mx.arange(cap)[:, None] >= valid) & is_sb
    store = mx.where(poison, nan_words, store)
    fcap = sink + recent + 3
    fp = mx.random.normal((B, Hkv, fcap, 2 * D), key=k1).astype(mx.float16)
    return store, fp


def _random_centers(B, Hkv, D, lens, sink, seed):
    """Key centers for every block of the store (+ one): large and different per block,
    so a score that takes a wrong block's center (or none) moves the softmax."""
    blocks = max(max(0, n - sink) for n, _ in lens) // CENTER_BLOCK + 2
    return (2 * mx.random.normal((B, Hkv, blocks, D), key=mx.random.key(50 + seed))
            ).astype(mx.float16)


def _run(case, seed=0, exact_capacity=False, sinks=None, centers=False, key_bits=None):
    B, Lq, D, G, Hkv, bits, gs, sink, recent, lens, rotate = case
    key = mx.random.key(seed)
    store, fp = _random_cache(B, Hkv, D, bits, gs, sink, recent, lens, key, exact_capacity,
                              key_bits)
    centers = _random_centers(B, Hkv, D, lens, sink, seed) if centers else None
    # Scaled-up queries give peaked softmax weights, so a wrong key index shows.
    q = 3 * mx.random.normal((B, Hkv * G, Lq, D), key=mx.random.split(key)[1])
    scale = 1 / math.sqrt(D)
    signs = mx.array(random_signs(D, 7, 1)) if rotate else None
    out = segmented_decode_attention(q, store, fp, lens, sink, recent, scale, bits, gs,
                                     signs, "emulate", sinks=sinks, centers=centers,
                                     key_bits=key_bits)
    rot = HadamardRotation(D, 7, 1) if rotate else None
    q_rot = rot.forward(q) if rot else q
    positions = mx.array([[n - Lq + t for t in range(Lq)] for n, _ in lens], dtype=mx.int32)
    ref = segmented_attention(q_rot, positions,
                              cache_segments(store, fp, lens, sink, recent, D, bits, gs,
                                             centers, key_bits), scale, sinks=sinks)
    return out, rot.inverse(ref) if rot else ref


def _rel_err(out, ref):
    out, ref = np.asarray(out.astype(mx.float32)), np.asarray(ref.astype(mx.float32))
    return np.abs(out - ref).max() / np.abs(ref).max()


def _case_id(c):
    return "B{}-L{}-D{}-G{}-H{}-b{}-g{}-s{}-r{}-n{}{}".format(
        *c[:9], "_".join(str(n) for n, _ in c[9]), "-rot" if c[10] else "")


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_kernel_matches_oracle(case):
    out, ref = _run(case)
    assert out.shape == ref.shape and out.dtype == mx.float32
    assert np.isfinite(np.asarray(out)).all()
    assert _rel_err(out, ref) < 2e-4


# Key centers (kv_layout): one per CENTER_BLOCK store rows, added to every key's score in the
# block. Every case spans at least two blocks.
CENTER_CASES = [
    (1, 1, 64, 8, 1, 4, 32, 4, 64, [(1000, 64)], True),        # GQA 8, many blocks, LPK 1
    (2, 3, 128, 6, 1, 4, 128, 4, 16, [(333, 16), (150, 16)], True),  # batch 2, own lengths
    (1, 4, 256, 2, 2, 4, 64, 4, 32, [(300, 32)], True),        # head_dim 256
    (1, 2, 64, 4, 1, 8, 64, 2, 8, [(300, 8)], True),           # int8
    (2, 1, 96, 3, 1, 4, 32, 4, 16, [(300, 16), (170, 9)], False),  # head_dim 96, no rotation
    (1, 1, 128, 4, 2, 4, 64, 4, 256, [(8200, 256)], True),     # long: 8K+
    (1, 1, 64, 3, 3, 4, 64, 4, 256, [(1024, 256)], True),      # the default model at 1K
    (1, 7, 128, 1, 2, 8, 128, 4, 16, [(513, 16)], True),       # GQA 1
    (1, 8, 64, 16, 1, 4, 64, 4, 256, [(700, 256)], True),      # GQA 16: 128 rows in chunks
]


@pytest.mark.parametrize("case", CENTER_CASES, ids=_case_id)
def test_kernel_with_key_centers_matches_oracle(case):
    out, ref = _run(case, seed=3, centers=True)
    assert np.isfinite(np.asarray(out)).all()
    assert _rel_err(out, ref) < 2e-4
    plain, _ = _run(case, seed=3)
    assert _rel_err(out, plain) > 0.05  # the centers matter: a kernel ignoring them fails


# Keys and values in their own bits (key_bits): 8-bit keys with 4-bit values, and the
# reverse; the keys' bits set the lanes per key, the values' the value loop.
KEY_BITS_CASES = [
    ((1, 1, 64, 3, 3, 4, 64, 4, 256, [(1024, 256)], True), 8),    # the default model
    ((1, 1, 256, 4, 1, 4, 64, 4, 256, [(2000, 256)], True), 8),   # Gemma 3's global layers
    ((2, 3, 128, 6, 1, 4, 128, 4, 16, [(333, 16), (150, 16)], True), 8),  # batch, LQ 3
    ((1, 8, 64, 16, 1, 4, 32, 4, 64, [(700, 64)], True), 8),      # GQA 16, group 32
    ((1, 2, 128, 4, 2, 8, 64, 2, 8, [(300, 8)], False), 4),       # 4-bit keys, 8-bit values
    ((1, 7, 128, 1, 2, 4, 128, 4, 16, [(513, 16)], True), 8),     # GQA 1
    ((2, 1, 128, 2, 2, 4, 32, 4, 16, [(31, 16), (20, 16)], True), 8),  # GQA 2, short
    ((1, 1, 64, 8, 1, 8, 32, 4, 64, [(1000, 64)], True), 4),      # GQA 8, LPK 1
]


@pytest.mark.parametrize("case,key_bits", KEY_BITS_CASES,
                         ids=[_case_id(c) + f"-k{k}" for c, k in KEY_BITS_CASES])
def test_kernel_with_own_key_bits_matches_oracle(case, key_bits):
    for centers in (False, True):
        out, ref = _run(case, seed=5, centers=centers, key_bits=key_bits)
        assert np.isfinite(np.asarray(out)).all()
        assert _rel_err(out, ref) < 2e-4


# Learned attention sinks (gpt_oss): one logit per query head, merged once after all blocks.
SINK_CASES = [
    (1, 1, 64, 8, 1, 4, 32, 4, 64, [(1000, 64)], True),        # GQA 8, many blocks
    (2, 3, 128, 6, 1, 4, 128, 4, 16, [(33, 16), (20, 16)], True),  # batch 2, own lengths
    (1, 4, 64, 4, 2, 8, 64, 0, 0, [(600, 0)], False),          # int8, no fp segment
    (1, 1, 128, 4, 2, 4, 64, 4, 256, [(5, 0)], True),          # 5 tokens: empty blocks
    (1, 1, 64, 2, 2, 4, 64, 0, 0, [(1, 0)], False),            # a single block
]


def _sink_logits(case, seed):
    """Random sinks near the scores' scale (so they matter) plus extremes: one that swamps
    every key (output ~0) and one that vanishes (output as without sinks)."""
    Hq = case[3] * case[4]
    s = mx.random.uniform(-4.0, 14.0, (Hq,), key=mx.random.key(100 + seed))
    extremes = mx.array([1.0e4, -1.0e4, 40.0, -40.0])[:Hq]
    return mx.concatenate([extremes, s[len(extremes):]])


@pytest.mark.parametrize("case", SINK_CASES, ids=_case_id)
def test_kernel_with_attention_sinks_matches_oracle(case):
    for seed in (1, 2):
        sinks = _sink_logits(case, seed)
        out, ref = _run(case, seed=seed, sinks=sinks)
        assert np.isfinite(np.asarray(out)).all()
        assert _rel_err(out, ref) < 2e-4
        plain, _ = _run(case, seed=seed)
        # The sinks change the output (a kernel ignoring them fails the check above) ...
        assert _rel_err(out, plain) > 0.05
        # ... a huge sink takes all the weight, a very negative one none.
        Lq = case[1]
        per_head = np.asarray(out).reshape(case[0], -1, Lq, case[2])
        assert np.abs(per_head[:, 0]).max() < 1e-6
        np.testing.assert_allclose(per_head[:, 1], np.asarray(plain)[:, 1], atol=1e-5)


def test_oracle_sinks_match_mlx_sdpa():
    """The oracle's sinks mean what MLX's (and so mlx-lm's) mean."""
    B, Hq, Hkv, L, S, D = 1, 6, 2, 5, 40, 64
    k0, k1, k2, k3 = mx.random.split(mx.random.key(5), 4)
    q = 3 * mx.random.normal((B, Hq, L, D), key=k0)
    k = mx.random.normal((B, Hkv, S, D), key=k1)
    v = mx.random.normal((B, Hkv, S, D), key=k2)
    sinks = mx.random.uniform(-2.0, 8.0, (Hq,), key=k3)
    scale = 1 / math.sqrt(D)
    from mlxq.kernels.segmented_attention import FpSegment

    got = segmented_attention(q, mx.arange(S - L, S, dtype=mx.int32)[None],
                              [FpSegment(k, v, mx.arange(S, dtype=mx.int32)[None])], scale,
                              block=16, sinks=sinks)
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal",
                                                sinks=sinks)
    assert _rel_err(got, want) < 1e-5
    without = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")
    assert _rel_err(want, without) > 0.05


def test_cases_cover_every_lanes_per_key_and_block_edges():
    plans = []
    for B, Lq, D, G, Hkv, bits, gs, sink, recent, lens, _ in CASES:
        rows = max(max(0, n - sink - w) for n, w in lens)
        plans.append((rows, plan_decode(B, Hkv, G, Lq, D, bits, rows, sink + recent)))
    assert {p.lanes_per_key for _, p in plans} == {1, 2, 4, 8}
    remainders = {rows % p.block for rows, p in plans if rows > p.block}
    assert 0 in remainders and 1 in remainders


def test_half_queries_give_half_output():
    case = (1, 1, 64, 3, 3, 4, 64, 4, 16, [(100, 16)], True)
    B, Lq, D, G, Hkv, bits, gs, sink, recent, lens, _ = case
    store, fp = _random_cache(B, Hkv, D, bits, gs, sink, recent, lens, mx.random.key(3))
    q = mx.random.normal((B, Hkv * G, Lq, D))
    args = (store, fp, lens, sink, recent, 0.125, bits, gs, mx.array(random_signs(D, 0, 0)),
            "emulate")
    out16 = segmented_decode_attention(q.astype(mx.float16), *args)
    out32 = segmented_decode_attention(q, *args)
    assert out16.dtype == mx.float16
    assert _rel_err(out16, out32) < 3e-3


@pytest.mark.parametrize("shape,store_rows,fp_slots,min_sg", [
    ((1, 8, 4, 128), 4096 - 260, 260, 1000),   # Llama-3-8B heads at 4K
    ((1, 8, 4, 128), 32768 - 260, 260, 1000),  # ... at 32K
    ((1, 3, 3, 64), 1024 - 260, 260, 750),     # the default model at 1K
])
def test_plans_fill_the_gpu(shape, store_rows, fp_slots, min_sg):
    B, Hkv, G, D = shape
    p = plan_decode(B, Hkv, G, 1, D, 4, store_rows, fp_slots)
    assert p.simdgroups(B, Hkv) >= min_sg
    assert p.threadgroups(B, Hkv) * SIMDGROUPS == p.simdgroups(B, Hkv)
    # Blocks are whole steps of the simdgroups and cover every key once.
    assert p.block % (SIMDGROUPS * 32 // p.lanes_per_key) == 0
    assert (p.store_blocks - 1) * p.block < store_rows <= p.store_blocks * p.block
    assert p.n_blocks - p.store_blocks == -(-fp_slots // p.block)


def test_plan_splits_rows_by_register_budget():
    p = plan_decode(1, 1, 16, 8, 128, 4, 100, 0)  # 128 rows, 8 per threadgroup at d128
    assert (p.rows_per_tg, p.row_chunks) == (8, 16)
    p = plan_decode(1, 1, 16, 1, 64, 4, 100, 0)   # 16 rows fit at d64
    assert (p.rows_per_tg, p.row_chunks) == (16, 1)


def test_bytes_read_counts_rows_and_slots():
    # int4 d128 g64: 64 + 64 bytes of codes and a half of metadata per group (4 groups):
    # 136 bytes per token per KV head, 0.27x of fp16's 512; d64: 68 (17 words).
    assert row_bytes(128, 4, 64) == 136 and row_bytes(64, 4, 64) == 68
    assert row_bytes(64, 8, 64) == 136       # 8-bit groups: a (scale, bias) pair each
    assert row_bytes(64, 4, 64, key_bits=8) == 104  # 64 + 32 + 4 (pair) + 2 (half) + pad
    assert bytes_read(1, 8, 1000, 260, 128, 4, 64) == 8 * (1000 * 136 + 260 * 512)
