"""The fused quantize-on-append kernel (through the emulator) equals mx.quantize bit for bit.

"Same inputs": the cache stores float16 scales/biases, so the kernel rounds its input to
half first; the oracle is ``mx.quantize`` of that float16 array, on the CPU stream (the CPU
backend implements MLX's reference rounding: rint, true min/max).
"""

import mlx.core as mx
import numpy as np
import pytest

from mlxq.kernels.kv_write import quantize_kv, reference_quantize_kv


def _special_rows(D):
    """Rows that stress the rounding: zeros, constants, all negative, exact .5 ties
    (range [0, 15] gives scale -1, so w=6.5 -> 8.5), huge and tiny magnitudes."""
    ramp = np.arange(D) % 31 / 2.0                       # 0, 0.5, ..., 15
    rows = [
        np.zeros(D),
        np.full(D, 3.0),
        -np.abs(np.linspace(0.1, 7, D)),
        ramp,
        -ramp,
        np.linspace(-60000, 50000, D),
        np.linspace(-1e-6, 2e-6, D),
        np.where(np.arange(D) % 2, 1.0, -1.0),
    ]
    return np.stack(rows).astype(np.float32)


def _inputs(D, dtype, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 3, 5, D)).astype(np.float32) * rng.uniform(0.01, 10, (2, 3, 5, 1))
    special = _special_rows(D)
    x[0, 0, : len(special) // 2] = special[: len(special) // 2]
    x[1, 2, : len(special) - len(special) // 2] = special[len(special) // 2:]
    keys = mx.array(x).astype(dtype)
    values = mx.array(rng.standard_normal(x.shape).astype(np.float32) * 4).astype(dtype)
    return keys, values


def _oracle(x, gs, bits):
    return mx.quantize(x.astype(mx.float16), group_size=gs, bits=bits, stream=mx.cpu)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("gs", [32, 64, 128])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16], ids=["f32", "f16"])
def test_kernel_equals_mx_quantize_bit_for_bit(bits, gs, dtype):
    D = 128
    keys, values = _inputs(D, dtype, seed=bits * 1000 + gs)
    got_k, got_v = quantize_kv(keys, values, gs, bits, backend="emulate")
    for got, x in ((got_k, keys), (got_v, values)):
        want = _oracle(x, gs, bits)
        for name, g, w in zip(("codes", "scales", "biases"), got, want):
            assert g.dtype == w.dtype and g.shape == w.shape, name
            # Compare raw bits: NaN-safe and catches -0 vs 0.
            g_bits = np.asarray(g).view(np.uint8)
            w_bits = np.asarray(w).view(np.uint8)
            assert np.array_equal(g_bits, w_bits), f"{name} differ (bits={bits}, gs={gs})"


def test_reference_path_is_mx_quantize_of_half_input():
    keys, values = _inputs(64, mx.float32, seed=7)
    (kc, ks, kb), _ = reference_quantize_kv(keys, values, 64, 4)
    assert ks.dtype == mx.float16 and kc.shape == (2, 3, 5, 8)
    wc, ws, wb = _oracle(keys, 64, 4)
    assert mx.array_equal(kc, wc) and mx.array_equal(ks, ws) and mx.array_equal(kb, wb)


def test_decode_sized_write_other_head_dims():
    # One token per head (the decode case) at head dims 96 and 256.
    for D, gs in ((96, 32), (256, 128)):
        keys, values = _inputs(D, mx.float32, seed=D)
        keys, values = keys[:, :, :1], values[:, :, :1]
        got_k, got_v = quantize_kv(keys, values, gs, 4, backend="emulate")
        for got, x in ((got_k, keys), (got_v, values)):
            for g, w in zip(got, _oracle(x, gs, 4)):
                assert mx.array_equal(g, w)
