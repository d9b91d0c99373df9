"""QuantizedKVCache: options, bytes, growth, save/load/trim, and what attention sees.

The central test keeps a shadow of every token the cache was given (its rotated float16
value and its dequantized int4 value) and checks each step's output against exact
attention over the keys the format promises: float16 for the sink and the newest
``recent`` tokens (a prefill chunk longer than that: the whole chunk), int4 for the rest.
"""

import math
import types

import mlx.core as mx
import numpy as np
import pytest

from kv_quant_model import quantize
from mlxq.attention import attend
from mlxq.cache import KVCache, load_cache, make_cache, save_cache
from mlxq.errors import MlxqError
from mlxq.kernels.kv_layout import CENTER_BLOCK
from mlxq.kv_config import KVCacheConfig
from mlxq.quantized_cache import QuantizedKVCache
from mlxq.rotation import HadamardRotation

B, HQ, HKV, D = 1, 6, 2, 64
SCALE = 1 / math.sqrt(D)


def _qkv(L, seed, hq=HQ, hkv=HKV, d=D, batch=B):
    k0, k1, k2 = mx.random.split(mx.random.key(seed), 3)
    return (mx.random.normal((batch, hq, L, d), key=k0),
            mx.random.normal((batch, hkv, L, d), key=k1),
            mx.random.normal((batch, hkv, L, d), key=k2))


def _cache(backend="reference", **options):
    config = KVCacheConfig(**{"bits": 4, "rotation": False, "recent": 0, "sink": 0,
                              **options})
    return QuantizedKVCache(config, layer_index=1, backend=backend)


# --- options -----------------------------------------------------------------------------
@pytest.mark.parametrize("options,message", [
    ({"bits": 3}, r"kv_bits=3 .*16, 8, 4"),
    ({"bits": 4, "group_size": 48}, r"kv_group_size=48 .*32, 64, 128"),
    ({"bits": 4, "recent": -1}, r"kv_recent must be a non-negative"),
    ({"bits": 4, "sink": 1.5}, r"kv_sink must be a non-negative"),
    ({"bits": 4, "step": 0}, r"step must be a positive"),
    ({"bits": 4, "rotation": "yes"}, r"kv_rotation must be True or False"),
    ({"bits": 4, "key_bits": 16}, r"kv_key_bits=16 .*8 or 4"),
    ({"bits": 16, "key_bits": 8}, r"kv_key_bits=8 .*with kv_bits 8 or 4"),
])
def test_bad_options_are_one_clear_error(options, message):
    with pytest.raises(MlxqError, match=message):
        KVCacheConfig(**options)


@pytest.mark.parametrize("head_dim,gs", [(80, 64), (96, 64), (48, 32), (512, 64)])
def test_unsupported_head_dim_fails_before_any_work(head_dim, gs):
    cache = _cache(group_size=gs)
    q, k, v = _qkv(3, 0, d=head_dim)
    with pytest.raises(MlxqError, match=r"head_dim=\d+ .*64, 96, 128, 256"):
        attend(q, k, v, cache, SCALE)
    assert cache.offset == 0 and cache.store is None
    with pytest.raises(MlxqError, match=r"head_dim=\d+"):
        make_cache(types.SimpleNamespace(layers=[0], head_dim=head_dim), kv_bits=4,
                   kv_group_size=gs)


def test_mismatched_value_head_dim_is_an_error():
    cache = _cache()
    q, k, _ = _qkv(2, 0)
    with pytest.raises(MlxqError, match="one head_dim"):
        attend(q, k, mx.zeros((B, HKV, 2, 128)), cache, SCALE)


def test_key_bits_name_a_format_of_their_own():
    from mlxq.evaluate import parse_format

    k8 = KVCacheConfig(4, key_bits=8)
    assert (k8.keys_bits, k8.name) == (8, "int4-k8-g64-rot-kc-w304-s4")
    assert parse_format(k8.name) == k8 and parse_format("int8-k4-g32") == KVCacheConfig(
        8, 32, rotation=False, recent=0, sink=0, key_center=False, key_bits=4)
    # The same bits spelled out are the same config (one name per layout).
    assert KVCacheConfig(4, key_bits=4) == KVCacheConfig(4)
    assert KVCacheConfig(4, key_bits=4).name == "int4-g64-rot-kc-w304-s4"
    # Rows: 8-bit key codes, 4-bit value codes; 4-bit groups' metadata is one half each,
    # 8-bit groups' a (scale, bias) pair (rows padded to whole words).
    fp16 = 4 * 64
    q4, q8 = (_cache(key_bits=kb, key_center=False) for kb in (None, 8))
    for c in (q4, q8):
        attend(*_qkv(10, 1), c, SCALE)
    assert q4.store.shape[-1] * 4 == 64 // 2 * 2 + 4 and q8.store.shape[-1] * 4 == 64 + 32 + 8
    assert q8.nbytes / q8.fp16_nbytes == pytest.approx((64 + 32 + 8) / fp16)


