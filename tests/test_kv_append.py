"""The append kernel (metal/kv_append.metal, through the emulator) vs its oracle
(rotation by MLX's Hadamard transform, float16 cast, mx.quantize)."""

import mlx.core as mx
import numpy as np
import pytest

from mlxq.kernels.kv_append import append_rows, reference_append_rows
from mlxq.kernels.kv_layout import dequantize_rows, pack_rows, unpack_rows
from mlxq.rotation import HadamardRotation


def _inputs(shape, seed, dtype=mx.float32):
    k0, k1 = mx.random.split(mx.random.key(seed))
    keys = mx.random.normal(shape, key=k0)
    # Outlier channels (what the rotation is for) and a constant group (scale edge case).
    keys = keys * mx.where(mx.arange(shape[-1]) % 17 == 3, 20.0, 1.0)
    values = mx.random.normal(shape, key=k1)
    values = mx.where(mx.arange(shape[-1]) < 32, 0.5, values)
    return keys.astype(dtype), values.astype(dtype)


@pytest.mark.parametrize("bits,gs,D", [(4, 64, 64), (4, 32, 128), (8, 64, 128),
                                       (4, 128, 256), (8, 32, 96), (4, 32, 96)])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
def test_unrotated_rows_equal_the_oracle_bit_for_bit(bits, gs, D, dtype):
    keys, values = _inputs((2, 3, 5, D), D + bits, dtype)
    fp, q = append_rows(keys, values, None, bits, gs, "emulate")
    fp_ref, q_ref = reference_append_rows(keys, values, None, bits, gs)
    assert fp.dtype == mx.float16 and q.dtype == mx.uint32
    assert mx.array_equal(fp, fp_ref) and mx.array_equal(q, q_ref)


@pytest.mark.parametrize("bits,gs,D", [(4, 64, 64), (8, 32, 128), (4, 128, 256)])
def test_centered_keys_equal_the_oracle_bit_for_bit(bits, gs, D):
    """Keys quantized minus one center per (sequence, KV head), shared by its new tokens
    (5 here, so a kernel that indexed the center per token would read the wrong one); the
    float16 rows keep the keys themselves; values are untouched."""
    keys, values = _inputs((2, 3, 5, D), D + 1)
    center = (10 * mx.random.normal((2, 3, 1, D), key=mx.random.key(D))).astype(mx.float16)
    fp, q = append_rows(keys, values, None, bits, gs, "emulate", center)
    fp_ref, q_ref = reference_append_rows(keys, values, None, bits, gs, center)
    assert mx.array_equal(fp, fp_ref) and mx.array_equal(q, q_ref)
    fp_plain, q_plain = reference_append_rows(keys, values, None, bits, gs)
    assert mx.array_equal(fp, fp_plain)
    (kc, _, _), (vc, _, _) = unpack_rows(q, D, bits, gs)
    (kp, _, _), (vp, _, _) = unpack_rows(q_plain, D, bits, gs)
    assert mx.array_equal(vc, vp) and not mx.array_equal(kc, kp)
    # Read back plus the center, the keys are as close as quantization allows.
    k_back = dequantize_rows(q, D, bits, gs)[0] + center.astype(mx.float32)
    step = float(mx.abs(keys).max()) / (2 ** bits - 1) * 2
    assert float(mx.abs(k_back - keys.astype(mx.float16).astype(mx.float32)).max()) < step


@pytest.mark.parametrize("bits,gs,D", [(4, 64, 64), (4, 32, 128), (8, 64, 256)])
def test_rotated_rows_match_the_oracle(bits, gs, D):
    keys, values = _inputs((1, 4, 3, D), D)
    rot = HadamardRotation(D, seed=5, layer_index=2)
    fp, q = append_rows(keys, values, mx.array(rot._signs), bits, gs, "emulate")
    fp_ref, q_ref = reference_append_rows(keys, values, rot, bits, gs)
    # The rotation sums in another order than MLX's transform: a half ulp at most.
    np.testing.assert_allclose(np.asarray(fp, np.float32), np.asarray(fp_ref, np.float32),
                               rtol=1e-3, atol=1e-3)
    # Dequantized rows agree within one quantization step of their group.
    (kc, ks, _), (vc, vs, _) = unpack_rows(q_ref, D, bits, gs)
    step = mx.repeat(mx.maximum(mx.abs(ks), mx.abs(vs)).astype(mx.float32), gs, axis=-1)
    for got, want in zip(dequantize_rows(q, D, bits, gs), dequantize_rows(q_ref, D, bits, gs)):
        assert bool(mx.all(mx.abs(got - want) <= 1.01 * step + 1e-3))
    # And the rotation really happened: rows differ from the unrotated ones.
    fp_plain, _ = reference_append_rows(keys, values, None, bits, gs)
    assert float(mx.abs(fp.astype(mx.float32) - fp_plain.astype(mx.float32)).max()) > 0.5


def test_layout_round_trips_mx_quantize():
    x = mx.random.normal((2, 2, 3, 128)).astype(mx.float16)
    parts_k = mx.quantize(x, group_size=32, bits=4)
    parts_v = mx.quantize(-x, group_size=32, bits=4)
    for got, want in zip(unpack_rows(pack_rows(parts_k, parts_v), 128, 4, 32),
                         (parts_k, parts_v)):
        assert all(mx.array_equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("bits,key_bits,gs,D", [(4, 8, 64, 64), (4, 8, 64, 256),
                                                (8, 4, 32, 128)])
def test_own_key_bits_equal_the_oracle_bit_for_bit(bits, key_bits, gs, D):
    """Keys in ``key_bits``, values in ``bits``: each half of the row as mx.quantize packs
    it at its own bits (centered keys too), read back by the layout."""
    keys, values = _inputs((2, 3, 5, D), D + 2)
    center = (10 * mx.random.normal((2, 3, 1, D), key=mx.random.key(D))).astype(mx.float16)
    for c in (None, center):
        fp, q = append_rows(keys, values, None, bits, gs, "emulate", c, key_bits)
        fp_ref, q_ref = reference_append_rows(keys, values, None, bits, gs, c, key_bits)
        assert mx.array_equal(fp, fp_ref) and mx.array_equal(q, q_ref)
    _, q_plain = reference_append_rows(keys, values, None, bits, gs, key_bits=key_bits)
    (kc, ks, kb), (vc, vs, vb) = unpack_rows(q_plain, D, bits, gs, key_bits)
    k16, v16 = keys.astype(mx.float16), values.astype(mx.float16)
    for got, want in zip((kc, ks, kb), mx.quantize(k16, group_size=gs, bits=key_bits)):
        assert mx.array_equal(got, want)
    for got, want in zip((vc, vs, vb), mx.quantize(v16, group_size=gs, bits=bits)):
        assert mx.array_equal(got, want)
