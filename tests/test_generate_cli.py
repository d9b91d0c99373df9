"""`python -m mlxq.generate` in a subprocess: streaming output, stats line, bad input."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "mlxq.generate", *args], input=stdin,
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )


def assert_one_line_error(proc, pattern):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert re.search(pattern, lines[0]), lines[0]


@pytest.mark.parametrize(
    "args,pattern",
    [
        (["--max-tokens", "0"], "max-tokens"),
        (["--model", "/no/such/model/folder"], "does not exist"),
        (["--top-p", "1.5"], "top-p"),
        (["--temp", "-1"], "temperature"),
        (["--prefill-step-size", "0"], "prefill"),
    ],
)
def test_bad_input_without_a_model(args, pattern):
    assert_one_line_error(run_cli(*args), pattern)


def test_unsupported_kv_bits_is_a_usage_error():
    proc = run_cli("--kv-bits", "3")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--kv-bits" in proc.stderr.strip().splitlines()[-1]


def test_model_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "config.json").write_text("{ not json")
    assert_one_line_error(run_cli("--model", str(tmp_path), "--max-tokens", "2"), "config.json")


def test_prompt_longer_than_context(default_model_dir):
    long_prompt = "word " * 20000  # beyond SmolLM2's 8192 positions
    proc = run_cli("--model", str(default_model_dir), "--prompt", "-", stdin=long_prompt)
    assert_one_line_error(proc, r"context is \d+")


def test_streams_text_and_prints_stats(default_model_dir):
    proc = run_cli("--model", str(default_model_dir), "--max-tokens", "12",
                   "--prompt", "Name three fruits.")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"[A-Za-z]{3}", proc.stdout)
    stats = proc.stderr.strip().splitlines()[-1]
    m = re.search(r"prompt: (\d+) tokens, ([\d.]+) tokens/s \| generation: (\d+) tokens, "
                  r"([\d.]+) tokens/s \| peak memory: ([\d.]+) MB \| KV cache \(fp16\): ([\d.]+) MB "
                  r"\(([\d.]+)x fp16\)", stats)
    assert m, stats
    assert int(m[1]) > 0 and 0 < int(m[3]) <= 12
    assert float(m[2]) > 0 and float(m[5]) > 0 and float(m[6]) > 0
    # The full-precision cache against itself, whatever dtype the CPU computes in.
    assert float(m[7]) == 1.0
