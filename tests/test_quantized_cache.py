"""QuantizedKVCache: options, bytes, save/load/trim, rotation hook, chunked prefill, memory."""

import math
import types

import mlx.core as mx
import numpy as np
import pytest

from mlxq.cache import KVCache, load_cache, make_cache, save_cache
from mlxq.errors import MlxqError
from mlxq.kernels.blockwise_attention import (
    chunked_prefill_attention,
)
from mlxq.quantized_cache import FP_SLACK, QuantizedKVCache

B, HQ, HKV, D = 1, 6, 2, 64
SCALE = 1 / math.sqrt(D)


def _rand(*shape, key=None):
    return mx.random.normal(shape, key=key)


def _qkv(L, seed, hq=HQ, hkv=HKV, d=D, batch=B):
    k0, k1, k2 = mx.random.split(mx.random.key(seed), 3)
    return _rand(batch, hq, L, d, key=k0), _rand(batch, hkv, L, d, key=k1), _rand(batch, hkv, L, d, key=k2)


@pytest.fixture(autouse=True)
def reference_backend(monkeypatch):
    # These tests are about the cache's bookkeeping; the kernels have their own tests.
    monkeypatch.setenv("MLXQ_KERNELS", "reference")


def _dequant(parts, bits, gs):
    c, s, b = parts
    return mx.dequantize(c, s.astype(mx.float32), b.astype(mx.float32), group_size=gs, bits=bits)


# --- bad input ---------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [3, 2, 16])
def test_unsupported_bits_name_the_supported_ones(bits):
    with pytest.raises(MlxqError, match=r"kv_bits=\d+ .*4, 8"):
        QuantizedKVCache(bits=bits)


@pytest.mark.parametrize("gs", [48, 16, 256])
def test_unsupported_group_size_names_the_supported_ones(gs):
    with pytest.raises(MlxqError, match=r"32, 64, 128"):
        QuantizedKVCache(bits=4, group_size=gs)


@pytest.mark.parametrize("head_dim,gs", [(80, 64), (96, 64), (48, 32), (512, 64)])
def test_unsupported_head_dim_fails_before_any_work(head_dim, gs):
    cache = QuantizedKVCache(bits=4, group_size=gs)
    q, k, v = _qkv(3, 0, d=head_dim)
    with pytest.raises(MlxqError, match=r"head_dim=\d+ .*64, 96, 128, 256"):
        cache.attend(q, k, v, scale=SCALE)
    assert cache.offset == 0 and cache.keys is None


def test_mismatched_value_head_dim_is_an_error():
    cache = QuantizedKVCache()
    q, k, _ = _qkv(2, 0)
    with pytest.raises(MlxqError, match="one head_dim"):
        cache.attend(q, k, _rand(B, HKV, 2, 128), scale=SCALE)


def test_make_cache_builds_quantized_caches():
    model = types.SimpleNamespace(layers=[object()] * 3, head_dim=64)
    caches = make_cache(model, kv_bits=4, kv_group_size=32)
    assert len(caches) == 3 and all(isinstance(c, QuantizedKVCache) for c in caches)
    assert (caches[0].bits, caches[0].group_size) == (4, 32)
    # Rotation on by default, one per layer (its own signs), stored with the cache state.
    metas = [c.meta_state["rotation"] for c in caches]
    assert [m["layer_index"] for m in metas] == [0, 1, 2]
    assert not mx.array_equal(caches[0].rotation.matrix, caches[1].rotation.matrix)
    plain = make_cache(model, kv_bits=8, kv_rotation=False, kv_recent=0)
    assert all(c.rotation is None and c.recent == 0 for c in plain)
    with pytest.raises(MlxqError):
        make_cache(model, kv_bits=4, kv_group_size=48)


# --- bytes -------------------------------------------------------------------------------
def test_int4_group64_cache_is_under_030_of_fp16():
    q4 = QuantizedKVCache(bits=4, group_size=64)
    fp16 = KVCache(dtype=mx.float16)
    for L in (300, 1, 1):
        q, k, v = _qkv(L, L)
        q4.attend(q, k, v, scale=SCALE)
        fp16.attend(q.astype(mx.float16), k.astype(mx.float16), v.astype(mx.float16), scale=SCALE)
    assert q4.offset == fp16.offset == 302 and q4.capacity == fp16.capacity == 512
    assert q4.fp16_nbytes == fp16.nbytes
    assert q4.nbytes <= 0.30 * fp16.nbytes
    assert q4.nbytes == pytest.approx(4.5 / 16 * fp16.nbytes)
    q8 = QuantizedKVCache(bits=8, group_size=32)
    q8.attend(*_qkv(10, 1), scale=SCALE)
    assert q8.nbytes == pytest.approx(9 / 16 * q8.fp16_nbytes)


