"""Fused int4/int8 decode attention (through the emulator) vs its reference.

The reference dequantizes the *same* codes and runs exact float32 attention, so the only
difference is float rounding order: a tight tolerance catches any wrong index, mask or merge.
The parameter list covers every value of every axis without the full product (CI time).
"""

import math

import mlx.core as mx
import numpy as np
import pytest

from mlxq.kernels.blockwise_attention import blockwise_decode_attention
from mlxq.kernels.decode_attention import (
    plan_decode,
    quantized_decode_attention,
    reference_decode_attention,
    window_attention,
)

STEP = 256

# (batch, q_tokens, head_dim, gqa, kv_heads, length, bits, group_size)
CASES = [
    (1, 1, 64, 1, 2, 1, 4, 64),
    (2, 1, 128, 2, 2, 31, 4, 32),
    (1, 2, 64, 3, 3, 32, 8, 64),
    (2, 3, 128, 4, 1, 33, 4, 128),
    (1, 4, 64, 8, 1, 1000, 4, 64),     # 32 rows: 8 simdgroups
    (2, 5, 128, 16, 1, 257, 4, 64),    # 80 rows in 3 chunks; 2 blocks, the 2nd of 1 token
    (1, 6, 64, 2, 4, 1000, 8, 32),
    (1, 7, 128, 1, 2, 513, 8, 128),    # 3 blocks of 256, the last of 1 token
    (1, 8, 64, 16, 1, 100, 4, 32),     # 128 rows in 4 chunks
    (2, 8, 128, 8, 1, 40, 4, 64),
    (1, 1, 96, 3, 1, 300, 4, 32),      # head_dim 96: 3 output elements per lane
    (1, 2, 256, 2, 1, 600, 8, 64),     # head_dim 256, 8-bit: fewer rows per threadgroup
    (1, 1, 128, 16, 1, 2048, 8, 128),
    (1, 1, 128, 4, 2, 8200, 4, 64),    # long: 33 blocks merged
]