def test_gemma3_defaults_to_8_bit_keys_under_int4(monkeypatch):
    """The per-model default (kv_defaults.py) fills in unset key bits only, only for 4-bit
    values, only for Gemma 3; a KVCacheConfig passed as such is taken as it is."""
    monkeypatch.setenv("MLXQ_KERNELS", "emulate")

    def model(model_type):
        return types.SimpleNamespace(layers=[object()] * 2, head_dim=64, model_type=model_type)

    def keys(m, config=None, **options):
        return make_cache(m, config, **options)[0].config.keys_bits

    assert keys(model("gemma3_text"), kv_bits=4) == 8
    assert keys(model("gemma3_text"), kv_bits=4, kv_key_bits=4) == 4
    assert keys(model("gemma3_text"), kv_bits=8) == 8
    assert keys(model("gemma3_text"), KVCacheConfig(4)) == 4
    assert keys(model("llama"), kv_bits=4) == keys(model(None), kv_bits=4) == 4


def test_make_cache_builds_quantized_caches_with_one_config(monkeypatch):
    monkeypatch.setenv("MLXQ_KERNELS", "emulate")
    model = types.SimpleNamespace(layers=[object()] * 3, head_dim=64)
    caches = make_cache(model, kv_bits=4, kv_group_size=32)
    assert len(caches) == 3 and all(isinstance(c, QuantizedKVCache) for c in caches)
    assert caches[0].config == KVCacheConfig(4, 32)  # defaults: rotation, 256 + 4 in fp16
    assert [c.layer_index for c in caches] == [0, 1, 2]
    # The backend is resolved once, when the cache is made.
    monkeypatch.setenv("MLXQ_KERNELS", "reference")
    assert all(c.backend == "emulate" for c in caches)
    # One rotation per layer, each with its own signs.
    for c in caches:
        attend(*_qkv(2, 0), c, SCALE)
    assert not mx.array_equal(caches[0].rotation.matrix, caches[1].rotation.matrix)
    same = make_cache(model, KVCacheConfig(8, rotation=False, recent=0))
    assert all(c.rotation is None and c.recent == 0 for c in same)
    assert all(isinstance(c, KVCache) for c in make_cache(model))


# --- memory ------------------------------------------------------------------------------
def test_int4_store_is_028_of_fp16():
    q4 = _cache()
    fp16 = KVCache(dtype=mx.float16)
    for L in (300, 1, 1):
        q, k, v = _qkv(L, L)
        attend(q, k, v, q4, SCALE)
        attend(q.astype(mx.float16), k.astype(mx.float16), v.astype(mx.float16), fp16, SCALE)
    assert q4.offset == fp16.offset == 302 and q4.store.shape[2] == fp16.capacity == 512
    assert q4.fp16_nbytes == fp16.nbytes
    # int4 with group 64 is 4.25 bits a value (a 16-bit scale and zero point per group);
    # the key centers add 2*D bytes per CENTER_BLOCK tokens (fp16: 4*D a token).
    centers = 1 / (2 * CENTER_BLOCK)
    assert q4.nbytes == pytest.approx((4.25 / 16 + centers) * fp16.nbytes)
    q8 = _cache(bits=8, group_size=32)
    attend(*_qkv(10, 1), q8, SCALE)
    assert q8.nbytes == pytest.approx((9 / 16 + centers) * q8.fp16_nbytes)


def test_buffers_grow_in_steps_and_the_window_by_what_it_holds():
    cache, windowed = _cache(recent=0, sink=0), _cache(recent=100_000, sink=0)
    for L, cap in ((200, 256), (56, 256), (1, 512), (600, 1024)):
        for c in (cache, windowed):
            attend(*_qkv(L, L), c, SCALE)
        assert cache.store.shape[2] == cap
    assert cache.offset == windowed.offset == 857
    # A huge window allocates as it fills (float16 slots rounded up to 64), and its tokens
    # have no store rows until they leave it.
    assert windowed.fp.shape[2] == 896 and windowed.store is None


