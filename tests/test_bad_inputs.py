"""Bad input to every command and to the Python API, over one table.

For each case: a non-zero exit (or MlxqError from the API), exactly one line on stderr, no
traceback, no core dump, and every file around it byte-for-byte unchanged (a hash of the
whole sandbox before and after). Commands run in-process through their ``main(argv)``
(what ``python -m`` runs) except where a real process is the point: stdin bytes, signals.
SIGTERM / SIGINT during a command that writes leave nothing behind.
"""

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest

from conftest import tiny_config, tiny_weights, write_hf_checkpoint

import mlxq
from mlxq.errors import MlxqError

REPO = Path(__file__).resolve().parents[1]
TEXT = ("It was a bright cold day in April, and the clocks were striking thirteen. " * 40)
# head_dim 64: takes the quantized KV cache with groups 32 and 64, not 128.
CONFIG = tiny_config("llama", hidden_size=128, num_attention_heads=2, num_key_value_heads=1)
NOT_UTF8 = os.fsdecode(b"caf\xe9 \xff")  # what Python makes of non-UTF-8 bytes in argv


# --- the sandbox: every input lives here, and must not change ------------------------------
def snapshot(root: Path) -> dict:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "link -> " + os.readlink(p)
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _config_variant(root, base, name, **changes):
    """A copy of folder ``base`` whose config.json has ``changes`` (None: key removed)."""
    folder = shutil.copytree(base, root / name)
    config = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            config.pop(k, None)
        else:
            config[k] = v
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _word_tokenizer(folder, n, added=0):
    """A tokenizer.json with ``n`` tokens and ``added`` added tokens after them."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(n)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_tokens([AddedToken(f"x{i}", normalized=False) for i in range(added)])
    tok.save(str(folder / "tokenizer.json"))


BAD_CONFIGS = {
    "heads-as-text": {"num_attention_heads": "eight"},
    "negative-hidden": {"hidden_size": -128},
    "rope-scaling-yes": {"rope_scaling": "yes"},
    "rope-factor-zero": {"rope_scaling": {"rope_type": "linear", "factor": 0}},
    "kv-heads-do-not-divide": {"num_key_value_heads": 3},
    "hidden-not-multiple-of-heads": {"num_attention_heads": 3, "num_key_value_heads": 1},
    "odd-head-dim": {"head_dim": 63},
    "zero-vocab": {"vocab_size": 0},
    "huge-layers": {"num_hidden_layers": 10**9},
    "eps-as-text": {"rms_norm_eps": "tiny"},
    "tie-as-text": {"tie_word_embeddings": "no"},
    "eos-as-text": {"eos_token_id": "end"},
    "positions-negative": {"max_position_embeddings": -1},
    "no-layers-key": {"num_hidden_layers": None},
    "bits-as-text": {"quantization": {"bits": "four", "group_size": 64}},
}


def _other_arch_gguf(path):
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "mamba")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _mamba_folder(folder):
    """A float mlx-lm mamba model (SSM layers: no keys/values to quantize)."""
    from mlx.utils import tree_flatten

    from conftest import write_tiny_tokenizer
    from mlxq.models import build_model

    config = {"model_type": "mamba", "vocab_size": 320, "hidden_size": 64,
              "intermediate_size": 128, "state_size": 8, "num_hidden_layers": 2,
              "conv_kernel": 4, "use_bias": False, "use_conv_bias": True, "time_step_rank": 8,
              "tie_word_embeddings": True, "eos_token_id": 0}
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(folder / "model.safetensors"),
                        dict(tree_flatten(build_model(config).parameters())))
    write_tiny_tokenizer(folder)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    from mlxq.convert import convert
    from test_gguf_import import write_tiny_gguf

    root = tmp_path_factory.mktemp("sandbox")
    weights = tiny_weights(CONFIG)
    hf = write_hf_checkpoint(root / "hf", CONFIG, weights)
    mlx = convert(hf, root / "mlx", progress=False)
    write_hf_checkpoint(root / "other-hf", CONFIG, weights)  # someone's checkpoint
    # An earlier output with the GGUF it came from lying inside it (issue 13's data loss).
    shutil.copytree(mlx, root / "out-with-source")
    write_tiny_gguf(root / "out-with-source" / "source.gguf", CONFIG, weights, {})
    shutil.copy(root / "out-with-source" / "source.gguf", root / "model.gguf")
    # 400 tokens in its vocabulary, 320 rows in its embedding.
    write_tiny_gguf(root / "big-vocab.gguf", {**CONFIG, "vocab_size": 400}, weights, {})
    (root / "gguf-folder").mkdir()
    shutil.copy(root / "model.gguf", root / "gguf-folder" / "model.gguf")
    for name, changes in BAD_CONFIGS.items():
        _config_variant(root, hf, f"hf-{name}", **changes)
        _config_variant(root, mlx, f"mlx-{name}", **changes)
    big = shutil.copytree(mlx, root / "mlx-big-tokenizer")
    _word_tokenizer(big, 400)
    # Its vocabulary fits the embedding, but added tokens go past it (ids 300..329 > 319).
    _word_tokenizer(shutil.copytree(mlx, root / "mlx-added-tokens"), 300, added=30)
    big_hf = shutil.copytree(hf, root / "hf-big-tokenizer")
    _word_tokenizer(big_hf, 400)
    (shutil.copytree(hf, root / "hf-broken-tokenizer") / "tokenizer.json").write_text("{oops")
    (shutil.copytree(hf, root / "hf-broken-tokenizer-config")
     / "tokenizer_config.json").write_bytes(b"\xff\xfe{")
    (shutil.copytree(hf, root / "hf-broken-generation-config")
     / "generation_config.json").write_text('{"eos_token_id": "end"}')
    (shutil.copytree(mlx, root / "mlx-generation-config-list")
     / "generation_config.json").write_text("[1, 2]")
    missing = shutil.copytree(hf, root / "hf-missing-weight")
    from mlxq.safetensors_io import load_weights

    w = load_weights(missing)
    del w["model.layers.1.mlp.up_proj.weight"]
    (missing / "model.safetensors").unlink()
    mx.save_safetensors(str(missing / "model.safetensors"), w)

    bad_template = shutil.copytree(mlx, root / "mlx-bad-template")
    tok_config = json.loads((bad_template / "tokenizer_config.json").read_text())
    tok_config["chat_template"] = "{{ raise_exception('roles must alternate') }}"
    (bad_template / "tokenizer_config.json").write_text(json.dumps(tok_config))
    (shutil.copytree(mlx, root / "mlx-header-list") / "model.safetensors").write_bytes(
        (2).to_bytes(8, "little") + b"[]")
    (shutil.copytree(mlx, root / "mlx-deep-config") / "config.json").write_text("[" * 100000)
    (shutil.copytree(mlx, root / "mlx-index-list")
     / "model.safetensors.index.json").write_text('{"weight_map": []}')
    # GGUFs mlxq cannot import: another architecture, a tensor type nothing dequantizes.
    write_tiny_gguf(root / "int32-tensor.gguf", CONFIG, weights, {"blk.0.attn_norm.weight": "I32"})
    _other_arch_gguf(root / "mamba.gguf")
    # An architecture neither mlxq nor mlx-lm knows; one whose layers keep SSM state.
    _config_variant(root, hf, "hf-unknown-arch", model_type="no_such_arch")
    _config_variant(root, mlx, "mlx-unknown-arch", model_type="no_such_arch")
    _mamba_folder(root / "mlx-mamba")

    (root / "text.txt").write_text(TEXT)
    (root / "binary.bin").write_bytes(bytes(range(256)) * 8)
    (root / "utf16.txt").write_text(TEXT, encoding="utf-16")
    (root / "utf16le.txt").write_bytes(TEXT.encode("utf-16-le"))
    (root / "latin1.txt").write_bytes(("caf\xe9 " * 200).encode("latin-1"))
    (root / "blank.txt").write_text("  \n\n")
    (root / "report.json").write_text("{}")
    (root / "a-file").write_text("not a folder")
    (root / "bench").mkdir()
    for name in ("attention_latency", "decode_latency"):
        (root / "bench" / f"{name}.json").write_text("{}")
    return root


@pytest.fixture
def in_sandbox(sandbox, monkeypatch):
    monkeypatch.chdir(sandbox)
    monkeypatch.delenv("MLXQ_KERNELS", raising=False)
    before = snapshot(sandbox)
    yield sandbox
    assert snapshot(sandbox) == before, "bad input changed files around it"


def assert_one_line(err: str, prefix: str):
    lines = err.strip().splitlines()
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert lines[0].startswith(prefix), lines[0]
    return lines[0]


# --- the command lines -----------------------------------------------------------------------
def _mains():
    import benchmarks.attention_latency as attention
    import benchmarks.decode_latency as decode
    import benchmarks.emulator_speed as emulator
    from mlxq import convert, evaluate
    from mlxq import generate as gen

    return {"convert": convert.main, "generate": sys.modules["mlxq.generate"].main,
            "evaluate": evaluate.main, "attention": attention.main, "decode": decode.main,
            "emulator": emulator.main}


PREFIX = {"convert": "mlxq.convert: error:", "generate": "mlxq.generate: error:",
          "evaluate": "mlxq.evaluate: error:", "attention": "benchmarks.attention_latency",
          "decode": "benchmarks.decode_latency", "emulator": "benchmarks.emulator_speed"}

M = ["--model", "mlx"]
EVAL = ["--model", "mlx", "--text-file", "text.txt", "--context", "16", "--windows", "1",
        "--quiet"]
CLI_CASES = [
    # (command, argv, words in the message)
    ("convert", [], "--hf-path"),
    ("convert", ["--hf-path", "hf", "--bogus"], "--bogus"),
    ("convert", ["--hf-path", "hf", "--q-bits", "x"], "--q-bits"),
    ("convert", ["--hf-path", "hf", "--q-bits", "3"], "--q-bits"),
    ("convert", ["--hf-path", "hf", "--q-group-size", "48"], "--q-group-size"),
    ("convert", ["--hf-path", "nowhere"], "does not exist"),
    ("convert", ["--hf-path", "missing.gguf"], "does not exist"),
    ("convert", ["--hf-path", "text.txt"], "not a GGUF"),
    ("convert", ["--hf-path", "gguf-folder"], "pass the file: gguf-folder/model.gguf"),
    ("convert", ["--hf-path", "big-vocab.gguf", "--mlx-path", "new/out"], "400 tokens"),
    ("convert", ["--hf-path", "hf", "--mlx-path", ""], "empty"),
    ("convert", ["--hf-path", "hf", "--mlx-path", "mlx"], "--force"),
    ("convert", ["--hf-path", "hf", "--mlx-path", "a-file/out"], "not a folder"),
    ("convert", ["--hf-path", "hf", "--mlx-path", "a-file", "--force"], "is a file"),
    # Data loss (issue 13): the source inside the folder --force would replace...
    ("convert", ["--hf-path", "out-with-source/source.gguf", "--mlx-path", "out-with-source",
                 "--force"], "inside"),
    ("convert", ["--hf-path", "hf", "--mlx-path", "hf", "--force"], "inside"),
    # ... and someone's checkpoint that mlxq did not write: no --force advice, no deletion.
    ("convert", ["--hf-path", "hf", "--mlx-path", "other-hf"], "not written by mlxq"),
    ("convert", ["--hf-path", "hf", "--mlx-path", "other-hf", "--force"], "not written by mlxq"),
    ("convert", ["--hf-path", "mlx"], "already quantized"),
    ("convert", ["--hf-path", "hf", "--mlx-path", "."], "inside"),
    ("convert", ["--hf-path", "hf", "--mlx-path", "/", "--force"], "inside"),
    ("convert", ["--hf-path", "/work/../nowhere", "--mlx-path", "/", "--force"],
     "not written by mlxq"),
    ("convert", ["--hf-path", "mamba.gguf"], "GGUF architecture 'mamba' is not supported"),
    ("convert", ["--hf-path", "int32-tensor.gguf"], "GGUF type I32"),
    ("convert", ["--hf-path", "hf-unknown-arch"], "not known to mlxq or to mlx-lm"),
    ("convert", ["--hf-path", "hf-big-tokenizer"], "400 tokens"),
    ("convert", ["--hf-path", "hf-broken-tokenizer"], "tokenizer.json"),
    ("convert", ["--hf-path", "hf-broken-tokenizer-config"], "tokenizer_config.json"),
    ("convert", ["--hf-path", "hf-broken-generation-config"], "eos_token_id"),
    # A failure after the temporary folder exists: no empty parents are left either.
    ("convert", ["--hf-path", "hf-missing-weight", "--mlx-path", "new/deep/out"], "up_proj"),
    *[("convert", ["--hf-path", f"hf-{name}"], next(iter(changes)))
      for name, changes in BAD_CONFIGS.items() if name not in ("bits-as-text",)],

    ("generate", ["--bogus"], "--bogus"),
    ("generate", ["--max-tokens", "0"], "--max-tokens"),
    ("generate", ["--max-tokens", "many"], "--max-tokens"),
    ("generate", ["--temp", "-1"], "temperature"),
    ("generate", ["--temp", "nan"], "temperature"),
    ("generate", ["--top-p", "0"], "top-p"),
    ("generate", ["--seed", "-1"], "seed"),
    ("generate", ["--prefill-step-size", "0"], "--prefill-step-size"),
    ("generate", ["--kv-bits", "3"], "--kv-bits"),
    ("generate", ["--kv-bits", "4", "--kv-group-size", "48"], "--kv-group-size"),
    ("generate", ["--kv-recent", "8"], "quantized KV cache only"),
    ("generate", ["--kv-recent", "0"], "quantized KV cache only"),
    ("generate", ["--no-kv-rotation"], "quantized KV cache only"),
    ("generate", ["--kv-group-size", "32"], "quantized KV cache only"),
    ("generate", ["--kv-key-bits", "8"], "quantized KV cache only"),
    ("generate", ["--kv-bits", "4", "--kv-key-bits", "2"], "--kv-key-bits"),
    ("generate", ["--kv-bits", "4", "--kv-sink", "-1"], "--kv-sink"),
    ("generate", ["--prompt", "  "], "empty"),
    ("generate", ["--prompt", NOT_UTF8], "UTF-8"),
    ("generate", ["--prompt", "hi", "--system", NOT_UTF8], "UTF-8"),
    ("generate", ["--model", "nowhere"], "no such file"),
    ("generate", ["--model", "model.gguf"], "mlxq.convert"),
    ("generate", ["--model", "text.txt"], "not a model folder"),
    ("generate", ["--model", "mlx-big-tokenizer"], "400 tokens"),
    ("generate", ["--model", "mlx-unknown-arch"], "not known to mlxq or to mlx-lm"),
    ("generate", ["--model", "mlx-mamba", "--kv-bits", "4"], "recurrent state"),
    ("evaluate", ["--model", "mlx-mamba", "--text-file", "text.txt", "--context", "16",
                  "--windows", "1", "--quiet"], "recurrent state"),
    ("generate", ["--model", "mlx-generation-config-list"], "generation_config.json"),
    ("generate", [*M, "--prompt", "word " * 600, "--max-tokens", "1"], "context"),
    ("generate", ["--model", "mlx-bad-template", "--prompt", "hi"], "chat template"),
    ("generate", ["--model", "mlx-added-tokens", "--prompt", "w1 x29", "--max-tokens", "1",
                  "--ignore-chat-template"], "tokenizer produced token id 329"),
    ("generate", ["--model", "mlx-header-list"], "not a valid safetensors"),
    ("generate", ["--model", "mlx-deep-config"], "nested too deeply"),
    ("generate", ["--model", "mlx-index-list"], "model.safetensors.index.json"),
    ("generate", ["--model", ""], "--model is empty"),
    ("generate", [*M, "--kv-bits", "8", "--kv-group-size", "128"], "--kv-group-size 32 or 64"),
    *[("generate", ["--model", f"mlx-{name}"], next(iter(changes)))
      for name, changes in BAD_CONFIGS.items()],

    ("evaluate", ["--bogus"], "--bogus"),
    ("evaluate", [*EVAL, "--json", "text.txt", "--force"], "--text-file itself"),
    ("evaluate", [*EVAL, "--json", "report.json"], "--force"),
    ("evaluate", [*EVAL, "--json", "bench"], "is a folder"),
    ("evaluate", [*EVAL[:2], "--text-file", "binary.bin"], "UTF-8"),
    ("evaluate", [*EVAL[:2], "--text-file", "utf16.txt"], "UTF-16"),
    ("evaluate", [*EVAL[:2], "--text-file", "utf16le.txt"], "NUL"),
    ("evaluate", [*EVAL[:2], "--text-file", "latin1.txt"], "UTF-8"),
    ("evaluate", [*EVAL[:2], "--text-file", "blank.txt"], "no text"),
    ("evaluate", [*EVAL[:2], "--text-file", "nowhere.txt"], "does not exist"),
    ("evaluate", [*EVAL[:2], "--text-file", "bench"], "is a folder"),
    ("evaluate", [*EVAL[:2], "--text-file", "/dev/null"], "regular file"),
    ("evaluate", [*EVAL, "--json", ""], "empty"),
    ("evaluate", [*EVAL, "--windows", "0"], "--windows"),
    ("evaluate", [*EVAL, "--windows", "100000"], "tokens"),
    ("evaluate", [*EVAL, "--step", "0"], "--step"),
    ("evaluate", [*EVAL, "--context", "1"], "--context"),
    ("evaluate", [*EVAL, "--kv-bits", "16", "--kv-recent", "8"], "quantized KV cache only"),
    ("evaluate", [*EVAL, "--formats", "int4-g64", "--kv-bits", "4"], "--formats"),
    ("evaluate", [*EVAL, "--formats", "int3-g64"], "kv_bits"),
    ("evaluate", [*EVAL, "--formats", "fp8"], "bad KV format"),
    ("evaluate", [*EVAL, "--kv-group-size", "128"], "--kv-group-size 32 or 64"),
    ("evaluate", [*EVAL, "--context", "100000"], "positions"),

    *[(bench, ["--out", "bench", *args], words)
      for bench in ("attention", "decode")
      for args, words in (
          (["--warmup", "-1"], "--warmup"), (["--peak-gbps", "-5"], "--peak-gbps"),
          (["--peak-gbps", "nan"], "--peak-gbps"), (["--peak-gbps", "inf"], "--peak-gbps"),
          (["--contexts", "0"], "--contexts"), (["--contexts", "x"], "--contexts"),
          (["--contexts", str(1 << 40)], "--contexts"),
          (["--models", "nope"], "nope"), (["--bits", "3"], "--bits"),
          (["--bogus"], "--bogus"), ([], "--force"))],
    ("attention", ["--out", "out", "--inner", "0"], "--inner"),
    ("attention", ["--out", "out", "--inner", "-1"], "--inner"),
    ("attention", ["--out", "out", "--reps", "0"], "--reps"),
    ("attention", ["--out", "a-file", "--quick"], "not a folder"),
    ("decode", ["--out", "out", "--decode-tokens", "0"], "--decode-tokens"),
    ("decode", ["--out", "out", "--prefill-step", "0"], "--prefill-step"),
    ("decode", ["--out", "out", "--recent", "-1"], "--recent"),
    ("emulator", ["--bogus"], "--bogus"),
    ("emulator", ["extra"], "extra"),
]


def _case_id(case):
    command, argv, _ = case
    return f"{command}:" + " ".join(a if len(a) < 30 else a[:12] + "..." for a in argv)


@pytest.mark.parametrize("case", CLI_CASES, ids=[_case_id(c) for c in CLI_CASES])
def test_command_line(case, in_sandbox, capsys):
    command, argv, words = case
    rc = _mains()[command](argv)
    out, err = capsys.readouterr()
    assert rc != 0
    line = assert_one_line(err, PREFIX[command])
    assert words in line, line


@pytest.mark.parametrize("command, argv", [
    ("convert", ["--hf-path", "hf", "--mlx-path", "new"]),
    ("generate", M), ("evaluate", EVAL),
    ("attention", ["--out", "out", "--quick"]), ("decode", ["--out", "out", "--quick"]),
    ("emulator", []),
])
def test_bad_kernel_backend_is_reported_at_startup(command, argv, in_sandbox, capsys,
                                                   monkeypatch):
    monkeypatch.setenv("MLXQ_KERNELS", "bogus")
    assert _mains()[command](argv) != 0
    line = assert_one_line(capsys.readouterr().err, PREFIX[command])
    assert "MLXQ_KERNELS='bogus'" in line


def test_usage_errors_are_one_line_and_help_is_whole(capsys):
    """--help still prints the whole usage (exit 0), including for emulator_speed.py,
    and states the real defaults."""
    from mlxq.kv_config import DEFAULT_RECENT

    for command in ("generate", "evaluate", "emulator", "decode"):
        with pytest.raises(SystemExit) as e:
            _mains()[command](["--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("usage:") and len(out.splitlines()) > 3
    assert f"(default: mlxq's, {DEFAULT_RECENT})" in " ".join(out.split())


def _run(args, stdin=None, env=None, cwd=None):
    return subprocess.run([sys.executable, *args], input=stdin, capture_output=True,
                          cwd=cwd, env={**os.environ, **(env or {})}, timeout=300)


@pytest.mark.parametrize("script, argv, prefix", [
    ("benchmarks/attention_latency.py", ["--inner", "0"], "attention_latency.py: error:"),
    ("benchmarks/emulator_speed.py", ["--bogus"], "emulator_speed.py: error:"),
])
def test_benchmark_scripts_as_run_by_hand(script, argv, prefix, in_sandbox):
    proc = _run([str(REPO / script), *argv], cwd=in_sandbox)
    assert proc.returncode == 2
    assert_one_line(proc.stderr.decode(), prefix)


def test_prompt_bytes_that_are_not_utf8_on_stdin(in_sandbox):
    proc = _run(["-m", "mlxq.generate", *M, "--prompt", "-"], stdin=b"caf\xe9 \xff\xfe",
                env={"PYTHONPATH": str(REPO)}, cwd=in_sandbox)
    assert proc.returncode == 2
    assert "UTF-8" in assert_one_line(proc.stderr.decode(), "mlxq.generate: error:")


def test_prompt_on_stdin_in_process(in_sandbox, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("\xff".encode("latin-1"))))
    assert _mains()["generate"]([*M, "--prompt", "-"]) == 2
    assert "stdin" in assert_one_line(capsys.readouterr().err, "mlxq.generate: error:")


# --- the Python API ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(sandbox):
    return mlxq.load(sandbox / "mlx")


API_PROMPTS = [
    ([10**12], "outside"), ([-1], "outside"), ([CONFIG["vocab_size"]], "outside"),
    ([2**31], "outside"), ([1.5], "integer ids"), ([[1, 2]], "integer ids"),
    (None, "token ids"), (b"bytes", "token ids"), (7, "integer ids"), ([], "empty"),
    (NOT_UTF8, "UTF-8"), (mx.array([[1, 2], [3, 4]]), "integer ids"),
    (mx.array([1.0, 2.0]), "integer ids"),
]
API_OPTIONS = [
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": "5"}, "max_tokens"),
    ({"max_tokens": 2.5}, "max_tokens"), ({"max_tokens": True}, "max_tokens"),
    ({"temp": "hot"}, "temperature"), ({"temp": float("inf")}, "temperature"),
    ({"top_p": 2}, "top-p"), ({"seed": -1}, "seed"), ({"seed": 1.5}, "seed"),
    ({"prefill_step_size": 0}, "prefill_step_size"), ({"kv_bits": 3}, "kv_bits"),
    ({"kv_bits": 4, "kv_group_size": 48}, "kv_group_size"),
    ({"kv_bits": 4, "kv_recent": -1}, "kv_recent"), ({"no_such_option": 1}, "option"),
    ({"system": NOT_UTF8}, "UTF-8"),
]


@pytest.mark.parametrize("entry", ["generate", "stream_generate"])
@pytest.mark.parametrize("prompt, words", API_PROMPTS, ids=[str(i) for i in range(len(API_PROMPTS))])
def test_api_prompts(tiny, entry, prompt, words):
    model, tokenizer = tiny
    with pytest.raises(MlxqError, match=words) as e:
        result = getattr(mlxq, entry)(model, tokenizer, prompt, max_tokens=2)
        list(result) if entry == "stream_generate" else None
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("options, words", API_OPTIONS, ids=[str(i) for i in range(len(API_OPTIONS))])
def test_api_options(tiny, options, words):
    model, tokenizer = tiny
    with pytest.raises(MlxqError, match=words):
        mlxq.generate(model, tokenizer, "hello", **{"max_tokens": 2, **options})
    with pytest.raises(MlxqError, match=words):
        list(mlxq.stream_generate(model, tokenizer, "hello", **{"max_tokens": 2, **options}))


@pytest.mark.parametrize("options", [{"kv_bits": 3}, {"kv_bits": 4, "kv_group_size": 128},
                                     {"kv_bits": 8, "kv_group_size": 7},
                                     {"kv_bits": 4, "kv_sink": -2}])
def test_api_make_cache(tiny, options):
    from mlxq.cache import make_cache

    with pytest.raises(MlxqError):
        make_cache(tiny[0], **options)


@pytest.mark.parametrize("folder, words", [
    ("nowhere", "does not exist"), ("text.txt", "not a model folder"),
    ("model.gguf", "mlxq.convert"), ("missing.gguf", "does not exist"),
    ("mlx-big-tokenizer", "400 tokens"), ("hf-broken-tokenizer", "tokenizer.json"),
    ("mlx-generation-config-list", "generation_config.json"),
    *[(f"mlx-{name}", next(iter(changes))) for name, changes in BAD_CONFIGS.items()],
])
def test_api_load(folder, words, in_sandbox):
    with pytest.raises(MlxqError) as e:
        mlxq.load(folder)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_damaged_default_model_says_how_to_recover(tmp_path, monkeypatch):
    from mlxq import default_model

    target = tmp_path / "models" / default_model.DEFAULT_MODEL_NAME
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    monkeypatch.setenv("MLXQ_HOME", str(tmp_path))
    with pytest.raises(MlxqError, match=f"remove {target}"):
        default_model.default_model_path()


def test_token_ids_at_the_edge_of_the_vocabulary_work(tiny):
    model, tokenizer = tiny
    n = CONFIG["vocab_size"]
    assert len(list(mlxq.stream_generate(model, tokenizer, [0, n - 1], max_tokens=2))) >= 1


# --- what --force may replace, and how --------------------------------------------------------
def test_force_replaces_mlxq_output_through_a_symlink(sandbox, tmp_path, capsys):
    from mlxq.convert import main

    real = shutil.copytree(sandbox / "mlx", tmp_path / "real")
    (real / "stale.txt").write_text("from an earlier conversion")
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    assert main(["--hf-path", str(sandbox / "hf"), "--mlx-path", str(link), "--quiet",
                 "--force"]) == 0
    assert link.is_symlink() and link.resolve() == real
    assert not (real / "stale.txt").exists() and (real / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]  # no .old-* left


def test_force_onto_an_empty_folder_and_output_is_marked(sandbox, tmp_path):
    from mlxq.convert import convert
    from mlxq.output_files import MARKER

    (tmp_path / "empty").mkdir()
    out = convert(sandbox / "hf", tmp_path / "empty", force=True, progress=False)
    assert (out / MARKER).is_file()


# --- signals: nothing left behind ------------------------------------------------------------
def _interruptible():
    """Child processes start with SIGINT at its default, as from a terminal: a runner that
    launched the tests in the background (SIGINT ignored, as nohup does) would otherwise
    pass the ignore on, and Python then rightly never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(autouse=True)
