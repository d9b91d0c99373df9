"""The benchmark scripts run (--quick) and write well-formed results; their shared pieces
compute what they claim. Speed is not tested: only that figures exist where measured, are
finite and positive, and that paths this machine cannot run say n/a instead of borrowing
another path's numbers."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # benchmarks/ is not installed: import it from the checkout

from benchmarks import attention_latency, common  # noqa: E402
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --- shared pieces -------------------------------------------------------------------------
def test_summarize_percentiles_in_ms():
    s = common.summarize([i / 1000 for i in range(1, 12)])  # 1..11 ms
    assert s["median"] == pytest.approx(6.0)
    assert s["p10"] == pytest.approx(2.0)
    assert s["p90"] == pytest.approx(10.0)
    assert s["min"] == pytest.approx(1.0) and s["n"] == 11


@pytest.mark.parametrize("chip, cores, gbps", [
    ("Apple M1", None, 68), ("Apple M2 Pro", None, 200), ("Apple M1 Ultra", None, 800),
    ("Apple M3 Max", 30, 300), ("Apple M3 Max", 40, 400), ("Apple M4 Pro", None, 273),
    ("Apple M4 Max", 32, 410), ("Apple M4", None, 120),
])
def test_peak_bandwidth_table(chip, cores, gbps):
    assert common.peak_bandwidth(chip, cores)[0] == gbps


def test_peak_bandwidth_unknown_is_blank_and_unknown_bin_errs_low():
    assert common.peak_bandwidth("AMD EPYC")[0] is None
    assert common.peak_bandwidth("Apple M9 Max")[0] is None
    # GPU bin unknown: the larger figure, so a fraction of peak is never overstated.
    gbps, source = common.peak_bandwidth("Apple M4 Max", None)
    assert gbps == 546 and "upper" in source


def test_quantized_bytes_are_4_5_bits_per_element():
    fp16 = attention_latency.fp_bytes(8, 4096, 128, 2)
    q4 = attention_latency.quantized_bytes(8, 4096, 128, 4, 64, 2)
    assert q4 / fp16 == pytest.approx(4.5 / 16)


def test_byte_model_matches_the_kernels_own_count():
    from mlxq.kernels.decode_attention import bytes_read

    # mlx-lm's int4 groups carry a float16 scale and bias, mlxq's one 16-bit half (scale
    # and zero point): one half fewer per group of keys and of values; at 8 bits the same.
    for kv, length, d, gs in [(3, 1000, 64, 64), (8, 32768, 128, 32)]:
        one_half_per_group = 2 * kv * length * (d // gs) * 2
        assert bytes_read(1, kv, length, 0, d, 4, gs) == attention_latency.quantized_bytes(
            kv, length, d, 4, gs, 2) - one_half_per_group
        assert bytes_read(1, kv, length, 0, d, 8, gs) == attention_latency.quantized_bytes(
            kv, length, d, 8, gs, 2)


def test_json_has_no_nan(tmp_path):
    path = tmp_path / "x.json"
    common.write_json(path, {"a": float("nan"), "b": [1.5, float("inf")]})
    assert json.loads(path.read_text()) == {"a": None, "b": [1.5, None]}


def test_reference_and_emulated_paths_never_carry_the_kernels_name():
    args = attention_latency.parse_args(["--quick", "--include-reference",
                                         "--include-emulated"])
    import mlx.core as mx

    labels = {key: label for key, label, _ in attention_latency.paths(args, mx.float32)}
    assert labels["mlxq_metal"] == "mlxq int4 (metal)"
    assert labels["mlxq_reference"] == "mlxq int4 (reference)"
    assert labels["mlxq_emulate"] == "mlxq int4 (emulate)"


# --- the scripts, end to end ---------------------------------------------------------------
def _run(script, out, *extra):
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), "--quick", "--out", str(out),
         *extra], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _check_machine(machine):
    for key in ("platform", "chip", "mlx", "mlx_lm", "metal", "mlxq_backend",
                "compute_dtype"):
        assert key in machine


def _check_rows(rows, measured_keys):
    from mlxq.backend import metal_available

    assert rows
    for r in rows:
        assert r["status"] in ("ok", "n/a"), r
        if r["status"] == "ok":
            for k in measured_keys:
                assert isinstance(r[k], (int, float)) and math.isfinite(r[k]) and r[k] > 0, (k, r)
        else:
            assert r["reason"].startswith("n/a"), r
            assert all(r.get(k) is None for k in measured_keys), r
        if r["path"] == "mlxq_metal" and not metal_available():
            assert r["status"] == "n/a" and r["reason"] == common.NA_NEEDS_METAL


def _check_png(path):
    assert path.read_bytes()[:8] == PNG_MAGIC


@pytest.fixture(scope="module")
def attention_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("attention")
    stdout = _run("attention_latency.py", out, "--include-reference", "--include-emulated")
    return out, stdout, json.loads((out / "attention_latency.json").read_text())


@pytest.fixture(scope="module")
def decode_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("decode")
    # No full-precision tokens: at the quick contexts (64, 256) they would be most of the cache.
    stdout = _run("decode_latency.py", out, "--include-reference", "--recent", "0",
                  "--sink", "0")
    return out, stdout, json.loads((out / "decode_latency.json").read_text())


def test_existing_outputs_are_kept_without_force(attention_run):
    out, _, _ = attention_run
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "attention_latency.py"), "--quick",
         "--out", str(out)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert "already exists" in err and "--force" in err and "\n" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_attention_quick_outputs(attention_run):
    out, stdout, data = attention_run
    assert data["benchmark"] == "attention_latency"
    _check_machine(data["machine"])
    assert data["settings"]["models"] == ["default"]
    _check_rows(data["attention"], ["median_ms", "p10_ms", "p90_ms", "bytes", "gbps",
                                    "ratio_vs_sdpa"])
    _check_rows(data["append"], ["median_us", "p10_us", "p90_us"])
    paths = {r["path"] for r in data["attention"]}
    assert {"sdpa", "mlx_lm", "mlxq_metal", "mlxq_reference", "mlxq_emulate"} <= paths
    for r in data["attention"]:
        if r["status"] == "ok":
            assert r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]
            # Every path computes attention: int4 error is a few hundredths, not a mix-up.
            assert r["max_abs_err_vs_exact"] < 0.2, r
        if r["path"] == "sdpa":
            assert r["ratio_vs_sdpa"] == pytest.approx(1.0)
            assert r["ratio_with_append"] == pytest.approx(1.0)
        if r["path"] == "mlxq_reference":
            assert r["ratio_with_append"] > 0
    for r in data["append"]:
        if r["path"] == "mlxq_reference":
            assert r["status"] == "ok"
    if not data["machine"]["metal"]:
        assert common.NA_NEEDS_METAL in stdout
        assert data["settings"]["peak_gbps"] is None  # a CPU run is no GPU-peak fraction
    _check_png(out / "attention_latency.png")


def test_decode_quick_outputs(decode_run):
    out, stdout, data = decode_run
    assert data["benchmark"] == "decode_latency"
    _check_machine(data["machine"])
    rows = data["results"]
    _check_rows(rows, ["decode_ms_median", "decode_ms_p10", "decode_ms_p90", "prefill_s",
                       "peak_memory_bytes", "kv_bytes", "ratio_vs_fp"])
    by = {(r["path"], r["context"]): r for r in rows}
    for ctx in data["settings"]["contexts"]:
        fp, mlx_lm, ref = by["fp", ctx], by["mlx_lm", ctx], by["mlxq_reference", ctx]
        assert fp["status"] == mlx_lm["status"] == ref["status"] == "ok"
        # The int4 caches hold a quarter (fp16) to an eighth (fp32) of the bytes, plus scales.
        assert ref["kv_bytes"] < 0.35 * fp["kv_bytes"]
        assert mlx_lm["kv_bytes"] < 0.35 * fp["kv_bytes"]
        assert fp["peak_memory_bytes"] > fp["kv_bytes"]
    _check_png(out / "decode_latency.png")


# --- kv_attention_error: the long-context design instrument ------------------------------
@pytest.fixture(scope="module")
def tiny_recording(tmp_path_factory):
    """A 2-layer random llama (head dim 64) run over 96 tokens, with q/k/v recorded."""
    import mlx.core as mx
    import mlxq
    from conftest import tiny_config, tiny_weights, write_hf_checkpoint
    from benchmarks import kv_attention_error

    config = tiny_config(hidden_size=256, num_attention_heads=4, num_key_value_heads=2)
    folder = write_hf_checkpoint(tmp_path_factory.mktemp("tiny") / "hf", config,
                                 tiny_weights(config), dtype="float32")
    model, _ = mlxq.load(folder)
    tokens = [int(t) for t in mx.random.randint(0, 256, (96,), key=mx.random.key(3))]
    return model, tokens, kv_attention_error.record_attention(model, tokens, chunk=40)


def test_attention_error_records_what_the_cache_stores(tiny_recording):
    """The recorded keys/values are those a full-precision cache holds after the same run
    (after RoPE, every chunk, the right layer), and the queries have the model's heads."""
    import mlx.core as mx
    import numpy as np
    from mlxq.cache import make_cache
    from mlxq.kv_config import KVCacheConfig

    model, tokens, recorded = tiny_recording
    caches = make_cache(model, KVCacheConfig(16))
    ids = mx.array([tokens])
    for a in range(0, len(tokens), 40):
        model(ids[:, a:a + 40], cache=caches)
    assert sorted(recorded) == [0, 1]
    for layer, (q, k, v) in recorded.items():
        keys, values = (np.array(x[0, :, :len(tokens)].astype(mx.float32))
                        for x in (caches[layer].keys, caches[layer].values))
        assert np.allclose(k, keys, atol=1e-5) and np.allclose(v, values, atol=1e-5)
        assert q.shape == (4, len(tokens), 64)


