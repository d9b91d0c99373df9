"""Float-source conversion: tiny random Llama / Qwen2 / Qwen3 checkpoints."""

import json

import mlx.core as mx
import numpy as np
import pytest

import mlxq
from mlxq.convert import convert, main
from mlxq.safetensors_io import load_weights, save_weights

from conftest import mlx_lm_float32



@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_convert_load_run(tmp_path, hf_checkpoint, model_type):
    src, config, original = hf_checkpoint(model_type)
    out = convert(src, tmp_path / "mlx", q_bits=4, q_group_size=64, progress=False)

    saved = json.loads((out / "config.json").read_text())
    assert saved["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    assert saved["model_type"] == model_type
    for name in ("tokenizer.json", "tokenizer_config.json", "model.safetensors",
                 "model.safetensors.index.json"):
        assert (out / name).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left

    # Every linear/embedding is int4 within half a quantization step of the original.
    stored = load_weights(out)
    quantized = [k[: -len(".scales")] for k in stored if k.endswith(".scales")]
    assert len(quantized) == 7 * config["num_hidden_layers"] + 2
    for path in quantized:
        w, s, b = (stored[f"{path}.{p}"] for p in ("weight", "scales", "biases"))
        assert w.dtype == mx.uint32 and s.dtype == mx.float16
        deq = np.array(mx.dequantize(w, s, b, group_size=64, bits=4).astype(mx.float32))
        ref = np.array(mx.array(original[f"{path}.weight"]).astype(mx.bfloat16).astype(mx.float32))
        # MLX scales carry a sign; |scale| is one quantization step.
        step = np.abs(np.repeat(np.array(s.astype(mx.float32)), 64, axis=-1))
        # Rounding costs at most half a step inside the grid [bias, bias + 15 * scale].
        # MLX nudges the scale so that 0.0 is exact, which can leave the group's far
        # extreme up to one step outside the grid, where values clip to its edge.
        bias = np.repeat(np.array(b.astype(mx.float32)), 64, axis=-1)
        top = bias + 15 * np.repeat(np.array(s.astype(mx.float32)), 64, axis=-1)
        # Slack for float16 rounding in scale * q + bias (operands up to |bias| + |ref|).
        err = np.abs(deq - ref) - 1e-3 * (np.abs(bias) + np.abs(ref)) - 1e-6
        inside = (ref >= np.minimum(bias, top) - step / 2) & (ref <= np.maximum(bias, top) + step / 2)
        assert inside.mean() > 0.95, path
        assert np.all(err[inside] <= step[inside] / 2), path
        assert np.all(err <= step), path
    if model_type == "qwen2":
        assert stored["model.layers.0.self_attn.q_proj.bias"].dtype == mx.float16
    assert not any("rotary_emb" in k for k in stored)

    model, tokenizer = mlxq.load(out)
    assert model.layers[0].self_attn.q_proj.bits == 4
    assert model.layers[0].input_layernorm.weight.dtype == mx.float32
    tokens = mx.array([tokenizer.encode("The quick brown fox jumps over the lazy dog.")])
    logits = model(tokens)
    assert logits.shape == (1, tokens.shape[1], config["vocab_size"])
    assert logits.dtype == mx.float32

    # mlx-lm reads the folder unchanged and computes the same thing.
    theirs = mlx_lm_float32(out)
    np.testing.assert_allclose(np.array(logits), np.array(theirs(tokens)), atol=1e-4, rtol=1e-4)


def test_mlx_lm_folder_with_8bit_override_loads(tmp_path, hf_checkpoint):
    """A folder converted by mlx-lm (per-layer overrides) loads in mlxq with the same output."""
    from mlx_lm import convert as lm_convert

    src, config, _ = hf_checkpoint("llama")
    out = tmp_path / "by-mlx-lm"

    def predicate(path, module):
        return {"group_size": 32, "bits": 8} if "embed_tokens" in path else True

    lm_convert(str(src), str(out), quantize=True, q_group_size=64, q_bits=4,
               quant_predicate=predicate)
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert q["model.embed_tokens"]["bits"] == 8
    model, tok = mlxq.load(out)
    assert model.model.embed_tokens.bits == 8 and model.layers[1].mlp.up_proj.bits == 4
    theirs = mlx_lm_float32(out)
    tokens = mx.array([tok.encode("Hello world")])
    np.testing.assert_allclose(np.array(model(tokens)), np.array(theirs(tokens)), atol=1e-4, rtol=1e-4)


def test_sharded_folder_loads(tmp_path, hf_checkpoint):
    src, _, _ = hf_checkpoint("llama")
    out = convert(src, tmp_path / "mlx", q_bits=8, q_group_size=32, dtype="float32", progress=False)
    model, tok = mlxq.load(out)
    tokens = mx.array([tok.encode("shards")])
    expected = model(tokens)
    # Re-save the same weights as several small shards with an index.
    weights = load_weights(out)
    (out / "model.safetensors").unlink()
    files = save_weights(out, weights, max_shard_bytes=100_000)
    assert len(files) > 2 and files[0].name.startswith("model-00001-of-")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(weights)
    model2, _ = mlxq.load(out)
    np.testing.assert_array_equal(np.array(model2(tokens)), np.array(expected))


def test_force_replaces_existing_output(tmp_path, hf_checkpoint, capsys):
    src, _, _ = hf_checkpoint("llama")
    out = tmp_path / "mlx"
    assert main(["--hf-path", str(src), "--mlx-path", str(out), "--quiet"]) == 0
    (out / "marker").write_text("old")
    assert main(["--hf-path", str(src), "--mlx-path", str(out), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "marker").exists()
    assert main(["--hf-path", str(src), "--mlx-path", str(out), "--quiet", "--force",
                 "--q-bits", "8"]) == 0
    assert not (out / "marker").exists()
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf-llama", "mlx"]
