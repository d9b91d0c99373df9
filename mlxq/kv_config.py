"""``KVCacheConfig``: every option of a KV cache in one validated object.

A config is checked once, when it is made; caches, the attention path, save/load and the
command lines all read the same object. Defaults for the quantized cache were chosen by
measurement (docs/quality.md): group 64, a Hadamard rotation per layer, the newest 304
tokens and the first 4 in float16, keys centered per 128-token block (``key_center``).
"""

from dataclasses import asdict, dataclass

from .errors import MlxqError

SUPPORTED_BITS = (16, 8, 4)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
SUPPORTED_HEAD_DIMS = (64, 96, 128, 256)
DEFAULT_GROUP_SIZE = 64
# The most that fits issue #14's 0.30x of fp16 at 8K (0.299x; 312 is 0.2997x) with 68-byte
# rows (d64) written as tokens leave the window; top-1 98.2% there (docs/quality.md).
DEFAULT_RECENT = 304
DEFAULT_SINK = 4


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class KVCacheConfig:
    """bits: 16 (full precision), 8 or 4. The others apply to quantized caches only:
    key_bits (8 or 4: the keys' bits when they differ from the values'; None: ``bits``),
    group_size (elements per scale/bias along head_dim), rotation (randomized Hadamard
    rotation of K/V/Q per layer, signs from ``seed``), recent (newest tokens kept in
    float16), sink (first tokens kept in float16), step (tokens a buffer grows by),
    key_center (quantize each block of CENTER_BLOCK keys minus a float16 per-channel
    center, normally the block's own mean: ``kernels/kv_layout``)."""

    bits: int = 16
    group_size: int = DEFAULT_GROUP_SIZE
    rotation: bool = True
    seed: int = 0
    recent: int = DEFAULT_RECENT
    sink: int = DEFAULT_SINK
    step: int = 256
    key_center: bool = True
    key_bits: int | None = None

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS or not _is_int(self.bits):
            raise MlxqError(f"kv_bits={self.bits!r} is not supported; choose one of "
                            f"{', '.join(map(str, SUPPORTED_BITS))}")
        if self.key_bits is not None and (self.key_bits not in (8, 4) or not _is_int(self.key_bits)
                                          or self.bits == 16):
            raise MlxqError(f"kv_key_bits={self.key_bits!r} is not supported; choose 8 or 4, "
                            "with kv_bits 8 or 4")
        if self.key_bits == self.bits:  # one spelling per layout (equal configs compare equal)
            object.__setattr__(self, "key_bits", None)
        if self.group_size not in SUPPORTED_GROUP_SIZES or not _is_int(self.group_size):
            raise MlxqError(f"kv_group_size={self.group_size!r} is not supported; choose one "
                            f"of {', '.join(map(str, SUPPORTED_GROUP_SIZES))}")
        for name in ("recent", "sink"):
            n = getattr(self, name)
            if not _is_int(n) or n < 0:
                raise MlxqError(f"kv_{name} must be a non-negative number of tokens, got {n!r}")
        if not _is_int(self.step) or self.step < 1:
            raise MlxqError(f"cache step must be a positive integer, got {self.step!r}")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**63:
            raise MlxqError(f"rotation seed must be an integer in [0, 2**63), got {self.seed!r}")
        if not isinstance(self.rotation, bool):
            raise MlxqError(f"kv_rotation must be True or False, got {self.rotation!r}")
        if not isinstance(self.key_center, bool):
            raise MlxqError(f"kv_key_center must be True or False, got {self.key_center!r}")

    @property
    def quantized(self) -> bool:
        return self.bits < 16

    @property
    def keys_bits(self) -> int:
        """The keys' bits (``key_bits``, else ``bits``)."""
        return self.bits if self.key_bits is None else self.key_bits

    @property
    def name(self) -> str:
        """A short label: ``fp`` or e.g. ``int4-g64-rot-kc-w304-s4`` (``int4-k8-...``: keys in
        8 bits, values in 4)."""
        if not self.quantized:
            return "fp"
        return (f"int{self.bits}" + (f"-k{self.key_bits}" if self.key_bits else "")
                + f"-g{self.group_size}" + ("-rot" if self.rotation else "")
                + ("-kc" if self.key_center else "")
                + (f"-w{self.recent}" if self.recent else "")
                + (f"-s{self.sink}" if self.sink else ""))

    def check_head_dim(self, head_dim: int) -> None:
        """MlxqError unless a quantized cache with these options can hold ``head_dim``."""
        if not self.quantized:
            return
        if head_dim not in SUPPORTED_HEAD_DIMS or head_dim % self.group_size:
            raise MlxqError(
                f"head_dim={head_dim} is not supported by the quantized KV cache with "
                f"kv_group_size={self.group_size}; supported head dims: "
                f"{', '.join(map(str, SUPPORTED_HEAD_DIMS))}, divisible by the group size "
                "(96 needs kv_group_size=32); use kv_bits=16 for this model")
        if self.rotation:
            from .rotation import check_head_dim

            check_head_dim(head_dim)

    def to_meta(self) -> dict:
        return asdict(self)

    @classmethod
    def from_meta(cls, meta) -> "KVCacheConfig":
        if not isinstance(meta, dict):
            raise MlxqError(f"bad KV cache options in the saved cache: {meta!r}")
        known = {k: meta[k] for k in cls.__dataclass_fields__ if k in meta}
        return cls(**known)