def _random_cache(B, Hkv, length, D, bits, gs, key, cap=None):
    """Whole buffers of capacity > length (unless given); the unused tail has NaN scales,
    so reading past the valid length poisons the output."""
    if cap is None:
        cap = -(-length // STEP) * STEP + (STEP if length % STEP == 0 else 0)
    x = mx.random.normal((B, Hkv, cap, D), key=key)
    codes, scales, biases = mx.quantize(x.astype(mx.float16), group_size=gs, bits=bits)
    valid = (mx.arange(cap) < length)[None, None, :, None]
    nan = mx.array(float("nan"), dtype=mx.float16)
    return codes, mx.where(valid, scales, nan), mx.where(valid, biases, nan)


def _run(case, dtype=mx.float32, seed=0, cap=None):
    B, Lq, D, G, Hkv, length, bits, gs = case
    k0, k1, k2 = mx.random.split(mx.random.key(seed), 3)
    kparts = _random_cache(B, Hkv, length, D, bits, gs, k0, cap)
    vparts = _random_cache(B, Hkv, length, D, bits, gs, k1, cap)
    # Scaled-up queries give peaked softmax weights, so a wrong key index shows.
    q = (3 * mx.random.normal((B, Hkv * G, Lq, D), key=k2)).astype(dtype)
    scale = 1 / math.sqrt(D)
    args = (q, *kparts, *vparts, length, scale, gs, bits)
    out = quantized_decode_attention(*args, backend="emulate")
    ref = reference_decode_attention(*args)
    return out, ref


def _rel_err(out, ref):
    out, ref = np.asarray(out.astype(mx.float32)), np.asarray(ref.astype(mx.float32))
    return np.abs(out - ref).max() / np.abs(ref).max()


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-L{}-D{}-G{}-H{}-S{}-b{}-g{}".format(*c))
def test_kernel_matches_reference(case):
    out, ref = _run(case)
    assert out.shape == ref.shape and out.dtype == mx.float32
    assert np.isfinite(np.asarray(out)).all()
    assert _rel_err(out, ref) < 1e-4


def test_float16_queries_give_float16_output():
    out, ref = _run((1, 2, 128, 4, 2, 700, 4, 64), dtype=mx.float16, seed=1)
    assert out.dtype == mx.float16
    assert _rel_err(out, ref) < 2e-3  # half output rounding


def test_plan_fills_the_gpu_at_long_context():
    # Llama-3-8B shapes at batch 1: 8 KV heads, GQA 4.
    p = plan_decode(1, 8, 4, 1, 128, 4, 64, 32768)
    assert p.n_blocks * 8 >= 256 and p.block == 1024
    p = plan_decode(1, 8, 4, 1, 128, 4, 64, 8192)
    assert p.n_blocks * 8 >= 256 and p.block == 256
    # Short context: one block, no merge pass.
    assert plan_decode(1, 8, 4, 1, 128, 4, 64, 200).n_blocks == 1
    # Rows beyond one threadgroup's budget are split into chunks, evenly.
    p = plan_decode(1, 1, 16, 8, 128, 4, 64, 100)
    assert p.row_chunks == 4 and p.rows_per_tg == 32 and p.simdgroups == 8


@pytest.mark.parametrize("case", [(2, 1, 64, 3, 2, 700, 4, 64), (1, 5, 128, 2, 2, 300, 8, 32)])
def test_blockwise_reference_equals_dense_reference(case):
    # The reference backend's long-context path (key blocks, online softmax).
    B, Lq, D, G, Hkv, length, bits, gs = case
    k0, k1, k2 = mx.random.split(mx.random.key(3), 3)
    kparts = _random_cache(B, Hkv, length, D, bits, gs, k0)
    vparts = _random_cache(B, Hkv, length, D, bits, gs, k1)
    q = 3 * mx.random.normal((B, Hkv * G, Lq, D), key=k2)
    scale = 1 / math.sqrt(D)
    dense = reference_decode_attention(q, *kparts, *vparts, length, scale, gs, bits)
    blocks = blockwise_decode_attention(q, kparts, vparts, length, scale, gs, bits, block=64)
    assert _rel_err(blocks, dense) < 1e-5


# --- quantized tokens + a full-precision window of the newest ones ----------------------
# (batch, q_tokens, head_dim, gqa, kv_heads, cached, window, bits, group_size, sink)
WINDOW_CASES = [
    (1, 1, 64, 3, 3, 40, 64, 4, 64, 0),
    (1, 1, 64, 3, 3, 40, 64, 4, 64, 4),
    (2, 3, 128, 4, 2, 600, 35, 4, 32, 3),  # 3 blocks of quantized tokens merged with the window
    (1, 8, 64, 8, 1, 257, 72, 8, 64, 0),   # rows-as-heads: 64 rows split over chunks
    (1, 5, 96, 2, 2, 33, 5, 4, 32, 0),     # the window is exactly the queries' own tokens
    (1, 2, 64, 2, 2, 0, 9, 4, 64, 4),      # sink and window, nothing quantized yet
]


def _window_reference(q, kparts, vparts, cached, win_k, win_v, scale, gs, bits, sink):
    deq = [mx.dequantize(c[..., :cached, :], s[..., :cached, :].astype(mx.float32),
                         b[..., :cached, :].astype(mx.float32), group_size=gs, bits=bits)
           for c, s, b in (kparts, vparts) if cached]
    k = mx.concatenate([sink[0], *deq[:1], win_k], axis=2)
    v = mx.concatenate([sink[1], *deq[1:], win_v], axis=2)
    return mx.fast.scaled_dot_product_attention(
        q, k, v, scale=scale, mask="causal" if q.shape[2] > 1 else None)


@pytest.mark.parametrize("backend", ["emulate", "reference"])
@pytest.mark.parametrize("case", WINDOW_CASES,
                         ids=lambda c: "B{}-L{}-D{}-G{}-H{}-S{}-W{}-b{}-g{}-sink{}".format(*c))
def test_window_attention_matches_dequantized_plus_window(case, backend):
    B, Lq, D, G, Hkv, cached, W, bits, gs, S = case
    ks = mx.random.split(mx.random.key(11), 7)
    kparts = _random_cache(B, Hkv, cached, D, bits, gs, ks[0])
    vparts = _random_cache(B, Hkv, cached, D, bits, gs, ks[1])
    # Window and sink keys larger than the cached ones: a dropped or misplaced one shows.
    win_k = 2 * mx.random.normal((B, Hkv, W, D), key=ks[2])
    win_v = mx.random.normal((B, Hkv, W, D), key=ks[3])
    sink = (2 * mx.random.normal((B, Hkv, S, D), key=ks[5]),
            mx.random.normal((B, Hkv, S, D), key=ks[6]) + 1)
    q = 3 * mx.random.normal((B, Hkv * G, Lq, D), key=ks[4])
    scale = 1 / math.sqrt(D)
    out = window_attention(q, win_k, win_v, kparts, vparts, cached, scale, gs, bits,
                           backend=backend, sink_keys=sink[0] if S else None,
                           sink_values=sink[1] if S else None)
    ref = _window_reference(q, kparts, vparts, cached, win_k, win_v, scale, gs, bits, sink)
    assert out.shape == ref.shape
    assert _rel_err(out, ref) < 1e-4
