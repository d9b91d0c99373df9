"""KVCache in isolation: attention over a growing cache equals attention over plain K/V."""

import math
import types

import mlx.core as mx
import numpy as np
import pytest

from mlxq.attention import attend
from mlxq.cache import KVCache, load_cache, make_cache, save_cache
from mlxq.errors import MlxqError
from mlxq.kv_config import KVCacheConfig

B, HQ, HKV, D = 1, 4, 2, 16


def _reference_attention(q, k, v, scale):
    """Softmax attention in numpy (float64); query i sits at position S - L + i."""
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    L, S = q.shape[2], k.shape[2]
    scores = np.einsum("bhld,bhsd->bhls", q, k) * scale
    allowed = np.arange(S)[None, :] <= (S - L + np.arange(L))[:, None]
    scores = np.where(allowed, scores, -np.inf)
    scores -= scores.max(-1, keepdims=True)
    w = np.exp(scores)
    w /= w.sum(-1, keepdims=True)
    return np.einsum("bhls,bhsd->bhld", w, v)


def _rand(*shape):
    return mx.random.normal(shape).astype(mx.float32)


def test_growth_across_step_boundary_matches_direct_attention():
    mx.random.seed(0)
    cache = KVCache(dtype=mx.float32)
    scale = 1 / math.sqrt(D)
    all_k, all_v = [], []
    # Chunks cross the 256 boundary mid-chunk (200 -> 300) and then by single tokens.
    for n in (200, 100, 1, 1, 250, 1):
        q, k, v = _rand(B, HQ, n, D), _rand(B, HKV, n, D), _rand(B, HKV, n, D)
        all_k.append(k)
        all_v.append(v)
        out = attend(q, k, v, cache, scale)
        ref = _reference_attention(
            q, mx.concatenate(all_k, axis=2), mx.concatenate(all_v, axis=2), scale
        )
        np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5, rtol=1e-4)
        total = sum(x.shape[2] for x in all_k)
        assert cache.offset == total
        # Capacity is whole 256-token blocks, never more than one block of slack.
        assert cache.capacity % 256 == 0 and 0 <= cache.capacity - total < 256
    assert cache.capacity == 768  # 553 tokens


def test_nbytes_counts_allocated_capacity():
    cache = KVCache(dtype=mx.float32)
    assert cache.nbytes == 0 and cache.fp16_nbytes == 0
    cache.update_and_fetch(_rand(B, HKV, 3, D), _rand(B, HKV, 3, D))
    per_block = 2 * B * HKV * 256 * D  # keys + values
    assert cache.nbytes == per_block * 4
    assert cache.fp16_nbytes == per_block * 2
    cache.update_and_fetch(_rand(B, HKV, 254, D), _rand(B, HKV, 254, D))  # 257 tokens
    assert cache.nbytes == 2 * per_block * 4


def test_trim_then_append_overwrites():
    mx.random.seed(1)
    cache = KVCache(dtype=mx.float32)
    k, v = _rand(B, HKV, 10, D), _rand(B, HKV, 10, D)
    cache.update_and_fetch(k, v)
    assert cache.is_trimmable()
    assert cache.trim(4) == 4 and cache.offset == 6
    assert cache.trim(100) == 6 and cache.offset == 0
    cache.update_and_fetch(k[..., :6, :], v[..., :6, :])
    k2, v2 = _rand(B, HKV, 2, D), _rand(B, HKV, 2, D)
    keys, values = cache.update_and_fetch(k2, v2)
    assert keys.shape[2] == 8
    np.testing.assert_array_equal(np.asarray(keys[..., 6:, :]), np.asarray(k2))
    np.testing.assert_array_equal(np.asarray(values[..., :6, :]), np.asarray(v[..., :6, :]))