def test_attention_error_ranks_formats(tiny_recording):
    from benchmarks import kv_attention_error

    model, tokens, recorded = tiny_recording
    names = ["int4-g64-rot", "int8-g64-rot", "int4-g64-rot-w100", "int4-g64-rot-w16-s4",
             "int4-g64-rot+mse", "int4-g64-rot+kg32"]
    out = kv_attention_error.attention_errors(recorded, names, 48, 64 ** -0.5)
    assert len(out["int4-g64-rot"]["layers"]) == 2
    # A window holding every token leaves nothing quantized: exactly the full precision.
    assert out["int4-g64-rot-w100"]["err"] == 0 and out["int4-g64-rot-w100"]["kl"] == 0
    assert 0 < out["int8-g64-rot"]["err"] < out["int4-g64-rot"]["err"] / 4
    assert 0 < out["int8-g64-rot"]["kl"] < out["int4-g64-rot"]["kl"]
    assert 0 < out["int4-g64-rot-w16-s4"]["err"] < out["int4-g64-rot"]["err"]
    # Smaller key groups describe keys more finely; values are untouched by +kg32.
    assert out["int4-g64-rot+kg32"]["kl"] < out["int4-g64-rot"]["kl"]
    assert out["int4-g64-rot+mse"]["err"] > 0