def test_buffers_grow_in_steps():
    cache = QuantizedKVCache(step=256)
    for L, cap in ((200, 256), (56, 256), (1, 512), (600, 1024)):
        cache.attend(*_qkv(L, L), scale=SCALE)
        assert cache.capacity == cap
    assert cache.offset == 857


# --- save / load / trim -------------------------------------------------------------------
def test_save_load_roundtrip_is_exact(tmp_path):
    caches = [QuantizedKVCache(bits=4), QuantizedKVCache(bits=8, group_size=32)]
    for c in caches:
        for L, seed in ((40, 1), (1, 2)):
            c.attend(*_qkv(L, seed), scale=SCALE)
    path = tmp_path / "cache.safetensors"
    save_cache(path, caches)
    loaded = load_cache(path)
    for a, b in zip(caches, loaded):
        assert isinstance(b, QuantizedKVCache)
        assert (b.bits, b.group_size, b.offset) == (a.bits, a.group_size, 41)
        for x, y in zip(a.state["keys"] + a.state["values"], b.state["keys"] + b.state["values"]):
            assert x.dtype == y.dtype and mx.array_equal(x, y)
        # Both continue identically (the loaded one grows from a capacity of 41).
        q, k, v = _qkv(3, 9)
        assert mx.array_equal(a.attend(q, k, v, scale=SCALE), b.attend(q, k, v, scale=SCALE))


def test_trim_then_append_equals_never_having_the_trimmed_tokens():
    trimmed, fresh = QuantizedKVCache(), QuantizedKVCache()
    first, extra, new = _qkv(30, 1), _qkv(5, 2), _qkv(4, 3)
    trimmed.attend(*first, scale=SCALE)
    trimmed.attend(*extra, scale=SCALE)
    assert trimmed.is_trimmable() and trimmed.trim(5) == 5 and trimmed.offset == 30
    assert trimmed.trim(100) == 30 and trimmed.offset == 0
    trimmed.attend(*first, scale=SCALE)
    fresh.attend(*first, scale=SCALE)
    assert mx.array_equal(trimmed.attend(*new, scale=SCALE), fresh.attend(*new, scale=SCALE))
    for x, y in zip(trimmed.state["keys"] + trimmed.state["values"],
                    fresh.state["keys"] + fresh.state["values"]):
        assert mx.array_equal(x, y)


# --- rotation hook -------------------------------------------------------------------------
class _Rotation:
    def __init__(self, d, seed=0):
        q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
        self.R = mx.array(q.astype(np.float32))
        self.seed = seed

    def forward(self, x):
        return x @ self.R

    def inverse(self, y):
        return y @ self.R.T

    def to_meta(self):
        return {"seed": self.seed}


def test_rotation_is_applied_to_stored_keys_and_undone_on_output():
    rot = _Rotation(D)
    cache = QuantizedKVCache(bits=8, group_size=32, rotation=rot)
    plain = KVCache(dtype=mx.float32)
    for L, seed in ((20, 1), (1, 2)):
        q, k, v = _qkv(L, seed)
        out = cache.attend(q, k, v, scale=SCALE)
        ref = plain.attend(q, k, v, scale=SCALE)
        # 8-bit error only: without the inverse the output would be in the rotated basis.
        assert float(mx.abs(out - ref).max()) < 0.03 * float(mx.abs(ref).max())
    stored = _dequant(cache.state["keys"], 8, 32)
    want = plain.state[0] @ rot.R
    assert float(mx.abs(stored - want).max()) < 0.05


# --- chunked prefill ----------------------------------------------------------------------
@pytest.mark.parametrize("hq,hkv", [(6, 2), (4, 4)])
def test_chunked_prefill_equals_attention_over_dequantized_cache_plus_chunk(hq, hkv):
    cached, L, gs, bits = 150, 40, 64, 4
    k0, k1 = mx.random.split(mx.random.key(5))
    old_k, old_v = _rand(2, hkv, cached, D, key=k0), _rand(2, hkv, cached, D, key=k1)
    cache = QuantizedKVCache(bits=bits, group_size=gs)
    cache.attend(*_qkv(cached, 4, hq=hq, hkv=hkv, batch=2)[:1], old_k, old_v, scale=SCALE)
    q, k, v = _qkv(L, 6, hq=hq, hkv=hkv, batch=2)
    # Small blocks: several cache blocks and several (causally masked) chunk blocks.
    out = chunked_prefill_attention(q, k, v, cache.keys, cache.values, cached, SCALE, gs,
                                    bits, block=64)
    full_k = mx.concatenate([_dequant([x[..., :cached, :] for x in cache.keys], bits, gs), k], 2)
    full_v = mx.concatenate([_dequant([x[..., :cached, :] for x in cache.values], bits, gs), v], 2)
    ref = mx.fast.scaled_dot_product_attention(q, full_k, full_v, scale=SCALE, mask="causal")
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=1e-4)
    # The cache's own prefill path is this function.
    via_cache = cache.attend(q, k, v, scale=SCALE)
    np.testing.assert_allclose(np.asarray(via_cache), np.asarray(ref), atol=2e-5, rtol=1e-4)


