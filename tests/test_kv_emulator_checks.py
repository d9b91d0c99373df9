"""The KV kernels under the emulator's checking mode (MLXQ_EMULATOR_CHECK=1): every buffer
access bounds-checked, with buffers exactly as long as the valid data."""

import mlx.core as mx
import pytest
from test_kv_decode_attention import _rel_err, _run

import mlxq.kernels.decode_attention as da
from mlxq.emulator import KernelRuntimeError
from mlxq.kernel_source import read_kernel_source
from mlxq.kernels.kv_write import quantize_kv

# Single block, several blocks, row chunks, head dims 96 and 256, 8-bit.
CASES = [
    (1, 1, 64, 1, 2, 33, 4, 64),
    (2, 5, 128, 16, 1, 257, 4, 64),
    (1, 7, 128, 1, 2, 513, 8, 128),
    (1, 1, 96, 3, 1, 300, 4, 32),
    (1, 2, 256, 2, 1, 600, 8, 64),
]


@pytest.fixture(autouse=True)
def checking(monkeypatch):
    monkeypatch.setenv("MLXQ_EMULATOR_CHECK", "1")


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-L{}-D{}-G{}-H{}-S{}-b{}-g{}".format(*c))
def test_decode_attention_stays_in_bounds(case):
    out, ref = _run(case, cap=case[5])  # capacity == length
    assert _rel_err(out, ref) < 1e-4


@pytest.mark.parametrize("bits,gs,D", [(4, 64, 64), (8, 32, 96), (4, 128, 256)])
def test_kv_write_stays_in_bounds(bits, gs, D):
    # 7 rows: the grid is not a multiple of the threadgroup size.
    x = mx.random.normal((1, 7, 1, D), key=mx.random.key(D))
    got_k, got_v = quantize_kv(x, 2 * x, gs, bits, backend="emulate")
    for got, src in ((got_k, x), (got_v, 2 * x)):
        want = mx.quantize(src.astype(mx.float16), group_size=gs, bits=bits, stream=mx.cpu)
        assert all(mx.array_equal(a, b) for a, b in zip(got, want))


def test_checking_mode_catches_a_read_past_the_valid_length(monkeypatch):
    # Proof that the check is live: a kernel that ignores the tile's valid key count.
    source = read_kernel_source("quantized_decode_attention.metal")
    broken = source.replace("const int nk = min(TK, kb1 - t0);", "const int nk = TK;")
    assert broken != source
    merge = read_kernel_source("decode_merge.metal")
    monkeypatch.setattr(da, "read_kernel_source",
                        lambda name: broken if name.startswith("quantized") else merge)
    da._attention_kernel.cache_clear()
    try:
        with pytest.raises(KernelRuntimeError, match="out-of-bounds"):
            _run((1, 1, 64, 1, 2, 33, 4, 64), cap=33)
    finally:
        monkeypatch.undo()
        da._attention_kernel.cache_clear()
