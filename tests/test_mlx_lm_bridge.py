"""mlx-lm architectures on mlxq's caches (mlxq/mlx_lm_bridge.py), on tiny random models.

For each architecture: mlxq's model (its own definition or mlx-lm's through the bridge)
with mlxq's full-precision cache gives the logits of mlx-lm's own model and cache, over a
chunked prefill and decode steps; with the int4 cache the emulated kernels agree with the
reference backend. Sliding windows are shorter than the sequence, so they rotate.
"""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlxq.cache import make_cache
from mlxq.errors import MlxqError
from mlxq.models import build_model

VOCAB = 96
BASE = {
    "hidden_size": 256, "num_hidden_layers": 4, "intermediate_size": 192,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
    "rms_norm_eps": 1e-5, "vocab_size": VOCAB, "rope_theta": 10000.0,
    "max_position_embeddings": 512, "tie_word_embeddings": False,
}
CONFIGS = {
    "llama": {},
    "qwen2": {},
    "qwen3": {},
    "mistral": {},
    "phi3": {},
    "starcoder2": {"norm_epsilon": 1e-5},
    "olmo2": {},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "decoder_sparse_step": 1,
                  "mlp_only_layers": [], "moe_intermediate_size": 64, "norm_topk_prob": True},
    # Layers 0-4 slide over 8 tokens, layer 5 is global (pattern 6), as in Gemma 3.
    "gemma3_text": {"num_hidden_layers": 6, "sliding_window": 8, "sliding_window_pattern": 6,
                    "query_pre_attn_scalar": 64, "rope_local_base_freq": 10000.0},
    "gpt_oss": {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 8,
                "layer_types": ["sliding_attention", "full_attention"] * 2},
}
ARCHS = list(CONFIGS)
# Prefill in chunks (12 + 9 tokens, longer than the 8-token windows), then 4 decode steps.
CHUNKS = (12, 9, 1, 1, 1, 1)


def config_for(model_type: str) -> dict:
    return {"model_type": model_type, **BASE, **CONFIGS[model_type]}


def _reference(config):
    """mlx-lm's own model for ``config`` (not routed through mlxq)."""
    from mlx_lm.utils import _get_classes

    model_cls, args_cls = _get_classes(config)
    return model_cls(args_cls.from_dict(config))


def _pair(model_type):
    mx.random.seed(7)
    config = config_for(model_type)
    theirs = _reference(config)
    _randomize_sinks(theirs)
    ours = build_model(config)
    weights = tree_flatten(theirs.parameters())
    ours.load_weights(weights, strict=True)
    mx.eval(ours.parameters(), theirs.parameters())
    return ours, theirs


def _randomize_sinks(model):
    """gpt_oss initializes its learned attention sinks to 0; random ones (per head, about
    the size of the random model's attention logits) make every test see them."""
    for i, layer in enumerate(model.layers):
        attn = layer.self_attn
        if hasattr(attn, "sinks"):
            attn.sinks = mx.random.uniform(-1.0, 3.0, attn.sinks.shape, key=mx.random.key(i))


def _run(model, caches, tokens):
    out, start = [], 0
    for n in CHUNKS:
        out.append(model(tokens[:, start:start + n], cache=caches))
        start += n
    return mx.concatenate(out, axis=1)


def _tokens():
    return mx.random.randint(0, VOCAB, (1, sum(CHUNKS)), key=mx.random.key(3))


def _their_caches(model):
    from mlx_lm.models.cache import make_prompt_cache

    return make_prompt_cache(model)


@pytest.mark.parametrize("model_type", ARCHS)
def test_full_precision_cache_gives_mlx_lm_logits(model_type):
    ours, theirs = _pair(model_type)
    tokens = _tokens()
    expected = _run(theirs, _their_caches(theirs), tokens)
    caches = make_cache(ours)
    got = _run(ours, caches, tokens)
    np.testing.assert_allclose(np.array(got), np.array(expected), atol=2e-4, rtol=2e-4)
    assert all(c.offset == sum(CHUNKS) for c in caches)


@pytest.mark.parametrize("model_type", ARCHS)
def test_int4_cache_emulated_kernels_match_reference(model_type, monkeypatch):
    ours, _ = _pair(model_type)
    tokens = _tokens()
    full = _run(ours, make_cache(ours), tokens)
    from mlxq.quantized_cache import QuantizedKVCache

    runs = {}
    for backend in ("reference", "emulate"):
        monkeypatch.setenv("MLXQ_KERNELS", backend)
        # No full-precision window, so decode reads quantized keys/values.
        caches = make_cache(ours, kv_bits=4, kv_recent=0, kv_sink=0)
        runs[backend] = _run(ours, caches, tokens)
        # Every global layer's tokens went into its quantized cache (through attend: the
        # bridge's update_and_fetch stores nothing in a quantized cache).
        quantized = [c for c in caches if isinstance(c, QuantizedKVCache)]
        n_global = {"gemma3_text": 1, "gpt_oss": 2}.get(model_type, BASE["num_hidden_layers"])
        assert len(quantized) == n_global
        assert all(c.offset == sum(CHUNKS) for c in quantized)
    np.testing.assert_allclose(np.array(runs["emulate"]), np.array(runs["reference"]),
                               atol=2e-3, rtol=2e-3)
    # int4 stays close to full precision (a wrong layout would not).
    err = float(mx.abs(runs["reference"] - full).max())
    assert 0 < err < 0.25 * float(mx.abs(full).max())