def test_long_prefill_peak_memory_not_above_fp16_cache():
    """A chunk after a long context: no L x S scores, no dequantized copy of the cache."""
    hq, hkv, d, context, L = 8, 2, 64, 4096, 512

    def peak(cache):
        for start in range(0, context, 1024):
            q, k, v = _qkv(1024, start, hq=hq, hkv=hkv, d=d)
            cache.attend(q, k, v, scale=SCALE)
            mx.eval(cache.state)
        q, k, v = _qkv(L, 3, hq=hq, hkv=hkv, d=d)
        mx.eval(q, k, v)
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(cache.attend(q, k, v, scale=SCALE))
        return mx.get_peak_memory() - base

    fp_peak = peak(KVCache(dtype=mx.float32))
    int4_peak = peak(QuantizedKVCache(bits=4, group_size=64))
    assert int4_peak <= fp_peak


def test_hadamard_rotation_survives_save_and_load(tmp_path):
    from mlxq.rotation import HadamardRotation

    cache = QuantizedKVCache(bits=4, rotation=HadamardRotation(D, seed=3, layer_index=1))
    cache.attend(*_qkv(12, 1), scale=SCALE)
    save_cache(tmp_path / "c.safetensors", [cache])
    (loaded,) = load_cache(tmp_path / "c.safetensors")
    assert loaded.rotation.to_meta() == cache.rotation.to_meta()
    q, k, v = _qkv(2, 2)
    assert mx.array_equal(cache.attend(q, k, v, scale=SCALE), loaded.attend(q, k, v, scale=SCALE))


def test_decode_step_does_not_copy_the_cache(monkeypatch):
    """With the kernels, a decode step allocates nothing cache-sized in MLX: the new token
    is slice-assigned in place and the kernel reads the whole buffers (no strided view, no
    dequantized copy). (The emulator's own numpy copies are outside MLX's allocator.)"""
    monkeypatch.setenv("MLXQ_KERNELS", "emulate")
    cache = QuantizedKVCache(bits=4, group_size=64)
    for seed in range(3):
        cache.attend(*_qkv(1000, seed, hq=8, hkv=4, d=128), scale=SCALE)
        mx.eval(cache.state)
    step = _qkv(1, 7, hq=8, hkv=4, d=128)
    mx.eval(cache.attend(*step, scale=SCALE))  # compile outside the measurement
    mx.eval(step)
    for _ in range(2):
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(cache.attend(*step, scale=SCALE))
        assert mx.get_peak_memory() - base < 0.05 * cache.nbytes
    assert cache.capacity == 3072 and cache.offset == 3003


# --- full-precision window of the newest tokens -----------------------------------------
def _step_reference(cache, q, k, v):
    """What attend must return: exact attention over the cache's state before the call
    (sink, dequantized buffers, window) followed by the new tokens."""
    st = cache.state
    ks, vs = [], []
    if "sink_keys" in st:
        ks.append(st["sink_keys"].astype(mx.float32))
        vs.append(st["sink_values"].astype(mx.float32))
    if "keys" in st:
        ks.append(_dequant(st["keys"], cache.bits, cache.group_size))
        vs.append(_dequant(st["values"], cache.bits, cache.group_size))
    if "window_keys" in st:
        ks.append(st["window_keys"].astype(mx.float32))
        vs.append(st["window_values"].astype(mx.float32))
    # The window holds float16, like an fp16 cache.
    k, v = (x.astype(mx.float16).astype(mx.float32) for x in (k, v))
    return mx.fast.scaled_dot_product_attention(
        q, mx.concatenate([*ks, k], 2), mx.concatenate([*vs, v], 2), scale=SCALE,
        mask="causal" if q.shape[2] > 1 else None)