def test_save_load_round_trip_is_exact(tmp_path):
    mx.random.seed(2)
    caches = [KVCache(dtype=mx.float32) for _ in range(3)]
    for c in caches[:2]:
        c.update_and_fetch(_rand(B, HKV, 300, D), _rand(B, HKV, 300, D))
    caches[1].trim(5)
    path = tmp_path / "cache.safetensors"
    save_cache(path, caches)
    loaded = load_cache(path)
    assert [type(c) for c in loaded] == [KVCache] * 3
    for a, b in zip(caches, loaded):
        assert a.offset == b.offset and a.step == b.step
        for x, y in zip(a.state, b.state):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert loaded[2].empty() and loaded[2].offset == 0
    # A loaded cache keeps working: attention continues over the restored tokens.
    q, k, v = _rand(B, HQ, 1, D), _rand(B, HKV, 1, D), _rand(B, HKV, 1, D)
    out_a = attend(q, k, v, caches[0], 0.25)
    out_b = attend(q, k, v, loaded[0], 0.25)
    np.testing.assert_array_equal(np.asarray(out_a), np.asarray(out_b))


def test_load_rejects_other_files(tmp_path):
    path = tmp_path / "plain.safetensors"
    mx.save_safetensors(str(path), {"x": mx.zeros((2,))})
    with pytest.raises(MlxqError, match="not a saved mlxq cache"):
        load_cache(path)


def test_make_cache_one_per_layer_and_rejects_bad_bits():
    model = types.SimpleNamespace(layers=[object()] * 5)
    caches = make_cache(model)
    assert len(caches) == 5 and all(isinstance(c, KVCache) for c in caches)
    assert len({id(c) for c in caches}) == 5
    with pytest.raises(MlxqError, match="16, 8, 4"):
        make_cache(model, kv_bits=3)
    with pytest.raises(MlxqError, match="32, 64, 128"):
        make_cache(model, kv_bits=4, kv_group_size=48)


def test_works_as_an_mlx_lm_cache():
    # mlx-lm models call update_and_fetch; logits must match mlx-lm's own KVCache.
    from mlx_lm.models import cache as lm_cache
    from mlx_lm.models import llama

    args = llama.ModelArgs(
        model_type="llama", hidden_size=32, num_hidden_layers=2, intermediate_size=64,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=64,
    )
    mx.random.seed(3)
    model = llama.Model(args)
    tokens = mx.random.randint(0, 64, (1, 270), key=mx.random.key(4))
    ours = [KVCache(dtype=mx.float32) for _ in model.layers]
    theirs = [lm_cache.KVCache() for _ in model.layers]
    for start, end in ((0, 200), (200, 268), (268, 269), (269, 270)):
        a = model(tokens[:, start:end], cache=ours)
        b = model(tokens[:, start:end], cache=theirs)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    assert ours[0].offset == theirs[0].offset == 270


def test_save_load_is_generic_over_cache_classes(tmp_path):
    import mlxq.quantized_cache as qcache
    mx.random.seed(5)
    caches = [qcache.QuantizedKVCache(KVCacheConfig(4, 64, rotation=False, recent=0, sink=0)), KVCache(dtype=mx.float32)]
    for c in caches:
        k, v = _rand(B, HKV, 40, 64), _rand(B, HKV, 40, 64)
        attend(_rand(B, HQ, 40, 64), k, v, c, 0.125)
    path = tmp_path / "mixed.safetensors"
    save_cache(path, caches)
    loaded = load_cache(path)
    assert [type(c).__name__ for c in loaded] == ["QuantizedKVCache", "KVCache"]
    assert loaded[0].bits == 4 and loaded[0].group_size == 64 and loaded[0].offset == 40
    q, k, v = _rand(B, HQ, 1, 64), _rand(B, HKV, 1, 64), _rand(B, HKV, 1, 64)
    for a, b in zip(caches, loaded):
        np.testing.assert_array_equal(
            np.asarray(attend(q, k, v, a, 0.125)), np.asarray(attend(q, k, v, b, 0.125))
        )


def test_make_cache_checks_quantized_head_dim_up_front():
    model = types.SimpleNamespace(layers=[object()] * 2, head_dim=96)
    with pytest.raises(MlxqError, match="head_dim"):
        make_cache(model, kv_bits=4, kv_group_size=64)
    assert len(make_cache(model, kv_bits=4, kv_group_size=32)) == 2
