"""Choosing the next token from logits: greedy, temperature and top-p (nucleus) sampling.

A sampler maps logits (B, vocab) to token ids (B,). It stays lazy (no mx.eval), so
generation can queue the next step while the current token is being printed.
"""

import math

import mlx.core as mx

from .errors import MlxqError


def _top_p_filter(logits, top_p: float):
    """Logits with everything outside the smallest set holding ``top_p`` mass set to -inf."""
    order = mx.argsort(-logits, axis=-1)
    sorted_logits = mx.take_along_axis(logits, order, axis=-1)
    probs = mx.softmax(sorted_logits, axis=-1)
    # Mass strictly before each token: the most likely token is always kept.
    mass_before = mx.cumsum(probs, axis=-1) - probs
    kept = mx.where(mass_before < top_p, sorted_logits, -mx.inf)
    # Scatter back to vocabulary order.
    inverse = mx.argsort(order, axis=-1)
    return mx.take_along_axis(kept, inverse, axis=-1)


class Sampler:
    """Callable ``sampler(logits) -> tokens``; seeded samplers draw a reproducible sequence."""

    def __init__(self, temp: float = 0.0, top_p: float = 1.0, seed: int | None = None):
        for name, value in (("temperature", temp), ("top-p", top_p)):
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise MlxqError(f"{name} must be a number, got {value!r}")
        if not (temp >= 0 and math.isfinite(temp)):  # also rejects NaN
            raise MlxqError(f"temperature must be a finite number >= 0, got {temp}")
        if seed is not None and not (isinstance(seed, int) and not isinstance(seed, bool)
                                     and 0 <= seed < 2**64):
            raise MlxqError(f"seed must be an integer from 0 to 2**64 - 1, got {seed!r}")
        if not 0 < top_p <= 1:
            raise MlxqError(f"top-p must be in (0, 1], got {top_p}")
        self.temp = temp
        self.top_p = top_p
        # An explicit key chain keeps results independent of MLX's global random state.
        self._key = mx.random.key(seed) if seed is not None else None

    @property
    def greedy(self) -> bool:
        return self.temp == 0

    def _next_key(self):
        if self._key is None:
            return None
        self._key, sub = mx.random.split(self._key)
        return sub

    def __call__(self, logits):
        if self.greedy:
            return mx.argmax(logits, axis=-1)
        logits = logits.astype(mx.float32) / self.temp
        if self.top_p < 1:
            logits = _top_p_filter(logits, self.top_p)
        return mx.random.categorical(logits, axis=-1, key=self._next_key())


def make_sampler(temp: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> Sampler:
    return Sampler(temp=temp, top_p=top_p, seed=seed)
