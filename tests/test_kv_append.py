"""The append kernel (metal/kv_append.metal, through the emulator) vs its oracle
(rotation by MLX's Hadamard transform, float16 cast, kv_layout.quantize_groups), and the
oracle's quantizer vs an independent numpy model of the documented rule."""

import mlx.core as mx
import numpy as np
import pytest

from mlxq.kernels.kv_append import append_rows, reference_append_rows
from kv_quant_model import pack_codes, quantize
from mlxq.kernels.kv_layout import (dequantize_rows, pack_rows, quantize_groups, row_words,
                                    unpack_rows)
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


def _hard_groups(D, seed):
    """Rows (4, 6, D) float32 with groups that exercise every branch of the rule: normal
    data, all positive, all negative, constant, zero, tiny (a subnormal scale), large, and
    ties of the zero-point rounding."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(4, 6, D)).astype(np.float32)
    x[0, 1] = np.abs(x[0, 1]) + 3.0
    x[0, 2] = -np.abs(x[0, 2]) - 0.5
    x[0, 3] = 1.25
    x[0, 4] = 0.0
    x[0, 5] *= 1e-6
    x[1, 0] *= 300.0
    x[1, 1] = np.linspace(-1.0, 2.0, D)  # zero point 5 exactly
    x[1, 2] = np.float32(-7.5) + np.arange(D) % 16
    return x


@pytest.mark.parametrize("bits,gs,D", [(4, 64, 64), (4, 32, 128), (8, 64, 64),
                                       (8, 32, 96), (4, 128, 256)])
def test_group_quantizer_follows_the_documented_rule(bits, gs, D):
    """The oracle's codes and metadata equal the numpy model's bit for bit, and read back
    by the layout give the model's values; every 4-bit value is within one step of its
    input (MLX's rule moves the scale by up to 1/16 so that zero is a code: the far end
    of the range can be cut by up to 15/16 of a step; the 6-bit scale adds 1/64)."""
    x = _hard_groups(D, D + bits)
    codes, meta = quantize_groups(mx.array(x), bits, gs)
    m_codes, m_meta, m_deq = quantize(x, bits, gs)
    assert np.array_equal(np.asarray(codes), pack_codes(m_codes, bits))
    assert np.array_equal(np.asarray(meta), m_meta.reshape(*x.shape[:-1], -1))
    rows = pack_rows((codes, meta), (codes, meta))
    assert rows.shape[-1] == row_words(D, bits, gs)
    for got in dequantize_rows(rows, D, bits, gs):
        assert np.array_equal(np.asarray(got), m_deq)
    if bits == 4:
        g = x.reshape(4, 6, -1, gs)
        step = (np.maximum(g.max(-1), 0) - np.minimum(g.min(-1), 0)) / 15
        err = np.abs(m_deq - x).reshape(4, 6, -1, gs).max(-1)
        assert np.all(err <= step * (1 + 2 ** -6) + 1e-6)
        assert np.all((m_meta & 0x7FF0) != 0)   # never a zero scale


def test_layout_round_trips_both_metadata_kinds():
    """4-bit keys and 8-bit values (and the reverse) in one row: unpacking gives each
    half's own codes, scales and biases back."""
    x = _hard_groups(128, 3)
    k4, v8 = quantize_groups(mx.array(x), 4, 32), quantize_groups(mx.array(-x), 8, 32)
    for kq, vq, kb, vb in ((k4, v8, 4, 8), (v8, k4, 8, 4)):
        rows = pack_rows(kq, vq)
        assert rows.shape[-1] == row_words(128, vb, 32, kb)
        (kc, _, _), (vc, _, _) = unpack_rows(rows, 128, vb, 32, kb)
        assert mx.array_equal(kc, kq[0]) and mx.array_equal(vc, vq[0])
        k_back, v_back = dequantize_rows(rows, 128, vb, 32, key_bits=kb)
        assert np.array_equal(np.asarray(k_back), quantize(x if kb == 4 else -x, kb, 32)[2])
        assert np.array_equal(np.asarray(v_back), quantize(-x if kb == 4 else x, vb, 32)[2])


@pytest.mark.parametrize("bits,key_bits,gs,D", [(4, 8, 64, 64), (4, 8, 64, 256),
                                                (8, 4, 32, 128)])
