"""KV-cache quality evaluation: exact full-precision perplexity, decode-mode scheduling,
end-to-end int8/int4 figures on the default model, and the command line."""

import json
import math
import shutil

import mlx.core as mx
import numpy as np
import pytest
from mlx import nn

from mlxq.errors import MlxqError
from mlxq.kv_config import DEFAULT_GROUP_SIZE, DEFAULT_RECENT, DEFAULT_SINK
from mlxq.evaluate import (
    KVFormat,
    check_settings,
    dense_weights,
    encode_text,
    evaluate,
    main,
    schedule,
)

# Written for these tests (no third-party text in the repository): the fallback text when
# the Moby-Dick corpus cannot be fetched.
PARAGRAPH = (
    "The lighthouse keeper climbed the spiral stairs every evening at six, counting the "
    "steps aloud because his father had done the same. There were one hundred and twelve "
    "of them, worn smooth in the middle where generations of boots had pressed. At the top "
    "he trimmed the wick, polished the great lens with a soft cloth, and looked out over "
    "the grey water toward the harbour, where the fishing boats were coming home with "
    "their lanterns swinging. The wind had turned to the north during the afternoon, and "
    "he could smell the rain that would arrive before midnight. He wrote the time, the "
    "weather and the number of boats in the logbook, then sat by the window with a cup of "
    "tea that had already gone cold. Nobody in the village remembered a night when the "
    "light had failed, and he did not intend to be the first keeper to let it happen. "
)


@pytest.fixture(scope="module")
def dense_model(default_model_dir):
    """A private copy of the default model with dense weights (identical values, ~3x
    faster on CPU); the shared ``default_model`` fixture is left untouched."""
    import mlxq

    model, tokenizer = mlxq.load(default_model_dir)
    assert dense_weights(model) > 0
    return model, tokenizer


def _text():
    if shutil.which("npm"):
        from mlxq.corpus import load_text

        try:
            return load_text("moby-dick")
        except MlxqError:
            pass
    return PARAGRAPH * 8


def _direct_nll(model, window, first_target):
    """Mean NLL of window[first_target:] from one cache-less forward pass (float32)."""
    logits = model(mx.array(window[None]))
    lp = nn.log_softmax(logits[0].astype(mx.float32), axis=-1)
    targets = mx.array(window[1:])
    nll = -mx.take_along_axis(lp[:-1], targets[:, None], axis=-1)[:, 0]
    return np.array(nll, dtype=np.float64)[first_target - 1:]


@pytest.mark.parametrize("prefill", [1, 12])
def test_full_precision_perplexity_equals_direct_computation(dense_model, prefill):
    model, tokenizer = dense_model
    context, windows = 40, 2
    tokens = np.array(encode_text(tokenizer, PARAGRAPH * 2, context * windows))
    report = evaluate(model, tokenizer, tokens, [], context=context, windows=windows,
                      prefill=prefill, step=8)
    # A prefill over 8 tokens runs the prefill path: its predictions are not scored.
    first = 1 if prefill <= 8 else prefill + 1
    nll = np.concatenate([_direct_nll(model, tokens[w * context:(w + 1) * context], first)
                          for w in range(windows)])
    assert report["tokens_scored"] == nll.size == windows * (context - first)
    (fp,) = report["results"]
    assert fp["format"] == "fp"
    assert fp["ppl"] == pytest.approx(math.exp(nll.mean()), rel=1e-4)


def test_dense_weights_keep_the_logits(default_model_dir):
    import mlxq

    model, _ = mlxq.load(default_model_dir)
    ids = mx.array([[1, 200, 3000, 45]])
    before = model(ids)
    dense_weights(model)
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
    np.testing.assert_allclose(np.array(model(ids)), np.array(before), atol=1e-3)


def test_schedule_feeds_every_token_once_in_decode_sized_steps():
    for context, prefill, step in [(1024, 1, 8), (50, 12, 3), (10, 1, 1), (9, 8, 8)]:
        slices = schedule(context, prefill, step)
        assert slices[0] == (0, prefill)
        fed = [t for a, b in slices for t in range(a, b)]
        assert fed == list(range(context - 1))
        assert all(b - a <= step for a, b in slices[1:])


@pytest.mark.parametrize("args", [dict(context=10, windows=0, prefill=1, step=8),
                                  dict(context=10, windows=1, prefill=1, step=9),
                                  dict(context=10, windows=1, prefill=0, step=8),
                                  dict(context=3, windows=1, prefill=2, step=8),
                                  dict(context=10, windows=1, prefill=1, step=8, batch=0)])
def test_bad_settings_are_user_errors(args):
    with pytest.raises(MlxqError):
        check_settings(**args)


