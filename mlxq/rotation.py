"""Randomized Hadamard rotation of attention heads, for a low-error int4 KV cache.

Keys have a few outlier channels; one outlier stretches the scale of its whole quantization
group. Rotating queries, keys and values by the same orthonormal matrix R (D x D) spreads
outliers over all channels while leaving attention unchanged:
``(qR)(kR)^T = q k^T`` and ``softmax(.) (vR) R^T = softmax(.) v``.

R = diag(s) H / sqrt(D): H a Hadamard matrix (MLX's ``mx.hadamard_transform``), s random
signs derived from (seed, layer_index) by a hash, so the same seed gives the same R on
every machine and a saved cache can rebuild its rotation from ``to_meta()``.

Speed: ``mx.hadamard_transform`` is O(D log D); on the CPU backend it measured 4-11x faster
than ``x @ R`` (MLX 0.32.4, x86, 2 cores: (1, 9, 8, 64) 40 us vs 175 us; (1, 32, 8, 128)
141 us vs 1670 us; (1, 9, 1024, 64) 2.5 ms vs 15 ms). The explicit matrix is used only for
the inverse of the sizes whose Hadamard matrix is not symmetric (20*2^k, 28*2^k).
"""

import functools
import hashlib

import mlx.core as mx
import numpy as np

from .errors import MlxqError

# mx.hadamard_transform handles n = m * 2^k for these m. Other sizes must be refused
# before calling it: MLX 0.32 corrupts memory on e.g. n=100 instead of raising.
_HADAMARD_BASES = (1, 12, 20, 28)
_META_TYPE = "hadamard"


def hadamard_base(n: int):
    """The m with n = m * 2^k that MLX supports, or None."""
    if not isinstance(n, int) or n < 1:
        return None
    for m in _HADAMARD_BASES:
        k = n // m
        if n % m == 0 and k & (k - 1) == 0:
            return m
    return None


def check_head_dim(head_dim: int) -> None:
    if hadamard_base(head_dim) is None or head_dim < 2:
        raise MlxqError(
            f"Hadamard rotation does not support head_dim={head_dim}: it needs "
            "head_dim = m * 2^k with m in 1, 12, 20, 28 (e.g. 64, 96, 128, 256); "
            "turn the rotation off for this model")


@functools.cache
def _hadamard(n: int):
    """(H / sqrt(n) as float32 numpy, whether it is symmetric). H = the transform's matrix:
    hadamard_transform(x) == x @ H for rows x, so transforming I gives H itself."""
    h = np.array(mx.hadamard_transform(mx.eye(n, dtype=mx.float32)))
    return h, bool(np.allclose(h, h.T, atol=1e-6))


def random_signs(head_dim: int, seed: int, layer_index: int) -> np.ndarray:
    """+-1 per channel from sha256 of (seed, layer, block): stable across platforms and
    library versions, unlike a PRNG stream."""
    bits = []
    block = 0
    while len(bits) < head_dim:
        digest = hashlib.sha256(f"mlxq-hadamard:{seed}:{layer_index}:{block}".encode()).digest()
        bits.extend(np.unpackbits(np.frombuffer(digest, dtype=np.uint8)).tolist())
        block += 1
    return 1.0 - 2.0 * np.array(bits[:head_dim], dtype=np.float32)


class HadamardRotation:
    """R = diag(signs) H / sqrt(D) for one layer. ``forward(x) = x @ R`` and
    ``inverse(y) = y @ R.T`` on the last axis, in the input's dtype."""

    def __init__(self, head_dim: int, seed: int = 0, layer_index: int = 0):
        check_head_dim(head_dim)
        self.head_dim = int(head_dim)
        self.seed = int(seed)
        self.layer_index = int(layer_index)
        signs = random_signs(self.head_dim, self.seed, self.layer_index)
        h, self._symmetric = _hadamard(self.head_dim)
        self._signs = mx.array(signs)
        # R.T, kept only where the transform cannot do the inverse (non-symmetric H).
        self._r_t = None if self._symmetric else mx.array((signs[:, None] * h).T)
        self._cast = {}

    def _signs_as(self, dtype):
        if dtype not in self._cast:
            self._cast[dtype] = self._signs.astype(dtype)
        return self._cast[dtype]

    def _check(self, x):
        if x.shape[-1] != self.head_dim:
            raise MlxqError(f"rotation for head_dim {self.head_dim} got last axis {x.shape[-1]}")

    def forward(self, x):
        """x @ R = (x * signs) @ H/sqrt(D)."""
        self._check(x)
        return mx.hadamard_transform(x * self._signs_as(x.dtype))

    def inverse(self, y):
        """y @ R.T = (y @ H.T/sqrt(D)) * signs; H.T = H for 2^k and 12*2^k."""
        self._check(y)
        if self._symmetric:
            return mx.hadamard_transform(y) * self._signs_as(y.dtype)
        return y @ self._r_t.astype(y.dtype)

    @property
    def matrix(self):
        """R as an explicit (D, D) float32 array (tests, inspection)."""
        h, _ = _hadamard(self.head_dim)
        return mx.array(np.array(self._signs)[:, None] * h)

    # --- save / load: a seed, not a matrix ---------------------------------------------
    def to_meta(self) -> dict:
        return {"type": _META_TYPE, "head_dim": self.head_dim, "seed": self.seed,
                "layer_index": self.layer_index}

    @classmethod
    def from_meta(cls, meta: dict) -> "HadamardRotation":
        return from_meta(meta)

    def __repr__(self):
        return (f"HadamardRotation(head_dim={self.head_dim}, seed={self.seed}, "
                f"layer_index={self.layer_index})")


def from_meta(meta: dict) -> HadamardRotation:
    """The rotation described by ``HadamardRotation.to_meta()`` (saved caches)."""
    if not isinstance(meta, dict) or meta.get("type") != _META_TYPE:
        raise MlxqError(f"unknown KV rotation in the saved cache: {meta!r}")
    try:
        return HadamardRotation(int(meta["head_dim"]), int(meta["seed"]),
                                int(meta["layer_index"]))
    except (KeyError, TypeError, ValueError) as e:
        raise MlxqError(f"bad KV rotation metadata {meta!r}: {e}") from None
