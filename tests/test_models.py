"""Model definitions: registry, RoPE variants, family switches, cache consistency."""

import math

import mlx.core as mx
import numpy as np
import pytest

from mlxq.errors import MlxqError
from mlxq.models import SUPPORTED_MODEL_TYPES, build_model, get_model_class
from mlxq.models.rope import make_rope

from conftest import tiny_config


def test_registry_lists_supported_types_on_error():
    for t in ("llama", "mistral", "qwen2", "qwen3", "smollm"):
        assert get_model_class(t) is not None
    with pytest.raises(MlxqError) as e:
        get_model_class("gpt_neox")
    assert "gpt_neox" in str(e.value)
    for t in SUPPORTED_MODEL_TYPES:
        assert t in str(e.value)


def _hf_llama3_inv_freq(dim, base, factor, low, high, old_ctx):
    """Element by element, as written in the Llama 3.1 reference code."""
    out = []
    for i in range(0, dim, 2):
        freq = 1.0 / base ** (i / dim)
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(freq)
        elif wavelen > old_ctx / low:
            out.append(freq / factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return np.array(out)


def _numpy_rope(x, inv_freq, offset):
    """Rotate-half RoPE in float64: x (..., L, D)."""
    L, D = x.shape[-2:]
    pos = np.arange(offset, offset + L)[:, None] * inv_freq[None, :]
    cos, sin = np.cos(pos), np.sin(pos)
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def test_llama3_rope_frequencies_and_rotation_match_numpy():
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    dim, base = 128, 500000.0
    rope = make_rope(dim, base, scaling)
    expected = _hf_llama3_inv_freq(dim, base, 8.0, 1.0, 4.0, 8192)
    got = 1.0 / np.array(rope._freqs, dtype=np.float64)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # All three regimes occur: unscaled, fully scaled and blended.
    plain = 1.0 / base ** (np.arange(0, dim, 2) / dim)
    ratio = expected / plain
    assert np.isclose(ratio, 1.0).any() and np.isclose(ratio, 1 / 8).any()
    assert ((ratio > 1 / 8 + 1e-6) & (ratio < 1 - 1e-6)).any()

    x = np.random.default_rng(0).standard_normal((1, 2, 5, dim)).astype(np.float32)
    out = np.array(rope(mx.array(x), offset=3000))
    np.testing.assert_allclose(out, _numpy_rope(x.astype(np.float64), expected, 3000), atol=2e-3)


def test_linear_rope_scaling_divides_positions():
    dim, base, factor = 64, 10000.0, 4.0
    rope = make_rope(dim, base, {"type": "linear", "factor": factor})
    x = np.random.default_rng(1).standard_normal((1, 1, 6, dim)).astype(np.float32)
    inv = 1.0 / base ** (np.arange(0, dim, 2) / dim)
    out = np.array(rope(mx.array(x), offset=40))
    np.testing.assert_allclose(out, _numpy_rope(x.astype(np.float64), inv / factor, 40), atol=1e-4)


def test_unknown_rope_type_is_a_clear_error():
    with pytest.raises(MlxqError, match="yarn"):
        make_rope(64, 10000.0, {"rope_type": "yarn", "factor": 2.0})


@pytest.mark.parametrize(
    "model_type, qkv_bias, o_bias, qk_norm",
    [("llama", False, False, False), ("qwen2", True, False, False), ("qwen3", False, False, True)],
)
def test_family_switches(model_type, qkv_bias, o_bias, qk_norm):
    model = build_model(tiny_config(model_type))
    attn = model.layers[0].self_attn
    assert ("bias" in attn.q_proj) == qkv_bias and ("bias" in attn.k_proj) == qkv_bias
    assert ("bias" in attn.o_proj) == o_bias
    assert ("q_norm" in attn) == qk_norm
    expected_hd = 48 if model_type == "qwen3" else 128 // 4
    assert model.head_dim == expected_hd == attn.head_dim
    assert model.n_kv_heads == 2
    assert attn.q_proj.weight.shape == (4 * expected_hd, 128)


def test_llama_attention_bias_and_tied_embeddings():
    model = build_model(tiny_config("llama", attention_bias=True, tie_word_embeddings=True))
    attn = model.layers[0].self_attn
    assert "bias" in attn.q_proj and "bias" in attn.o_proj
    assert "lm_head" not in model
    weights = {"lm_head.weight": mx.zeros((1,)), "model.norm.weight": mx.ones((128,))}
    assert "lm_head.weight" not in model.sanitize(weights)


def test_transformers5_rope_parameters():
    cfg = tiny_config("llama")
    del cfg["rope_theta"]
    cfg["rope_parameters"] = {"rope_type": "linear", "rope_theta": 5000.0, "factor": 2.0}
    model = build_model(cfg)
    rope = model.layers[0].self_attn.rope
    assert rope.base == 5000.0 and rope.scale == 0.5


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_incremental_decoding_matches_full_forward(model_type):
    """Prefill + token-by-token with a cache equals one causal pass over everything."""
    from mlx_lm.models.cache import KVCache

    mx.random.seed(0)
    model = build_model(tiny_config(model_type))
    if model_type == "qwen2":  # non-zero biases so they matter
        for layer in model.layers:
            layer.self_attn.q_proj.bias = mx.random.normal(layer.self_attn.q_proj.bias.shape)
    tokens = mx.array([[5, 17, 42, 99, 3, 250, 7, 64]])
    full = model(tokens)
    assert full.shape == (1, 8, 320)
    cache = [KVCache() for _ in model.layers]
    steps = [model(tokens[:, :5], cache=cache)]
    for i in range(5, 8):
        steps.append(model(tokens[:, i : i + 1], cache=cache))
    inc = mx.concatenate(steps, axis=1)
    np.testing.assert_allclose(np.array(inc), np.array(full), atol=1e-4, rtol=1e-4)
    # Causality: changing the last token leaves earlier logits alone.
    other = model(mx.array([[5, 17, 42, 99, 3, 250, 7, 1]]))
    np.testing.assert_allclose(np.array(other[:, :7]), np.array(full[:, :7]), atol=1e-5)
    assert not np.allclose(np.array(other[:, 7]), np.array(full[:, 7]))