# --- what attention sees -----------------------------------------------------------------
class Shadow:
    """Every token as the cache should hold it: rotated float16, and dequantized (keys of
    each CENTER_BLOCK-row block of the store quantized minus the previous block's mean as stored)."""

    def __init__(self, cache):
        self.c = cache
        self.fp = []     # per token: (k, v) float32 of the float16 rotated value
        self.deq = []
        self.window = 0  # newest tokens read in float16
        self.center = mx.zeros((B, HKV, 1, D), mx.float32)  # the current block's key center
        self.block = []  # the current block's keys as stored, less its center

    def _dequantized(self, x, keys=False):
        # What the stored row reads back as (kv_quant_model: the documented rule in numpy)
        c = self.c
        bits = c.config.keys_bits if keys else c.bits
        return mx.array(quantize(np.asarray(x.astype(mx.float32)), bits, c.group_size)[2])

    def add(self, k, v):
        c = self.c
        rot = c.rotation
        if rot is None and c.config.rotation:
            rot = HadamardRotation(D, c.config.seed, c.layer_index)
        if rot is not None:
            k, v = rot.forward(k), rot.forward(v)
        k16, v16 = k.astype(mx.float16), v.astype(mx.float16)
        first = len(self.fp)  # the chunk's first position
        for t in range(k.shape[2]):
            row = len(self.fp) - c.sink  # the token's store row (< 0: in the sink)
            kt, vt = k16[:, :, t:t + 1], v16[:, :, t:t + 1]
            center = self.center if row >= 0 else mx.zeros(kt.shape, mx.float32)
            dk = self._dequantized(kt.astype(mx.float32) - center, keys=True)
            self.fp.append((kt[:, :, 0].astype(mx.float32), vt[:, :, 0].astype(mx.float32)))
            self.deq.append(((dk + center)[:, :, 0], self._dequantized(vt)[:, :, 0]))
            if c.config.key_center and row >= 0:
                self.block.append(dk)
                if len(self.block) == CENTER_BLOCK:
                    self._finish_block(first)
        self.window = min(c.recent, self.window + k.shape[2], max(0, len(self.fp) - c.sink))
        return rot

    def _finish_block(self, first):
        """A block is complete: with its float16 keys at hand (all in this chunk, or all in
        the window as it is now), its own mean becomes its center and it is quantized
        again; else the next center is its mean as stored."""
        c = self.c
        n, start = len(self.fp), len(self.fp) - CENTER_BLOCK
        window = min(c.recent, self.window + n - first, max(0, n - c.sink))
        if start >= first or window >= CENTER_BLOCK:
            keys = mx.stack([self.fp[p][0] for p in range(start, n)], axis=2)
            self.center = keys.mean(axis=2, keepdims=True).astype(mx.float16).astype(mx.float32)
            for p in range(start, n):
                dk = self._dequantized(self.fp[p][0][:, :, None] - self.center, keys=True)
                self.deq[p] = ((dk + self.center)[:, :, 0], self.deq[p][1])
        else:
            mean = mx.concatenate(self.block, axis=2).mean(axis=2, keepdims=True)
            self.center = (mean + self.center).astype(mx.float16).astype(mx.float32)
        self.block = []

    def expected(self, q, L, rot):
        n, S = len(self.fp), self.c.sink
        fp_from = n - (L if 8 < L and L > self.window else self.window)
        keys = [self.fp[p] if p < S or p >= fp_from else self.deq[p] for p in range(n)]
        K = mx.stack([k for k, _ in keys], axis=2)
        V = mx.stack([v for _, v in keys], axis=2)
        qr = rot.forward(q) if rot is not None else q
        out = mx.fast.scaled_dot_product_attention(qr, K, V, scale=SCALE,
                                                   mask="causal" if L > 1 else None)
        return rot.inverse(out) if rot is not None else out


STEPS = [(10, 1), (1, 2), (30, 3), (3, 4), (8, 5), (1, 6)] + [(1, s) for s in range(7, 40)] \
    + [(40, 40), (1, 41), (2, 42), (70, 43), (1, 44)] \
    + [(260, 45), (1, 46), (2, 47)]  # key-center blocks end mid-chunk; one chunk holds one


