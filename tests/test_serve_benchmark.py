"""benchmarks/serve.py --quick runs end to end and writes what it claims (speed itself is
not tested: only that figures exist, are positive, and are labelled by machine/backend)."""

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_serve_benchmark_quick(tmp_path, default_model_dir):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "serve.py"), "--quick",
                           "--out", str(tmp_path)], capture_output=True, text=True, cwd=REPO,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads((tmp_path / "serve.json").read_text())
    assert data["benchmark"] == "serve"
    machine = data["machine"]
    assert {"chip", "mlxq_backend", "compute_dtype"} <= machine.keys()
    rows = data["results"]
    assert {(r["path"], r["streams"]) for r in rows} == {
        (p, n) for p in ("fp", "int4") for n in data["settings"]["streams"]}
    for r in rows:
        assert r["status"] == "ok", r
        for k in ("tokens_per_s", "ttft_ms_median", "ms_per_token_median"):
            assert math.isfinite(r[k]) and r[k] > 0, (k, r)
        assert r["requests"] == r["streams"] * data["settings"]["requests_per_stream"]
        if r["path"] == "int4":  # named by the backend that ran it, never just "int4"
            assert machine["mlxq_backend"] in r["label"]
    steps = data["decode_step"]
    assert {(r["path"], r["batch"]) for r in steps} == {
        (p, n) for p in ("fp", "int4") for n in data["settings"]["streams"]}
    for r in steps:
        assert r["status"] == "ok", r
        for k in ("batched_ms_per_step", "per_sequence_ms_per_step"):
            assert math.isfinite(r[k]) and r[k] > 0, (k, r)
    fp, q = data["sessions"]
    for s in (fp, q):
        # The server's admission accounting never undercounts a real session.
        assert s["admission_bytes"] >= s["measured_bytes"] > 0
    assert q["measured_bytes"] < 0.5 * fp["measured_bytes"]
    assert all(q["fit"][gb] > fp["fit"][gb] for gb in fp["fit"])
    assert (tmp_path / "serve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "tokens/s" in proc.stdout and "fit in" in proc.stdout
    # An existing output is kept without --force: one line, exit 2.
    again = subprocess.run([sys.executable, str(REPO / "benchmarks" / "serve.py"), "--quick",
                            "--out", str(tmp_path)], capture_output=True, text=True, cwd=REPO,
                           timeout=120)
    assert again.returncode == 2 and "already exists" in again.stderr