def test_own_key_bits_equal_the_oracle_bit_for_bit(bits, key_bits, gs, D):
    """Keys in ``key_bits``, values in ``bits``: each half of the row as the numpy model
    quantizes it at its own bits (centered keys too), read back by the layout."""
    keys, values = _inputs((2, 3, 5, D), D + 2)
    center = (10 * mx.random.normal((2, 3, 1, D), key=mx.random.key(D))).astype(mx.float16)
    for c in (None, center):
        fp, q = append_rows(keys, values, None, bits, gs, "emulate", c, key_bits)
        fp_ref, q_ref = reference_append_rows(keys, values, None, bits, gs, c, key_bits)
        assert mx.array_equal(fp, fp_ref) and mx.array_equal(q, q_ref)
    _, q_plain = reference_append_rows(keys, values, None, bits, gs, key_bits=key_bits)
    (kc, _, _), (vc, _, _) = unpack_rows(q_plain, D, bits, gs, key_bits)
    k16, v16 = np.asarray(keys.astype(mx.float16)), np.asarray(values.astype(mx.float16))
    k_codes, _, k_deq = quantize(k16, key_bits, gs)
    v_codes, _, v_deq = quantize(v16, bits, gs)
    assert np.array_equal(np.asarray(kc), pack_codes(k_codes, key_bits))
    assert np.array_equal(np.asarray(vc), pack_codes(v_codes, bits))
    k_back, v_back = dequantize_rows(q_plain, D, bits, gs, key_bits=key_bits)
    assert np.array_equal(np.asarray(k_back), k_deq)
    assert np.array_equal(np.asarray(v_back), v_deq)


@pytest.mark.parametrize("bits,key_bits,gs,D", [(4, None, 64, 64), (4, 8, 64, 64),
                                                (8, None, 32, 128), (4, None, 128, 256)])
@pytest.mark.parametrize("centered", [True, False])
def test_rows_quantized_in_place_equal_the_oracle_bit_for_bit(bits, key_bits, gs, D, centered):
    """The token leaving the window: the kernel reads each sequence's row from its own slot
    of the float16 buffer, and its key center from its own block of the centers buffer
    (every sequence a different one, so a kernel reading the wrong slot, block or head
    fails), and quantizes it as the numpy model of the documented rule does."""
    B, H, slots, blocks = 3, 2, 11, 4
    keys, values = _inputs((B, H, slots, D), D + gs)
    fp = mx.concatenate([keys, values], axis=-1).astype(mx.float16)
    centers = (5 * mx.random.normal((B, H, blocks, D), key=mx.random.key(gs))
               ).astype(mx.float16) if centered else None
    at, block_of = [7, 0, 10], [2, 3, 0]
    from mlxq.kernels.kv_append import quantize_slots, reference_quantize_slots

    q = quantize_slots(fp, at, centers, block_of, bits, gs, "emulate", key_bits)
    q_ref = reference_quantize_slots(fp, at, centers, block_of, bits, gs, key_bits)
    assert q.shape == (B, H, 1, row_words(D, bits, gs, key_bits))
    assert mx.array_equal(q, q_ref)
    for b in range(B):
        row = np.asarray(fp[b, :, at[b]].astype(mx.float32))
        k = row[:, :D] - (np.asarray(centers[b, :, block_of[b]].astype(mx.float32))
                          if centered else 0)
        k_back, v_back = dequantize_rows(q[b:b + 1], D, bits, gs, key_bits=key_bits)
        assert np.array_equal(np.asarray(k_back)[0, :, 0], quantize(k, key_bits or bits, gs)[2])
        assert np.array_equal(np.asarray(v_back)[0, :, 0], quantize(row[:, D:], bits, gs)[2])


def test_rows_without_quantization_are_the_float16_rows():
    """``quantize=False`` (rows written later, as tokens leave the window): the same
    rotated float16 rows, no quantized output."""
    keys, values = _inputs((2, 3, 4, 64), 5)
    signs = mx.array(np.random.default_rng(0).choice([-1.0, 1.0], 64).astype(np.float32))
    fp, q = append_rows(keys, values, signs, 4, 64, "emulate", quantize=False)
    fp_all, _ = append_rows(keys, values, signs, 4, 64, "emulate")
    assert mx.array_equal(fp, fp_all) and q.size == 1
