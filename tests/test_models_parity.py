"""The converted default model gives the same logits and greedy tokens in mlxq and mlx-lm."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map

PROMPT = (
    "Call me Ishmael. Some years ago, never mind how long precisely, having little or no "
    "money in my purse, and nothing particular to interest me on shore, I thought I would "
    "sail about a little and see the watery part of the world. It is a way I have of "
    "driving off the spleen and regulating the circulation."
)


@pytest.fixture(scope="module")
def both_models(default_model_dir, default_model):
    import mlx_lm

    theirs, _ = mlx_lm.load(str(default_model_dir))
    # mlxq computes in float32 on the CPU; give mlx-lm the same floating parameters.
    theirs.update(
        tree_map(
            lambda p: p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p,
            theirs.parameters(),
        )
    )
    model, tokenizer = default_model
    return model, theirs, tokenizer


def _prefill_and_greedy(model, cache_model, prompt, n):
    """Prompt logits (prefilled into mlx-lm's cache) and ``n`` greedy tokens after them."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(cache_model)
    prompt_logits = logits = model(prompt, cache=cache)
    out = []
    for _ in range(n):
        token = int(mx.argmax(logits[0, -1]).item())
        out.append(token)
        logits = model(mx.array([[token]]), cache=cache)
    return prompt_logits, out


def test_logits_and_greedy_tokens_match_mlx_lm(both_models):
    ours, theirs, tokenizer = both_models
    ids = tokenizer.encode(PROMPT)[:64]
    assert len(ids) == 64
    prompt = mx.array([ids])

    # One prefill per model (CPU quantized matmuls are slow): its logits are compared,
    # then both continue greedily through mlx-lm's cache.
    a, ours_tokens = _prefill_and_greedy(ours, theirs, prompt, 32)
    b, theirs_tokens = _prefill_and_greedy(theirs, theirs, prompt, 32)
    assert a.dtype == mx.float32 and a.shape == b.shape == (1, 64, 49152)
    np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-4, rtol=1e-4)
    # The model is meaningful: the next word of the prompt is among its top guesses often.
    top = np.argsort(-np.array(a[0, :-1]), axis=-1)[:, :10]
    hits = np.mean([ids[i + 1] in top[i] for i in range(63)])
    assert hits > 0.4
    assert ours_tokens == theirs_tokens
    assert len(set(ours_tokens)) > 3  # not a degenerate repetition
