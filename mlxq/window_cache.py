"""The sliding-window layers' cache: full precision, bounded by the window.

Gemma 3 (5 layers of 6) and GPT-OSS (every other layer) attend only to the last
``max_size`` tokens in their sliding layers. ``WindowKVCache`` is mlx-lm's
``RotatingKVCache`` (a ring once full, so its memory does not grow with the context) plus
what mlxq's prompt caches need:

- ``state`` (the held tokens oldest first, no padding) and ``meta_state`` (offset, window,
  keep), so ``mlxq.cache.save_cache`` / ``load_cache`` / ``copy_caches`` handle it like the
  other caches. A restored cache is in the layout mlx-lm's multi-token update leaves.
- ``trim(n)`` that never corrupts the ring: once tokens have left the window, forgetting the
  newest n is possible only while the next token still finds the ``max_size - 1`` tokens
  before it (``can_trim``); otherwise only forgetting everything is. mlx-lm's own trim
  assumes the ring never wrapped.
"""

from mlx_lm.models.cache import RotatingKVCache

from .kernels.kv_layout import fp16_bytes


class WindowKVCache(RotatingKVCache):
    """A sliding-window layer's full-precision cache, at most ``max_size`` tokens kept
    (plus one prefill chunk while it is attended)."""

    # --- what the window holds ----------------------------------------------------------
    def _held(self):
        """(keys, values) of the tokens held, oldest first; None if none."""
        if self.keys is None:
            return None
        return self._temporal_order(self.keys), self._temporal_order(self.values)

    def held(self) -> int:
        """Tokens held (the newest ones, ``offset`` at most)."""
        kv = self._held()
        return 0 if kv is None else kv[0].shape[2]

    def update_and_fetch(self, keys, values):
        if keys.shape[2] == 1 and self.keys is not None and \
                self.keys.shape[2] < min(self.offset, self.max_size):
            # After a trim: fewer slots than the in-place ring assumes; the multi-token
            # update rebuilds it (in temporal order, the window's max_size tokens).
            return self._update_concat(keys, values)
        return super().update_and_fetch(keys, values)

    # --- trim -----------------------------------------------------------------------------
    def is_trimmable(self) -> bool:
        return True

    def can_trim(self, n: int) -> bool:
        """Whether forgetting the newest ``n`` tokens leaves what the next token attends
        to: every earlier token, or the max_size - 1 before it."""
        n = max(0, min(self.offset, n))
        if n in (0, self.offset):
            return True
        held = self.held()
        if held == self.offset:
            return True  # nothing has left the window yet
        return not self.keep and held - n >= self.max_size - 1

    def trim(self, n: int) -> int:
        """Forget the newest ``n`` tokens; ValueError where ``can_trim`` says no."""
        n = max(0, min(self.offset, n))
        if not n:
            return 0
        if not self.can_trim(n):
            raise ValueError(f"the sliding window holds {self.held()} of {self.offset} "
                             f"tokens; forgetting {n} would leave too few for its next token")
        if n == self.offset:
            self.keys = self.values = None
            self.offset = self._idx = 0
            return n
        keys, values = self._held()
        keep = keys.shape[2] - n
        self.keys, self.values = keys[..., :keep, :], values[..., :keep, :]
        self.offset -= n
        self._idx = keep
        return n

    # --- bytes ------------------------------------------------------------------------
    @property
    def fp16_nbytes(self) -> int:
        """What the window's buffers take in float16 (their dtype on the GPU)."""
        return 0 if self.keys is None else fp16_bytes(*self.keys.shape, self.values.shape[3])

    # --- save / load ------------------------------------------------------------------
    @property
    def state(self):
        kv = self._held()
        return () if kv is None else kv

    @state.setter
    def state(self, value):
        # meta_state (offset, window) is restored first.
        if not value:
            self.keys = self.values = None
            self._idx = 0
            return
        self.keys, self.values = value
        self._idx = self.keys.shape[2]

    @property
    def meta_state(self):
        return {"max_size": self.max_size, "keep": self.keep, "offset": self.offset}

    @meta_state.setter
    def meta_state(self, value):
        self.max_size = int(value["max_size"])
        self.keep = int(value.get("keep", 0))
        self.offset = int(value.get("offset", 0))
        self.keys = self.values = None
        self._idx = 0