def _sigint_raises_keyboard_interrupt():
    """The same for this process: Ctrl-C raises KeyboardInterrupt during each test."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _send_when(proc, ready, sig, timeout=240):
    """Send ``sig`` once ``ready()`` is true (the command is mid-write); the process must
    still be running then, or the test proves nothing."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the command never started writing"
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err.decode()


def _temp_folder_in(folder: Path):
    return lambda: folder.exists() and any(p.name.startswith(".") and ".tmp-" in p.name
                                           for p in folder.iterdir())


@pytest.fixture(scope="module")
def default_gguf():
    from mlxq.default_model import default_gguf_path

    return default_gguf_path()


@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "terminated"),
                                             (signal.SIGINT, 130, "interrupted")])
def test_signal_mid_conversion_leaves_nothing(default_gguf, tmp_path, sig, code, word):
    """A real signal to a real conversion (the default model's GGUF: seconds of work)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlxq.convert", "--hf-path", str(default_gguf),
         "--mlx-path", str(tmp_path / "deep" / "out"), "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_interruptible,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    rc, err = _send_when(proc, _temp_folder_in(tmp_path / "deep"), sig)
    assert rc == code, err
    assert word in assert_one_line(err, "mlxq.convert:")
    assert list(tmp_path.iterdir()) == []  # no temp folder, no parent it created


def test_sigterm_during_default_model_first_use_leaves_nothing(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlxq.generate", "--max-tokens", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_interruptible,
        env={**os.environ, "PYTHONPATH": str(REPO), "MLXQ_HOME": str(home)})
    rc, err = _send_when(proc, _temp_folder_in(home / "models"), signal.SIGTERM)
    assert rc == 143, err
    assert_one_line(err, "mlxq.generate: terminated")
    assert list(home.iterdir()) == []


def _signal_self(sig):
    os.kill(os.getpid(), sig)
    time.sleep(0.05)  # the handler runs in this thread at the next bytecode


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_while_evaluate_writes_json_leaves_nothing(sig, code, in_sandbox, capsys,
                                                          monkeypatch):
    """A real signal (to this process, through cli_main's handler) while the report is
    being written: no report, no temporary file."""
    import mlxq.evaluate as ev

    def write_then_signal(path, text):
        from mlxq import output_files

        with output_files.replacing(path) as tmp:
            tmp.write_text(text[: len(text) // 2])
            _signal_self(sig)

    monkeypatch.setattr(ev, "write_text_file", write_then_signal)
    assert ev.main([*EVAL, "--json", "new-report.json", "--kv-bits", "8"]) == code
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("mlxq.evaluate: ")


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_while_benchmark_writes_leaves_nothing(sig, code, in_sandbox, capsys,
                                                      monkeypatch):
    """The JSON is written, the PNG is being drawn: neither file appears."""
    import benchmarks.decode_latency as decode

    def plot_then_signal(path, results, machine):
        Path(path).write_bytes(b"\x89PNG half")
        _signal_self(sig)

    monkeypatch.setattr(decode, "plot", plot_then_signal)
    monkeypatch.setattr(decode, "run_model", lambda name, args, dtype: [])
    assert decode.main(["--out", "new-bench/results", "--quick"]) == code
    capsys.readouterr()


def test_sigterm_mid_conversion_in_process(in_sandbox, monkeypatch, capsys):
    """The same through the Python API's cleanup: convert() itself turns SIGTERM into
    Terminated while it writes, so mlxq.load's first-use conversion cleans up too."""
    from mlxq.convert import convert
    from mlxq.errors import Terminated

    monkeypatch.setattr("mlxq.weight_check.check_weights",
                        lambda *a, **k: _signal_self(signal.SIGTERM))
    with pytest.raises(Terminated):
        convert("hf", "new/out", progress=False)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
