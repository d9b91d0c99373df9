"""Hadamard rotation: orthonormal, deterministic, attention-preserving, outlier-spreading."""

import mlx.core as mx
import numpy as np
import pytest

from mlxq.errors import MlxqError
from mlxq.attention import attend
from mlxq.kv_config import KVCacheConfig
from mlxq.rotation import HadamardRotation, from_meta, hadamard_base


@pytest.mark.parametrize("head_dim", [64, 128, 96, 80])
def test_orthonormal_and_forward_inverse_match_the_matrix(head_dim):
    rot = HadamardRotation(head_dim, seed=3, layer_index=5)
    r = np.array(rot.matrix, dtype=np.float64)
    np.testing.assert_allclose(r @ r.T, np.eye(head_dim), atol=1e-5)
    x = mx.random.normal((2, 3, 5, head_dim), key=mx.random.key(0))
    xn = np.array(x, dtype=np.float64)
    np.testing.assert_allclose(np.array(rot.forward(x)), xn @ r, atol=1e-4)
    np.testing.assert_allclose(np.array(rot.inverse(x)), xn @ r.T, atol=1e-4)
    np.testing.assert_allclose(np.array(rot.inverse(rot.forward(x))), xn, atol=1e-5)


def test_deterministic_per_seed_and_layer():
    a = np.array(HadamardRotation(64, seed=7, layer_index=2).matrix)
    np.testing.assert_array_equal(a, np.array(HadamardRotation(64, seed=7, layer_index=2).matrix))
    assert not np.array_equal(a, np.array(HadamardRotation(64, seed=7, layer_index=3).matrix))
    assert not np.array_equal(a, np.array(HadamardRotation(64, seed=8, layer_index=2).matrix))


def test_meta_round_trip_rebuilds_the_same_rotation():
    rot = HadamardRotation(128, seed=11, layer_index=29)
    meta = rot.to_meta()
    assert meta == {"type": "hadamard", "head_dim": 128, "seed": 11, "layer_index": 29}
    for rebuilt in (from_meta(meta), HadamardRotation.from_meta(meta)):
        np.testing.assert_array_equal(np.array(rebuilt.matrix), np.array(rot.matrix))
    with pytest.raises(MlxqError):
        from_meta({"type": "givens", "head_dim": 64})
    with pytest.raises(MlxqError):
        from_meta({"type": "hadamard", "head_dim": 64})


@pytest.mark.parametrize("head_dim", [100, 72, 1, 0])
def test_unsupported_head_dims_raise_instead_of_calling_mlx(head_dim):
    # MLX corrupts memory on some unsupported sizes (e.g. 100), so this must be refused.
    assert hadamard_base(head_dim) is None or head_dim < 2
    with pytest.raises(MlxqError, match="head_dim"):
        HadamardRotation(head_dim)


def test_attention_output_unchanged_by_rotation():
    # softmax((qR)(kR)^T) (vR) R^T == softmax(q k^T) v, with GQA (9 query, 3 KV heads).
    keys = [mx.random.key(i) for i in range(3)]
    q = mx.random.normal((1, 9, 4, 64), key=keys[0])
    k = mx.random.normal((1, 3, 37, 64), key=keys[1]) * 3.0
    v = mx.random.normal((1, 3, 37, 64), key=keys[2])
    rot = HadamardRotation(64, seed=0, layer_index=4)
    scale = 64 ** -0.5
    ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")
    out = rot.inverse(mx.fast.scaled_dot_product_attention(
        rot.forward(q), rot.forward(k), rot.forward(v), scale=scale, mask="causal"))
    np.testing.assert_allclose(np.array(out), np.array(ref), atol=2e-5)


def _int4_error(x, rot=None):
    y = x if rot is None else rot.forward(x)
    deq = mx.dequantize(*mx.quantize(y, group_size=64, bits=4), group_size=64, bits=4)
    back = deq if rot is None else rot.inverse(deq)
    return float(mx.sqrt(mx.mean((back - x) ** 2)))


def test_rotation_spreads_an_outlier_channel_and_cuts_int4_error():
    # Keys with one large channel (the failure mode of plain per-token int4 keys).
    x = mx.random.normal((1, 3, 256, 64), key=mx.random.key(1))
    x = x + 40.0 * (mx.arange(64) == 5)
    rot = HadamardRotation(64, seed=0, layer_index=0)
    assert _int4_error(x, rot) < 0.5 * _int4_error(x)


def test_rotation_works_in_float16():
    rot = HadamardRotation(64, seed=1, layer_index=0)
    x = mx.random.normal((2, 64), key=mx.random.key(2)).astype(mx.float16)
    y = rot.forward(x)
    assert y.dtype == mx.float16
    np.testing.assert_allclose(np.array(rot.inverse(y), dtype=np.float32),
                               np.array(x, dtype=np.float32), atol=1e-2)


def test_quantized_cache_with_rotation_attends_like_full_precision_and_saves(tmp_path):
    from mlxq.cache import load_cache, save_cache
    from mlxq.quantized_cache import QuantizedKVCache

    keys = [mx.random.key(i) for i in range(3)]
    q = mx.random.normal((1, 9, 1, 64), key=keys[0])
    k = mx.random.normal((1, 3, 40, 64), key=keys[1])
    v = mx.random.normal((1, 3, 40, 64), key=keys[2])
    scale = 64 ** -0.5
    cache = QuantizedKVCache(KVCacheConfig(8, 64, seed=2, recent=0, sink=0), layer_index=0)
    attend(mx.zeros((1, 9, 39, 64)), k[:, :, :39], v[:, :, :39], cache, scale)
    rot = cache.rotation
    out = attend(q, k[:, :, 39:], v[:, :, 39:], cache, scale)
    ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
    # int8 error only; a missing inverse rotation would be off by O(1).
    np.testing.assert_allclose(np.array(out), np.array(ref), atol=2e-2)

    save_cache(tmp_path / "c.safetensors", [cache])
    (loaded,) = load_cache(tmp_path / "c.safetensors")
    assert loaded.rotation.to_meta() == rot.to_meta()
    q2 = mx.random.normal((1, 9, 1, 64), key=mx.random.key(9))
    k2 = mx.random.normal((1, 3, 1, 64), key=mx.random.key(10))
    np.testing.assert_allclose(np.array(attend(q2, k2, k2, loaded, scale)),
                               np.array(attend(q2, k2, k2, cache, scale)), atol=1e-5)
