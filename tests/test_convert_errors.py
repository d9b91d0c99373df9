"""Bad input to ``python -m mlxq.convert``: one stderr line, non-zero exit, no traceback,
nothing left behind."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(*args, cwd):
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "mlxq.convert", "--quiet", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
    )


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """name -> (args, expected words in the message), built once."""
    from conftest import tiny_config, tiny_weights, write_hf_checkpoint

    root = tmp_path_factory.mktemp("bad")
    good = write_hf_checkpoint(root / "good", tiny_config("llama", hidden_size=96,
                                                          intermediate_size=192, num_attention_heads=3,
                                                          num_key_value_heads=1),
                               tiny_weights(tiny_config("llama", hidden_size=96, intermediate_size=192,
                                                        num_attention_heads=3, num_key_value_heads=1)))
    no_config = root / "no_config"
    no_config.mkdir()
    (no_config / "model.safetensors").write_bytes(b"")

    unsupported = write_hf_checkpoint(root / "gpt2", dict(tiny_config("llama"), model_type="gpt2"),
                                      {"x": tiny_weights(tiny_config("llama"))["model.norm.weight"]})

    truncated = write_hf_checkpoint(root / "truncated", tiny_config("llama"), tiny_weights(tiny_config("llama")))
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) * 2 // 3])

    missing = write_hf_checkpoint(root / "missing", tiny_config("llama"), {
        k: v for k, v in tiny_weights(tiny_config("llama")).items() if "layers.1.mlp.up_proj" not in k
    })

    bad_gguf = root / "cut.gguf"
    bad_gguf.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 9)
    not_gguf = root / "notes.gguf"
    not_gguf.write_text("hello")

    existing = root / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("x")

    cfg_bad_json = root / "bad_json"
    cfg_bad_json.mkdir()
    (cfg_bad_json / "config.json").write_text("{not json")
    return root, {
        "missing path": ([str(root / "nope")], "does not exist"),
        "no config.json": ([str(no_config)], "config.json"),
        "bad config.json": ([str(cfg_bad_json)], "config.json"),
        "unsupported model_type": ([str(unsupported)], "gpt2"),
        "truncated safetensors": ([str(truncated)], "truncated"),
        "missing weights": ([str(missing)], "up_proj"),
        "truncated gguf": ([str(bad_gguf)], "GGUF"),
        "not a gguf": ([str(not_gguf)], "GGUF"),
        "bad q-bits": ([str(good), "--q-bits", "3"], "--q-bits"),
        "group does not divide": ([str(good), "--q-group-size", "64"], "model.embed_tokens"),
        "bad dtype": ([str(good), "--dtype", "int8"], "dtype"),
        # Not mlxq's output: no advice to pass --force, which would not help.
        "existing output": ([str(good), "--mlx-path", str(existing)], "not written by mlxq"),
        # --force replaces only a folder mlxq wrote (or an empty one).
        "force on a non-model folder": ([str(good), "--mlx-path", str(existing), "--force"],
                                        "not written by mlxq"),
        "force onto the source": ([str(good), "--mlx-path", str(good), "--force"],
                                  "is inside --mlx-path"),
        "output under a file": ([str(good), "--mlx-path", str(not_gguf / "out")],
                                "is not a folder"),
        "empty output path": ([str(good), "--mlx-path", ""], "--mlx-path is empty"),
    }


CASE_NAMES = [
    "missing path", "no config.json", "bad config.json", "unsupported model_type",
    "truncated safetensors", "missing weights", "truncated gguf", "not a gguf", "bad q-bits",
    "group does not divide", "bad dtype", "existing output", "force on a non-model folder",
    "force onto the source", "output under a file", "empty output path",
]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input(cases, name, tmp_path):
    root, table = cases
    args, words = table[name]
    work = tmp_path / "work"
    work.mkdir()
    before = sorted(p.name for p in root.iterdir())
    if "--mlx-path" not in args:
        args = [*args, "--mlx-path", str(work / "out")]
    proc = _run("--hf-path", *args, cwd=work)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("mlxq.convert: error:") and words in lines[0], lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert list(work.iterdir()) == []  # no output, no temporary folder
    assert sorted(p.name for p in root.iterdir()) == before
    if name in ("existing output", "force on a non-model folder"):
        assert [p.name for p in (root / "existing").iterdir()] == ["keep.txt"]


def test_group_size_message_names_layer_and_width(cases, tmp_path):
    root, table = cases
    proc = _run("--hf-path", table["group does not divide"][0][0], "--q-group-size", "64",
                "--mlx-path", str(tmp_path / "o"), cwd=tmp_path)
    assert "input width 96" in proc.stderr and "--q-group-size 32" in proc.stderr


def test_interrupted_conversion_leaves_nothing(tmp_path, hf_checkpoint, monkeypatch):
    import mlxq.convert as conv

    src, _, _ = hf_checkpoint("llama")

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("mlxq.weight_check.check_weights", boom)
    with pytest.raises(KeyboardInterrupt):
        conv.convert(src, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf-llama"]
    assert json.loads((src / "config.json").read_text())["model_type"] == "llama"