def test_sliding_layers_get_window_bounded_caches():
    ours, _ = _pair("gemma3_text")
    caches = make_cache(ours, kv_bits=4)
    kinds = [type(c).__name__ for c in caches]
    assert kinds == ["WindowKVCache"] * 5 + ["QuantizedKVCache"]
    _run(ours, caches, _tokens())
    window = caches[0]
    assert window.offset == sum(CHUNKS)
    # The window holds at most max_size tokens (plus one prefill chunk while it lands).
    assert window.keys.shape[2] <= 8 + max(CHUNKS)


@pytest.mark.parametrize("backend", ["reference", "emulate"])
def test_int4_cache_applies_attention_sinks(backend, monkeypatch):
    """gpt_oss's learned sinks on its global (int4) layers: the int4 logits stay close to
    mlx-lm's with the sinks and far from what ignoring them on those layers would give."""
    monkeypatch.setenv("MLXQ_KERNELS", backend)
    ours, theirs = _pair("gpt_oss")
    tokens = _tokens()
    expected = _run(theirs, _their_caches(theirs), tokens)
    got = _run(ours, make_cache(ours, kv_bits=4, kv_recent=0, kv_sink=0), tokens)
    for layer, kind in zip(theirs.layers, theirs.model.layer_types):
        if kind == "full_attention":
            layer.self_attn.sinks = mx.full(layer.self_attn.sinks.shape, -1.0e4)
    ignored = _run(theirs, _their_caches(theirs), tokens)
    sink_effect = float(mx.abs(ignored - expected).max())
    assert sink_effect > 0.05 * float(mx.abs(expected).max())
    assert float(mx.abs(got - expected).max()) < 0.25 * sink_effect


def test_layers_without_key_value_state_refuse_the_quantized_cache():
    config = {"model_type": "mamba", "vocab_size": VOCAB, "hidden_size": 64,
              "intermediate_size": 128, "state_size": 8, "num_hidden_layers": 2,
              "conv_kernel": 4, "use_bias": False, "use_conv_bias": True,
              "time_step_rank": 8, "tie_word_embeddings": True}
    model = build_model(config)
    with pytest.raises(MlxqError, match="recurrent state"):
        make_cache(model, kv_bits=4)
    # At 16 bits such layers keep mlx-lm's own cache and the model runs.
    caches = make_cache(model)
    assert model(mx.array([[1, 2, 3]]), cache=caches).shape == (1, 3, VOCAB)


def test_unknown_architecture_is_one_clear_error():
    with pytest.raises(MlxqError, match="not known to mlxq or to mlx-lm"):
        build_model({"model_type": "no_such_arch", **BASE})


def test_models_computing_attention_themselves_refuse_the_quantized_cache():
    """gemma2's layers call mx.fast SDPA directly: a quantized cache there would silently
    attend to the new tokens only. It is refused; the full-precision cache matches mlx-lm."""
    config = {"model_type": "gemma2", **BASE, "query_pre_attn_scalar": 64,
              "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}
    _refused_but_full_precision_matches(config, "compute attention themselves")


def _refused_but_full_precision_matches(config, reason):
    mx.random.seed(7)
    theirs = _reference(config)
    ours = build_model(config)
    ours.load_weights(tree_flatten(theirs.parameters()), strict=True)
    with pytest.raises(MlxqError, match=reason):
        make_cache(ours, kv_bits=4)
    tokens = _tokens()
    np.testing.assert_allclose(np.array(_run(ours, make_cache(ours), tokens)),
                               np.array(_run(theirs, _their_caches(theirs), tokens)),
                               atol=2e-4, rtol=2e-4)


def test_a_quantized_cache_never_silently_skipped():
    """If a model's attention bypasses the routed call anyway, the call fails loudly."""
    from mlxq import mlx_lm_bridge

    ours, _ = _pair("olmo2")
    caches = make_cache(ours, kv_bits=4)
    module = __import__(type(ours).__mro__[1].__module__, fromlist=["x"])
    original = module.scaled_dot_product_attention
    module.scaled_dot_product_attention = mlx_lm_bridge._ORIGINAL
    try:
        with pytest.raises(MlxqError, match="compute attention themselves"):
            ours(_tokens()[:, :4], cache=caches)
    finally:
        module.scaled_dot_product_attention = original


def test_multi_head_latent_attention_refuses_the_quantized_cache():
    config = {"model_type": "deepseek_v2", "vocab_size": VOCAB, "hidden_size": 64,
              "intermediate_size": 128, "moe_intermediate_size": 32, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 4, "n_shared_experts": 1,
              "n_routed_experts": 4, "num_experts_per_tok": 2, "kv_lora_rank": 32,
              "q_lora_rank": None, "qk_rope_head_dim": 16, "v_head_dim": 32,
              "qk_nope_head_dim": 32, "first_k_dense_replace": 1, "max_position_embeddings": 256,
              "rope_scaling": {"type": "yarn", "factor": 1, "mscale": 1, "mscale_all_dim": 0,
                               "original_max_position_embeddings": 256}}
    _refused_but_full_precision_matches(config, "multi-head latent attention")
