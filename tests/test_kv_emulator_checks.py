"""The KV kernels under the emulator's checking mode (MLXQ_EMULATOR_CHECK=1): every buffer
access bounds-checked, with buffers exactly as long as the valid data."""

import mlx.core as mx
import pytest
from test_kv_decode_attention import _rel_err, _run, _sink_logits

import mlxq.kernels.decode_attention as da
from mlxq.emulator import KernelRuntimeError
from mlxq.kernel_source import read_kernel_source
from mlxq.kernels.kv_append import append_rows, reference_append_rows

CASES = [
    (1, 1, 64, 1, 2, 4, 64, 0, 0, [(33, 0)], False),
    (2, 5, 128, 16, 1, 4, 64, 4, 16, [(257, 16), (100, 16)], True),
    (1, 1, 96, 3, 1, 4, 32, 4, 16, [(300, 16)], False),
    (1, 2, 256, 2, 1, 8, 64, 2, 8, [(600, 8)], True),
]


@pytest.fixture(autouse=True)
def checking(monkeypatch):
    monkeypatch.setenv("MLXQ_EMULATOR_CHECK", "1")


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"D{c[2]}-G{c[3]}-n{c[9][0][0]}")
def test_decode_attention_stays_in_bounds(case):
    out, ref = _run(case)
    assert _rel_err(out, ref) < 2e-4


def test_decode_merge_reads_one_sink_per_head_in_bounds():
    # sinks is exactly (Hq,): batch 2 x 3 query tokens, so a wrong row -> head map reads
    # past it.
    case = (2, 3, 64, 3, 2, 4, 64, 4, 16, [(50, 16), (40, 16)], True)
    out, ref = _run(case, exact_capacity=True, sinks=_sink_logits(case, 0))
    assert _rel_err(out, ref) < 2e-4


@pytest.mark.parametrize("bits,gs,D", [(4, 64, 64), (8, 32, 96), (4, 128, 256)])
def test_append_stays_in_bounds(bits, gs, D):
    # 7 rows: the grid is not a multiple of a power of two.
    x = mx.random.normal((1, 7, 1, D), key=mx.random.key(D))
    got = append_rows(x, 2 * x, None, bits, gs, "emulate")
    want = reference_append_rows(x, 2 * x, None, bits, gs)
    assert all(mx.array_equal(a, b) for a, b in zip(got, want))


def test_checking_mode_catches_a_read_past_the_valid_length(monkeypatch):
    # Proof that the check is live: a kernel that reads one store row too many.
    source = read_kernel_source("segmented_decode_attention.metal")
    broken = source.replace("min(k0 + block, n_q)", "min(k0 + block, n_q + 1)")
    assert broken != source
    real = da.read_kernel_source
    monkeypatch.setattr(da, "read_kernel_source",
                        lambda name: broken if name.startswith("segmented") else real(name))
    da._attention_kernel.cache_clear()
    try:
        with pytest.raises(KernelRuntimeError, match="out-of-bounds"):
            # No spare capacity: the store holds exactly the valid rows.
            _run((1, 1, 64, 1, 2, 4, 64, 0, 0, [(33, 0)], False), exact_capacity=True)
    finally:
        monkeypatch.undo()
        da._attention_kernel.cache_clear()
