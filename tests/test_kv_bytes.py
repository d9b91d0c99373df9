"""benchmarks/kv_bytes.py: the KV bytes of a sliding-window model, from the caches' nbytes."""

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # benchmarks/ is not installed: import it from the checkout

from benchmarks import kv_bytes  # noqa: E402

SMALL = {**kv_bytes.GEMMA3_270M, "num_hidden_layers": 6, "sliding_window": 64}


@pytest.mark.parametrize("key_bits,per_token", [(4, (0.25, 0.33)), (None, (0.38, 0.45))])
def test_sliding_layers_are_bounded_and_global_layers_quantized(key_bits, per_token):
    short, long = (kv_bytes.measure(SMALL, n, kv_key_bits=key_bits) for n in (1024, 4096))
    assert short["layers"] == ["WindowKVCache"] * 5 + ["QuantizedKVCache"]
    # Window layers stop growing; the int4 layer grows at ~0.28 of fp16 per token with
    # 4-bit keys, ~0.41 with Gemma's default 8-bit keys.
    assert short["format"] == ("int4-g64-rot-kc-w304-s4" if key_bits else
                               "int4-k8-g64-rot-kc-w304-s4")
    fp16_per_token = 2 * 256 * 2  # keys + values, one KV head of 256, float16
    growth = long["bytes"] - short["bytes"]
    low, high = per_token
    assert low * 3072 * fp16_per_token < growth < high * 3072 * fp16_per_token
    assert long["fp16_full"] == pytest.approx(6 * 4096 * fp16_per_token, rel=0.07)
    assert long["bytes"] < long["fp16_mlx_lm"] < long["fp16_full"]
    assert long["ratio_vs_fp16_full"] < short["ratio_vs_fp16_full"]


def test_cli_prints_the_table(capsys, tmp_path):
    out = tmp_path / "kv.json"
    assert kv_bytes.main(["--contexts", "600", "--json", str(out)]) == 0
    assert "vs mlx-lm" in capsys.readouterr().out
    assert out.exists()