@pytest.mark.slow
def test_end_to_end_int8_and_int4_quality_on_the_default_model(dense_model):
    """2 windows x 512 tokens through the real quantized caches, with make_cache's defaults
    (group 64, rotation, keys centered, 304 recent and 4 first tokens in full precision). Bounds are an order of
    magnitude looser than the full-size targets (docs/quality.md): short windows are noisy."""
    model, tokenizer = dense_model
    context, windows = 512, 2  # about half of each window attends to quantized tokens
    tokens = encode_text(tokenizer, _text(), context * windows)
    defaults = dict(rotation=True, recent=DEFAULT_RECENT, sink=DEFAULT_SINK)
    int8 = KVFormat(8, DEFAULT_GROUP_SIZE, **defaults)
    int4 = KVFormat(4, DEFAULT_GROUP_SIZE, **defaults)
    report = evaluate(model, tokenizer, tokens, [int8, int4], context=context,
                      windows=windows)
    assert report["decode_tokens_scored"] == windows * (context - 1)
    fp, r8, r4 = report["results"]
    suffix = f"g64-rot-kc-w{DEFAULT_RECENT}-s{DEFAULT_SINK}"
    assert [r["format"] for r in report["results"]] == ["fp", f"int8-{suffix}", f"int4-{suffix}"]
    assert 1 < fp["ppl"] < 200
    assert abs(r8["rel_ppl_change"]) < 0.01
    assert r8["kl_mean"] < 0.005 and r8["top1_agreement"] >= 0.97
    assert abs(r4["rel_ppl_change"]) < 0.05
    assert r4["kl_mean"] < 0.05 and r4["top1_agreement"] >= 0.90
    # int4 must lose more than int8: otherwise the quantized path is not being exercised.
    assert r4["kl_mean"] > r8["kl_mean"]


def test_cli_reports_and_writes_json(default_model_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(PARAGRAPH)
    out = tmp_path / "report.json"
    rc = main(["--text-file", str(text), "--context", "24", "--windows", "1",
               "--kv-bits", "8", "--kv-group-size", "64", "--kv-recent", "0", "--kv-sink", "0", "--json", str(out), "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "scored 23 tokens, all in decode mode" in printed
    assert "int8-g64-rot-kc" in printed
    report = json.loads(out.read_text())
    assert [r["format"] for r in report["results"]] == ["fp", "int8-g64-rot-kc"]
    # No window or sink: every token is one int8 row of codes plus a (scale, bias) half
    # pair per group of 64, for keys and values, and a CENTER_BLOCK-th of a float16 key
    # center, against 2 x 64 float16 values.
    from mlxq.kernels.kv_layout import CENTER_BLOCK

    d = 64
    row = 2 * (d + 4 * (d // 64)) + 2 * d / CENTER_BLOCK
    assert report["results"][1]["kv_bytes_ratio"] == pytest.approx(row / (2 * d * 2))
    assert f"{row / (2 * d * 2):.3f}x" in printed
    assert report["weights"] == "dense" or mx.metal.is_available()
    # An existing report is kept unless --force, and the refusal comes before any work.
    before = out.read_text()
    assert main(["--text-file", str(text), "--json", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "already exists" in err and "--force" in err and "\n" not in err
    assert out.read_text() == before
    assert main(["--text-file", str(text), "--context", "24", "--windows", "1",
                 "--formats", "int4-g64", "--json", str(out), "--force", "--quiet"]) == 0
    assert [r["format"] for r in json.loads(out.read_text())["results"]] == ["fp", "int4-g64"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "t.txt"]  # no temp left


@pytest.mark.parametrize("argv, message", [
    (["--step", "9"], "--step"),
    (["--batch", "0"], "--batch"),
    (["--kv-bits", "16"], "no quantized format"),
    (["--text-file", "/nonexistent/x.txt"], "does not exist"),
    (["--context", "2", "--prefill", "1"], "--context"),
    (["--json", "/"], "is a folder"),
])
def test_cli_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mlxq.evaluate: error:") and message in err
    assert "\n" not in err


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A 2-layer random llama with head dim 64 (what the quantized caches support)."""
    import mlxq
    from conftest import tiny_config, tiny_weights, write_hf_checkpoint

    config = tiny_config(hidden_size=256, num_attention_heads=4, num_key_value_heads=2)
    folder = write_hf_checkpoint(tmp_path_factory.mktemp("tiny") / "hf", config,
                                 tiny_weights(config), dtype="float32")
    return mlxq.load(folder)


def test_batched_windows_give_the_numbers_of_one_window_at_a_time(tiny_model):
    """--batch runs windows as rows of one batch; every figure must match batch 1 (one
    window after another, the unbatched schedule), including each window's perplexity."""
    model, tokenizer = tiny_model
    context, windows = 30, 3
    tokens = np.random.default_rng(0).integers(3, 320, context * windows)
    formats = [KVFormat(4, 64, True, 0, 0, 0), KVFormat(4, 64, True, 0, 8, 2),
               KVFormat(8, 64, False, 0, 0, 0)]
    reports = [evaluate(model, tokenizer, tokens, formats, context=context, windows=windows,
                        batch=b) for b in (1, 2, 3)]
    base = reports[0]["results"]
    assert [r["format"] for r in base] == ["fp"] + [f.name for f in formats]
    assert base[1]["kl_mean"] > 0 and base[1]["top1_agreement"] < 1  # int4 is exercised
    for report in reports[1:]:
        assert report["tokens_scored"] == reports[0]["tokens_scored"] == windows * (context - 1)
        for one, batched in zip(base, report["results"]):
            for key in ("ppl", "rel_ppl_change", "kl_mean", "kl_p99", "top1_agreement"):
                if key in one:
                    assert batched[key] == pytest.approx(one[key], rel=1e-5, abs=1e-7), key
            np.testing.assert_allclose(batched["window_ppl"], one["window_ppl"], rtol=1e-5)