@pytest.mark.parametrize("backend,options", [
    ("reference", {"recent": 16, "sink": 3}),
    ("reference", {"recent": 16, "sink": 0, "rotation": True}),
    ("reference", {"recent": 0, "sink": 0, "bits": 8}),
    ("reference", {"recent": 128, "sink": 1}),  # blocks re-centered from the window
    ("reference", {"recent": 16, "sink": 3, "key_bits": 8}),  # 8-bit keys, 4-bit values
    ("emulate", {"recent": 128, "sink": 2, "rotation": True, "key_bits": 8}),
    ("emulate", {"recent": 16, "sink": 3, "rotation": True}),
    ("emulate", {"recent": 5, "sink": 0, "group_size": 32}),
    ("emulate", {"recent": 0, "sink": 2}),
    ("emulate", {"recent": 16, "sink": 3, "rotation": True, "key_center": False}),
])
def test_each_step_attends_float16_sink_and_window_and_int4_rest(backend, options):
    cache = _cache(backend, **options)
    shadow = Shadow(cache)
    for L, seed in STEPS:
        q, k, v = _qkv(L, seed)
        out = attend(q, k, v, cache, SCALE)
        rot = shadow.add(k, v)
        want = shadow.expected(q, L, rot)
        np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=5e-5, rtol=2e-4)
        assert cache.offset == len(shadow.fp)
        assert cache.window_length == shadow.window
    # The float16 buffer never outgrows the sink and the ring.
    if cache.fp is not None:
        assert cache.fp.shape[2] <= cache.sink + max(cache.recent, 64)


@pytest.mark.parametrize("backend", ["reference", "emulate"])
def test_trim_shrinks_the_window_and_later_steps_stay_exact(backend):
    cache = _cache(backend, recent=12, sink=2, rotation=True)
    shadow = Shadow(cache)
    q, k, v = _qkv(40, 1)
    attend(q, k, v, cache, SCALE)
    shadow.add(k, v)
    assert cache.trim(5) == 5 and (cache.offset, cache.window_length) == (35, 7)
    del shadow.fp[35:], shadow.deq[35:]
    shadow.window = 7
    for seed in range(2, 12):
        q, k, v = _qkv(1, seed)
        out = attend(q, k, v, cache, SCALE)
        rot = shadow.add(k, v)
        np.testing.assert_allclose(np.asarray(out), np.asarray(shadow.expected(q, 1, rot)),
                                   atol=5e-5, rtol=2e-4)
    assert cache.trim(100) == 45 and (cache.offset, cache.window_length) == (0, 0)
    assert cache.sink_length == 0 and cache.quantized_length == 0


@pytest.mark.parametrize("backend", ["reference", "emulate"])
def test_trim_into_a_block_whose_rows_left_keeps_its_center(backend):
    """Rows written as tokens leave the window (a window of CENTER_BLOCK): after a trim back
    into a completed block some of whose rows are written, the block completing again
    keeps the center those rows were written with (new rows of it use it too), and every
    step still attends exactly what was stored."""
    cache = _cache(backend, recent=CENTER_BLOCK, sink=2)
    shadow = Shadow(cache)
    q, k, v = _qkv(200, 1)
    attend(q, k, v, cache, SCALE)
    shadow.add(k, v)
    center = np.asarray(cache.centers[:, :, 0])
    assert cache.rows_held == 200 - 2 - CENTER_BLOCK + 1
    assert cache.trim(100) == 100 and (cache.offset, cache.window_length) == (100, 28)
    del shadow.fp[100:], shadow.deq[100:]
    # Block 0 holds 98 rows again; it completes at 130 and the window refills by 200.
    shadow.window, shadow.block = 28, [mx.zeros((B, HKV, 1, D))] * 98
    for seed in range(2, 142):  # to 240 tokens: rows up to position 111 are read
        q, k, v = _qkv(1, seed)
        out = attend(q, k, v, cache, SCALE)
        rot = shadow.add(k, v)
        np.testing.assert_allclose(np.asarray(out), np.asarray(shadow.expected(q, 1, rot)),
                                   atol=5e-5, rtol=2e-4)
    assert cache.offset == 240 and cache.quantized_length == 240 - 2 - CENTER_BLOCK
    np.testing.assert_array_equal(np.asarray(cache.centers[:, :, 0]), center)


def test_save_load_roundtrip_is_exact(tmp_path):
    caches = [_cache(recent=12, sink=2, rotation=True, seed=3), _cache(bits=8, group_size=32)]
    for c in caches:
        for L, seed in ((40, 1), (1, 2)):
            attend(*_qkv(L, seed), c, SCALE)
    path = tmp_path / "cache.safetensors"
    save_cache(path, caches)
    loaded = load_cache(path)
    for a, b in zip(caches, loaded):
        assert isinstance(b, QuantizedKVCache) and b.config == a.config
        assert (b.offset, b.window_length, b.layer_index) == (41, a.window_length, 1)
        for key in a.state:
            assert mx.array_equal(a.state[key], b.state[key])
        # Both continue identically.
        q, k, v = _qkv(3, 9)
        assert mx.array_equal(attend(q, k, v, a, SCALE), attend(q, k, v, b, SCALE))