@pytest.mark.parametrize("sink", [0, 3])
@pytest.mark.parametrize("backend", ["reference", "emulate"])
def test_window_cache_attends_quantized_old_and_exact_recent_tokens(monkeypatch, backend, sink):
    monkeypatch.setenv("MLXQ_KERNELS", backend)
    cache = QuantizedKVCache(bits=4, group_size=32, recent=16, sink=sink)
    seen = 0
    # Prefill chunks and decode steps; the single steps cross the fp buffer's end (the
    # window moves back next to the sink) more than once.
    steps = [(10, 1), (1, 2), (30, 3), (3, 4), (8, 5), (1, 6)] + [(1, s) for s in range(7, 80)]
    for L, seed in steps:
        q, k, v = _qkv(L, seed)
        want = _step_reference(cache, q, k, v)
        out = cache.attend(q, k, v, scale=SCALE)
        np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=3e-5, rtol=1e-4)
        seen += L
        assert cache.offset == seen
        assert cache.window_length == min(16, seen)
        assert cache.sink_length == min(sink, seen - cache.window_length)
        # The full-precision buffer stays bounded: no growth per step, and a prefill
        # chunk's room is given back once its tokens are quantized.
        assert cache.fp_keys.shape[2] <= 16 + sink + 2 * FP_SLACK + 8
        assert cache.quantized_length == seen - cache.window_length - cache.sink_length


def test_window_keeps_recent_tokens_exact():
    """With every token still inside the window the output is attention over float16 K/V
    (an fp16 cache); the int4 error appears only for tokens that left it."""
    q, k, v = _qkv(40, 9)
    exact = KVCache(dtype=mx.float32).attend(q, k, v, scale=SCALE)
    fp16 = KVCache(dtype=mx.float16).attend(q, k, v, scale=SCALE).astype(mx.float32)
    inside = QuantizedKVCache(bits=4, recent=64).attend(q, k, v, scale=SCALE)
    np.testing.assert_allclose(np.asarray(inside), np.asarray(fp16), atol=2e-3, rtol=1e-2)
    assert inside.dtype == mx.float32
    cache = QuantizedKVCache(bits=4, recent=8)
    cache.attend(q[:, :, :32], k[:, :, :32], v[:, :, :32], scale=SCALE)
    out = cache.attend(q[:, :, 32:], k[:, :, 32:], v[:, :, 32:], scale=SCALE)
    assert float(mx.abs(out - exact[:, :, 32:]).max()) > 1e-3


def test_window_cache_save_load_and_trim(tmp_path):
    from mlxq.rotation import HadamardRotation

    cache = QuantizedKVCache(bits=4, recent=12, sink=2,
                             rotation=HadamardRotation(D, seed=1, layer_index=2))
    cache.attend(*_qkv(40, 1), scale=SCALE)
    save_cache(tmp_path / "c.safetensors", [cache])
    (loaded,) = load_cache(tmp_path / "c.safetensors")
    assert (loaded.offset, loaded.window_length, loaded.sink_length) == (40, 12, 2)
    assert (loaded.recent, loaded.sink) == (12, 2)
    q, k, v = _qkv(3, 2)
    assert mx.array_equal(cache.attend(q, k, v, scale=SCALE), loaded.attend(q, k, v, scale=SCALE))
    # Trimming takes the newest tokens: the window, then the quantized ones, then the sink.
    assert cache.trim(5) == 5 and (cache.offset, cache.window_length) == (38, 7)
    assert cache.trim(20) == 20 and (cache.offset, cache.window_length) == (18, 0)
    assert (cache.quantized_length, cache.sink_length) == (16, 2)
    assert cache.trim(17) == 17 and (cache.quantized_length, cache.sink_length) == (0, 1)
    # One trim through the window, the quantized tokens and into the sink.
    full = _qkv(40, 1)
    cache = QuantizedKVCache(bits=4, recent=12, sink=2)
    cache.attend(*full, scale=SCALE)
    assert cache.trim(39) == 39
    assert (cache.offset, cache.window_length, cache.quantized_length,
            cache.sink_length) == (1, 0, 0, 1)
    q, k, v = _qkv(3, 2)
    exact = KVCache(dtype=mx.float32)
    exact.attend(*(x[:, :, :1] for x in full), scale=SCALE)
    np.testing.assert_allclose(np.asarray(cache.attend(q, k, v, scale=SCALE)),
                               np.asarray(exact.attend(q, k, v, scale=SCALE)),
                               atol=2e-3, rtol=1e-2)


def test_prefill_chunk_room_is_given_back_and_attention_stays_exact():
    cache = QuantizedKVCache(bits=4, group_size=32, recent=16, sink=2)
    cache.attend(*_qkv(200, 1), scale=SCALE)
    # 200 slots were needed for the chunk; after quantizing, only sink + window + slack.
    assert cache.fp_keys.shape[2] == 2 + 16 + FP_SLACK
    assert cache.nbytes < 200 * 2 * HKV * D * 2  # far below the chunk's float16 size
    for seed in range(2, 6):
        q, k, v = _qkv(3, seed)
        want = _step_reference(cache, q, k, v)
        out = cache.attend(q, k, v, scale=SCALE)
        np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=3e-5, rtol=1e-4)
