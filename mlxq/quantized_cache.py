"""The int4/int8 KV cache, read by mlxq's fused decode-attention kernel.

Per layer, keys and values are each stored as MLX affine-quantized buffers (mlx-lm's
QuantizedKVCache layout): codes uint32 (B, Hkv, capacity, D*bits/32), scales and biases
float16 (B, Hkv, capacity, D/group_size); groups run along head_dim, one set per token.
``mx.dequantize(codes, scales, biases, group_size, bits)`` reads them back.

Buffers grow in steps of ``step`` tokens. New tokens are quantized by one fused kernel per
layer and slice-assigned into the buffers; the attention kernels get the whole buffers plus
the valid length, so nothing copies the cache per step. ``attend`` runs the fused decode
kernel for up to 8 query tokens and the chunked-prefill path for more.
"""

import mlx.core as mx

from .backend import kernel_backend
from .errors import MlxqError
from .kernels.blockwise_attention import chunked_prefill_attention
from .kernels.decode_attention import MAX_QUERY_TOKENS, quantized_decode_attention
from .kernels.kv_write import quantize_kv

SUPPORTED_BITS = (4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
SUPPORTED_HEAD_DIMS = (64, 96, 128, 256)
_FP16_BYTES = 2


def check_options(bits: int, group_size: int, step: int = 256) -> None:
    if bits not in SUPPORTED_BITS:
        raise MlxqError(f"kv_bits={bits!r} is not supported by the quantized KV cache; "
                        f"choose one of {', '.join(map(str, SUPPORTED_BITS))}")
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise MlxqError(f"kv_group_size={group_size!r} is not supported; choose one of "
                        f"{', '.join(map(str, SUPPORTED_GROUP_SIZES))}")
    if not isinstance(step, int) or step < 1:
        raise MlxqError(f"cache step must be a positive integer, got {step!r}")


def check_head_dim(head_dim: int, group_size: int) -> None:
    if head_dim not in SUPPORTED_HEAD_DIMS or head_dim % group_size:
        raise MlxqError(
            f"head_dim={head_dim} is not supported by the quantized KV cache with "
            f"kv_group_size={group_size}; supported head dims: "
            f"{', '.join(map(str, SUPPORTED_HEAD_DIMS))}, divisible by the group size "
            "(96 needs kv_group_size=32); use kv_bits=16 for this model")


class QuantizedKVCache:
    """One layer's int4/int8 cache. ``rotation``: optional object with ``forward(x)``
    (x @ R) and ``inverse(y)`` (y @ R.T), applied to queries/keys/values before quantizing
    and to the attention output after (R orthonormal, so q.k is unchanged)."""

    # Class defaults let load_cache build an instance without __init__.
    keys = None    # [codes, scales, biases] (whole buffers)
    values = None
    offset = 0
    step = 256
    rotation = None

    def __init__(self, bits: int = 4, group_size: int = 64, rotation=None, step: int = 256):
        check_options(bits, group_size, step)
        if rotation is not None and not (hasattr(rotation, "forward")
                                         and hasattr(rotation, "inverse")):
            raise MlxqError("rotation must have forward(x) and inverse(y) methods")
        self.bits = bits
        self.group_size = group_size
        self.rotation = rotation
        self.step = step
        self.keys = None
        self.values = None
        self.offset = 0

    # --- storage ---------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys[0].shape[2]

    def _grow(self, B: int, H: int, D: int, needed: int):
        # Whole steps of zeros appended: one copy per `step` tokens, never per token.
        extra = -(-needed // self.step) * self.step - self.capacity
        shapes = ((D * self.bits // 32, mx.uint32), (D // self.group_size, mx.float16),
                  (D // self.group_size, mx.float16))
        new = [mx.zeros((B, H, extra, n), dtype) for n, dtype in shapes]
        if self.keys is None:
            self.keys, self.values = new, [mx.zeros_like(x) for x in new]
        else:
            self.keys = [mx.concatenate([x, z], axis=2) for x, z in zip(self.keys, new)]
            self.values = [mx.concatenate([x, z], axis=2) for x, z in zip(self.values, new)]

    def _append(self, keys, values):
        B, H, L, D = keys.shape
        start, end = self.offset, self.offset + L
        if end > self.capacity:
            self._grow(B, H, D, end)
        new_k, new_v = quantize_kv(keys, values, self.group_size, self.bits)
        # In-place slice updates of buffers nobody else holds: no copy of the cache.
        for buf, new in zip(self.keys + self.values, new_k + new_v):
            buf[..., start:end, :] = new
        self.offset = end

    # --- attention -------------------------------------------------------------------
    def _check_shapes(self, queries, keys, values):
        D = keys.shape[-1]
        check_head_dim(D, self.group_size)
        if values.shape[-1] != D or queries.shape[-1] != D:
            raise MlxqError(
                f"the quantized KV cache needs one head_dim for queries, keys and values, got "
                f"{queries.shape[-1]}, {D}, {values.shape[-1]}; use kv_bits=16 for this model")
        if self.keys is not None and self.keys[0].shape[-1] != D * self.bits // 32:
            raise MlxqError(f"head_dim {D} does not match this cache's")

    def attend(self, queries, keys, values, scale: float = 1.0):
        """Store the new keys/values (B, Hkv, L, D), then causal attention of ``queries``
        (B, Hq, L, D) over everything stored. Returns (B, Hq, L, D) in the queries' dtype."""
        self._check_shapes(queries, keys, values)
        if self.rotation is not None:
            queries, keys, values = (self.rotation.forward(x) for x in (queries, keys, values))
        cached = self.offset
        self._append(keys, values)
        if queries.shape[2] <= MAX_QUERY_TOKENS:
            out = quantized_decode_attention(
                queries, *self.keys, *self.values, length=self.offset, scale=scale,
                group_size=self.group_size, bits=self.bits, backend=kernel_backend())
        else:
            # The chunk attends to its own keys in full precision; earlier tokens come from
            # the buffers (positions < cached, untouched by this append).
            out = chunked_prefill_attention(
                queries, keys, values, self.keys, self.values, cached, scale,
                self.group_size, self.bits)
        if self.rotation is not None:
            out = self.rotation.inverse(out)
        return out

    # --- bookkeeping -----------------------------------------------------------------
    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        """Forget the last ``n`` tokens (the buffers stay allocated). Returns how many."""
        n = max(0, min(self.offset, n))
        self.offset -= n
        return n

    def empty(self) -> bool:
        return self.keys is None

    @property
    def nbytes(self) -> int:
        """Bytes of the allocated buffers (capacity, not just the stored tokens)."""
        if self.keys is None:
            return 0
        return sum(x.nbytes for x in self.keys + self.values)

    @property
    def fp16_nbytes(self) -> int:
        """What an fp16 cache of the same capacity would allocate (for ratios)."""
        if self.keys is None:
            return 0
        B, H, cap, words = self.keys[0].shape
        head_dim = words * 32 // self.bits
        return 2 * B * H * cap * head_dim * _FP16_BYTES

    # --- save / load -----------------------------------------------------------------
    @property
    def state(self):
        # The stored prefix only: a saved cache holds no padding.
        if self.keys is None:
            return ()
        return (tuple(x[..., : self.offset, :] for x in self.keys),
                tuple(x[..., : self.offset, :] for x in self.values))

    @state.setter
    def state(self, value):
        if not value:
            self.keys = self.values = None
            self.offset = 0
            return
        keys, values = value
        self.keys, self.values = list(keys), list(values)
        self.offset = self.keys[0].shape[2]

    @property
    def meta_state(self):
        meta = {"bits": self.bits, "group_size": self.group_size, "step": self.step}
        if self.rotation is not None:
            to_meta = getattr(self.rotation, "to_meta", None)
            if to_meta is None:
                raise MlxqError("this cache's rotation cannot be saved (no to_meta())")
            meta["rotation"] = to_meta()
        return meta

    @meta_state.setter
    def meta_state(self, value):
        bits = int(value.get("bits", 4))
        group_size = int(value.get("group_size", 64))
        step = int(value.get("step", 256))
        check_options(bits, group_size, step)
        self.bits, self.group_size, self.step = bits, group_size, step
        self.rotation = _rotation_from_meta(value["rotation"]) if "rotation" in value else None
        self.keys = self.values = None
        self.offset = 0


def _rotation_from_meta(meta):
    from . import rotation

    return rotation.from_meta(meta)