def test_saved_cache_of_another_layout_is_refused():
    """A cache saved without key centers, with centers per another block size (64 rows
    before 2026-12-02), or with rows of the older layout (a (scale, bias) pair per 4-bit
    group, before 2026-12-02; no row_layout in its meta state) cannot be read as this
    layout: one clear error, not wrong keys."""
    cache = _cache(recent=12, sink=2)
    attend(*_qkv(200, 1), cache, SCALE)
    state = cache.state
    assert state["centers"].shape[2] == 198 // CENTER_BLOCK + 1
    for bad in ({k: v for k, v in state.items() if k != "centers"},
                {**state, "centers": mx.zeros((B, HKV, 198 // 64 + 1, D), mx.float16)}):
        fresh = _cache(recent=12, sink=2)
        fresh.meta_state = cache.meta_state
        with pytest.raises(MlxqError, match="older int4/int8 layout; save it again"):
            fresh.state = bad
    old_meta = {k: v for k, v in cache.meta_state.items() if k != "row_layout"}
    fresh = _cache(recent=12, sink=2)
    fresh.meta_state = old_meta
    with pytest.raises(MlxqError, match="older int4/int8 layout; save it again"):
        fresh.state = state
    fresh.meta_state = cache.meta_state
    fresh.state = state  # the same rows with this layout's meta state load
    assert mx.array_equal(fresh.store[:, :, :198], state["store"])


def test_long_prefill_peak_memory_not_above_fp16_cache():
    """A chunk after a long context: no L x S scores, no dequantized copy of the cache."""
    hq, hkv, d, context, L = 8, 2, 64, 4096, 512

    def peak(cache):
        for start in range(0, context, 1024):
            q, k, v = _qkv(1024, start, hq=hq, hkv=hkv, d=d)
            attend(q, k, v, cache, SCALE)
            mx.eval(cache.state)
        q, k, v = _qkv(L, 3, hq=hq, hkv=hkv, d=d)
        mx.eval(q, k, v)
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(attend(q, k, v, cache, SCALE))
        return mx.get_peak_memory() - base

    fp_peak = peak(KVCache(dtype=mx.float32))
    int4_peak = peak(_cache(recent=256, sink=4, rotation=True))
    assert int4_peak <= fp_peak


def _address(a):
    # A numpy view over MLX's buffer (buffer protocol), dropped at once: holding it would
    # itself make the next in-place update copy.
    return np.asarray(a).__array_interface__["data"][0]


@pytest.mark.parametrize("backend", ["reference", "emulate"])
def test_decode_steps_update_the_buffers_in_place(backend):
    cache = _cache(backend, recent=256, sink=4, rotation=True)
    attend(*_qkv(1000, 0, hq=8, hkv=4, d=128), cache, SCALE)
    mx.eval(cache.state)
    for seed in range(1, 4):
        before = (_address(cache.store), _address(cache.fp))
        mx.eval(attend(*_qkv(1, seed, hq=8, hkv=4, d=128), cache, SCALE))
        assert (_address(cache.store), _address(cache.fp)) == before
    # The check is live: a step while a view of the store is held copies it.
    held = cache.store[:, :, :1]
    mx.eval(held)
    before = _address(cache.store)
    mx.eval(attend(*_qkv(1, 9, hq=8, hkv=4, d=128), cache, SCALE))
    assert _address(cache.store) != before
    del held


def test_emulated_decode_step_allocates_nothing_cache_sized():
    """The kernels read the whole buffers (no strided view, no dequantized copy): a step
    allocates its new rows, the blocks' partial results and the output, nothing
    cache-sized. (The emulator's own numpy copies are outside MLX's allocator.)"""
    from mlxq.kernels.decode_attention import plan_decode

    cache = _cache("emulate", recent=256, sink=4, rotation=True)
    for seed in range(3):
        attend(*_qkv(1000, seed, hq=8, hkv=4, d=128), cache, SCALE)
        mx.eval(cache.state)
    step = _qkv(1, 7, hq=8, hkv=4, d=128)
    mx.eval(attend(*step, cache, SCALE))  # compile outside the measurement
    mx.eval(step)
    for _ in range(2):
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(attend(*step, cache, SCALE))
        plan = plan_decode(1, 4, 2, 1, 128, 4, cache.quantized_length, 260)
        partials = 8 * plan.n_blocks * (128 + 2) * 4
        assert mx.get_peak_memory() - base < partials + 0.02 * cache.nbytes
    # Rows for the tokens that left the window (3003 - 4 - 256 + 1), in steps of 256.
    assert cache.store.shape[2] == 2816 and cache.offset == 3003
