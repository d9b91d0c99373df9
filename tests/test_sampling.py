"""Samplers: greedy picks the max, seeds reproduce, top-p never leaves the nucleus."""

import mlx.core as mx
import numpy as np
import pytest

from mlxq.errors import MlxqError
from mlxq.sampling import make_sampler


def _logits(seed=0, vocab=50):
    return mx.random.normal((1, vocab), key=mx.random.key(seed)) * 3


def _draws(sampler, logits, n=64):
    return [sampler(logits).item() for _ in range(n)]


def test_greedy_is_argmax():
    logits = _logits()
    assert make_sampler(0.0)(logits).item() == int(np.argmax(np.asarray(logits)))


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    logits = _logits()
    a = _draws(make_sampler(1.0, seed=7), logits)
    b = _draws(make_sampler(1.0, seed=7), logits)
    c = _draws(make_sampler(1.0, seed=8), logits)
    assert a == b
    assert a != c
    assert len(set(a)) > 3  # really sampling, not argmax


def test_top_p_keeps_only_the_nucleus():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = mx.array(np.log(probs)[None].astype(np.float32))
    # 0.5 + 0.3 = 0.8 >= 0.7, so only tokens 0 and 1 can be drawn.
    seen = set(_draws(make_sampler(1.0, top_p=0.7, seed=0), logits, n=200))
    assert seen == {0, 1}
    # A tiny top-p is greedy.
    assert set(_draws(make_sampler(1.0, top_p=1e-6, seed=0), logits, n=20)) == {0}


def test_low_temperature_approaches_greedy():
    logits = _logits(3)
    best = int(np.argmax(np.asarray(logits)))
    assert set(_draws(make_sampler(0.01, seed=1), logits, n=20)) == {best}


@pytest.mark.parametrize("temp,top_p,seed", [
    (-0.1, 1.0, None), (1.0, 0.0, None), (1.0, 1.5, None), (float("nan"), 1.0, None),
    (float("inf"), 1.0, None), (1.0, float("nan"), None), (1.0, 1.0, -5), (1.0, 1.0, 2**64)])
def test_bad_options_raise(temp, top_p, seed):
    with pytest.raises(MlxqError):
        make_sampler(temp, top_p, seed)