def test_attention_error_bad_format_is_one_line(capsys):
    from benchmarks import kv_attention_error

    assert kv_attention_error.main(["--formats", "int4-g64+fast"]) == 2
    err = capsys.readouterr().err.strip()
    assert "+fast" in err and "\n" not in err


def test_attention_error_block_centering_removes_a_per_channel_offset():
    """+kblock subtracts the previous block's per-channel key mean: keys that are noise on
    top of a large per-channel offset (the range a group must cover) then quantize as
    finely as the noise alone, from the second block on; the first block is unchanged."""
    import numpy as np
    from benchmarks import kv_attention_error as kae
    from mlxq.evaluate import parse_format

    rng = np.random.default_rng(0)
    noise = rng.standard_normal((2, 192, 64)).astype(np.float32)
    keys = noise + 20 * rng.standard_normal((2, 1, 64)).astype(np.float32)
    fmt = parse_format("int4-g64")
    plain, _ = kae.stored_kv(keys, keys, fmt, set())
    centered, _ = kae.stored_kv(keys, keys, fmt, {"kblock"})
    err = lambda x, s: float(np.abs(x[:, s] - keys[:, s]).mean())  # noqa: E731
    first, rest = slice(0, kae.BLOCK), slice(kae.BLOCK, None)
    assert err(centered, first) == err(plain, first)
    assert err(centered, rest) < err(plain, rest) / 5


def test_attention_error_reads_the_caches_own_key_centering():
    """Formats with -kc go through the cache's own write path (``cache_stored_kv``): keys
    that are noise on a large per-channel offset quantize as finely as the noise alone.
    Decoded 8 tokens at a time without a window, from the second block on (centered by the
    previous block's stored mean); with a window that holds a block, or prefilled in one
    chunk, from the first block on (each block gets its own mean)."""
    import numpy as np
    from benchmarks import kv_attention_error as kae
    from mlxq.evaluate import parse_format
    from mlxq.kernels.kv_layout import CENTER_BLOCK as CB

    rng = np.random.default_rng(1)
    noise = rng.standard_normal((2, 3 * CB, 64)).astype(np.float32)
    keys = noise + 20 * rng.standard_normal((2, 1, 64)).astype(np.float32)
    plain, _ = kae.cache_stored_kv(keys, keys, parse_format("int4-g64"), 0)
    stored, _ = kae.cache_stored_kv(keys, keys, parse_format("int4-g64-kc"), 0, chunk=8)
    own, _ = kae.cache_stored_kv(keys, keys, parse_format(f"int4-g64-kc-w{CB}"), 0, chunk=8)
    prefilled, _ = kae.cache_stored_kv(keys, keys, parse_format("int4-g64-kc"), 0, chunk=2 * CB)
    err = lambda x, s: float(np.abs(x[:, s] - keys[:, s]).mean())  # noqa: E731
    first, rest = slice(0, CB), slice(CB, None)
    assert err(stored, first) == err(plain, first)
    assert err(stored, rest) < err(plain, rest) / 5
    for x in (own, prefilled):
        assert err(x, first) < err(plain, first) / 5 and err(x, rest) < err(plain, rest) / 5
    with pytest.raises(Exception, match="without -kc"):
        kae.parse("int4-g64-kc+mse")
