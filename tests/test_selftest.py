"""``python -m mlxq.selftest`` on the emulator: every check runs and passes, and a broken
kernel is reported as a failure (exit code 1), not hidden."""

import mlxq.kernels.decode_attention as da
from mlxq import selftest


def test_quick_selftest_passes_on_the_emulator(capsys):
    assert selftest.main(["--backend", "emulate", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "backend: emulate" in out and "0 failed" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "pass" in line]
    assert len(rows) == len(selftest.APPEND_CASES) + len(selftest.QUICK_CASES) + 1


def test_a_wrong_kernel_fails_the_selftest(capsys, monkeypatch):
    real = da.read_kernel_source
    # The merge forgets one block's weight: numbers off, no crash.
    monkeypatch.setattr(da, "read_kernel_source", lambda name: real(name).replace(
        "L += w;", "L += w * (b == 1 ? 0.5f : 1.0f);"))
    da._merge_kernel.cache_clear()
    try:
        assert selftest.main(["--backend", "emulate", "--quick"]) == 1
    finally:
        monkeypatch.undo()
        da._merge_kernel.cache_clear()
    assert "FAIL" in capsys.readouterr().out
