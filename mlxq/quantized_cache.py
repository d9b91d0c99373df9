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
from .kernels.decode_attention import (
    MAX_QUERY_TOKENS,
    quantized_decode_attention,
    window_attention,
)
from .kernels.kv_write import quantize_kv

SUPPORTED_BITS = (4, 8)
# Chosen by measurement (docs/quality.md): make_cache's defaults for quantized caches.
DEFAULT_GROUP_SIZE = 64
DEFAULT_RECENT = 256
DEFAULT_SINK = 4
# Free float16 slots after the sink and window: the window moves back next to the sink
# (a copy of sink + window into a fresh buffer) once per FP_SLACK new tokens, not per step.
FP_SLACK = 32
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
    recent = 0
    sink = 0
    # Full-precision tokens, float16 (B, Hkv, fp_capacity, D), preallocated: the sink (the
    # first <= `sink` tokens of the sequence, never quantized) at [0, sink_length), the
    # window (the newest <= `recent` tokens, not yet quantized) at
    # [window_start, window_start + window_length). Tokens leaving the window free their
    # slots; the window moves back next to the sink only when the buffer's end is reached.
    fp_keys = None
    fp_values = None
    sink_length = 0
    window_start = 0
    window_length = 0

    def __init__(self, bits: int = 4, group_size: int = 64, rotation=None, step: int = 256,
                 recent: int = 0, sink: int = 0):
        check_options(bits, group_size, step)
        for name, n in (("recent", recent), ("sink", sink)):
            if not isinstance(n, int) or n < 0:
                raise MlxqError(f"{name} must be a non-negative number of tokens, got {n!r}")
        if rotation is not None and not (hasattr(rotation, "forward")
                                         and hasattr(rotation, "inverse")):
            raise MlxqError("rotation must have forward(x) and inverse(y) methods")
        self.bits = bits
        self.group_size = group_size
        self.rotation = rotation
        self.step = step
        self.recent = recent
        self.sink = sink
        self.keys = None
        self.values = None
        self.offset = 0

    # --- storage ---------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys[0].shape[2]

    def _fp_slice(self, buf, start, length):
        return None if not length else buf[:, :, start:start + length]

    @property
    def window_keys(self):
        return self._fp_slice(self.fp_keys, self.window_start, self.window_length)

    @property
    def window_values(self):
        return self._fp_slice(self.fp_values, self.window_start, self.window_length)

    @property
    def sink_keys(self):
        return self._fp_slice(self.fp_keys, 0, self.sink_length)

    @property
    def sink_values(self):
        return self._fp_slice(self.fp_values, 0, self.sink_length)

    @property
    def quantized_length(self) -> int:
        """Tokens in the int4/int8 buffers: positions [sink_length, sink_length + this);
        the sink holds the first ones, the window the newest ones."""
        return self.offset - self.window_length - self.sink_length

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

    def _quantize_into_buffers(self, keys, values, start: int):
        """Write (B, Hkv, L, D) keys/values into the quantized buffers from ``start``."""
        B, H, L, D = keys.shape
        end = start + L
        if end > self.capacity:
            self._grow(B, H, D, end)
        new_k, new_v = quantize_kv(keys, values, self.group_size, self.bits)
        # In-place slice updates of buffers nobody else holds: no copy of the cache.
        for buf, new in zip(self.keys + self.values, new_k + new_v):
            buf[..., start:end, :] = new

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
        if self.recent or self.sink:
            out = self._attend_with_window(queries, keys, values, scale)
        else:
            out = self._attend_quantized(queries, keys, values, scale)
        if self.rotation is not None:
            out = self.rotation.inverse(out)
        return out

    def _attend_quantized(self, queries, keys, values, scale):
        """No window: new tokens are quantized at once and decode reads only the buffers."""
        cached = self.quantized_length
        self._quantize_into_buffers(keys, values, cached)
        self.offset += keys.shape[2]
        if queries.shape[2] <= MAX_QUERY_TOKENS:
            return quantized_decode_attention(
                queries, *self.keys, *self.values, length=self.offset, scale=scale,
                group_size=self.group_size, bits=self.bits, backend=kernel_backend())
        # The chunk attends to its own keys in full precision; earlier tokens come from
        # the buffers (positions < cached, untouched by this append).
        return chunked_prefill_attention(
            queries, keys, values, self.keys, self.values, cached, scale,
            self.group_size, self.bits)

    def _attend_with_window(self, queries, keys, values, scale):
        """The newest ``recent`` tokens stay in full precision (attention is sharpest on
        them) and so do the first ``sink`` tokens of the sequence (attention sinks: every
        later token attends to them); the others are quantized as they leave the window."""
        B, H, L, D = keys.shape
        cached = self.quantized_length
        self._make_fp_room(B, H, D, L)
        # float16 like an fp16 cache, on every backend (the CPU computes in float32, but the
        # window should weigh what it weighs on the GPU). In-place slice updates: no copy.
        end = self.window_start + self.window_length
        self.fp_keys[..., end:end + L, :] = keys.astype(mx.float16)
        self.fp_values[..., end:end + L, :] = values.astype(mx.float16)
        self.window_length += L
        self.offset += L
        out = window_attention(queries, self.window_keys, self.window_values, self.keys,
                               self.values, cached, scale, self.group_size, self.bits,
                               sink_keys=self.sink_keys, sink_values=self.sink_values)
        evicted = self._evict_from_window(cached)
        held = self.sink_length + self.window_length
        if self.fp_keys.shape[2] > held + 2 * FP_SLACK + MAX_QUERY_TOKENS:
            # A prefill chunk needed room for its L tokens; most are quantized now.
            self._rebuild_fp(B, H, D, held + FP_SLACK)
        # Quantize the leaving tokens in this step's graph: left pending, their read of the
        # fp buffer would stop the next step's slice update from working in place.
        return mx.depends(out, evicted) if evicted else out

    def _make_fp_room(self, B, H, D, L):
        """Room for L more window tokens after the window's end. When the end of the buffer
        is reached the sink and window are copied to a fresh buffer with the window right
        after the sink: one copy every FP_SLACK / L steps, not one per step."""
        if (self.fp_keys is not None
                and self.window_start + self.window_length + L <= self.fp_keys.shape[2]):
            return
        # Sized by what is held, not by `recent`: a huge window (a user asking for nearly
        # fp16) allocates as it fills.
        self._rebuild_fp(B, H, D, self.sink_length + self.window_length + L + FP_SLACK)

    def _rebuild_fp(self, B, H, D, capacity):
        """A fresh float16 buffer of ``capacity`` slots: sink, window, then free slots."""
        kept = self.sink_length + self.window_length

        def rebuilt(buf):
            parts = [x for x in (self._fp_slice(buf, 0, self.sink_length),
                                 self._fp_slice(buf, self.window_start, self.window_length))
                     if x is not None]
            parts.append(mx.zeros((B, H, capacity - kept, D), dtype=mx.float16))
            return mx.concatenate(parts, axis=2)

        self.fp_keys, self.fp_values = rebuilt(self.fp_keys), rebuilt(self.fp_values)
        self.window_start = self.sink_length

    def _evict_from_window(self, cached):
        """Move the window's overflow (its oldest tokens) to the sink while the sink is not
        full, else quantize it into the buffers from position ``cached``. Returns the arrays
        written, if any."""
        leaving = self.window_length - self.recent
        if leaving <= 0:
            return []
        # While the sink is not full nothing was quantized yet, so the window starts right
        # after the sink: its first tokens join the sink where they are.
        to_sink = min(leaving, self.sink - self.sink_length)
        self.sink_length += to_sink
        first = self.window_start + to_sink
        to_quantize = leaving - to_sink
        if to_quantize:
            self._quantize_into_buffers(self.fp_keys[:, :, first:first + to_quantize],
                                        self.fp_values[:, :, first:first + to_quantize],
                                        cached)
        self.window_start = first + to_quantize
        self.window_length -= leaving
        return self.keys + self.values if to_quantize else []

    # --- bookkeeping -----------------------------------------------------------------
    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        """Forget the last ``n`` tokens (the buffers stay allocated). Returns how many."""
        n = max(0, min(self.offset, n))
        # Newest first: the window, then the quantized tokens, then the sink.
        quantized = self.quantized_length
        from_window = min(n, self.window_length)
        self.window_length -= from_window
        from_sink = max(0, n - from_window - quantized)
        if from_sink:
            # Nothing is quantized any more: the window (empty) restarts after the sink.
            self.sink_length -= from_sink
            self.window_start = self.sink_length
        self.offset -= n
        return n

    def empty(self) -> bool:
        return self.offset == 0 and self.keys is None

    @property
    def nbytes(self) -> int:
        """Bytes of the allocated buffers (capacity, not just the stored tokens)."""
        total = 0 if self.keys is None else sum(x.nbytes for x in self.keys + self.values)
        if self.fp_keys is not None:
            total += self.fp_keys.nbytes + self.fp_values.nbytes
        return total

    @property
    def fp16_nbytes(self) -> int:
        """What an fp16 cache of the same capacity would allocate (for ratios)."""
        fp_slots = 0
        if self.fp_keys is not None:
            B, H, fp_slots, head_dim = self.fp_keys.shape
        elif self.keys is not None:
            B, H, _, words = self.keys[0].shape
            head_dim = words * 32 // self.bits
        else:
            return 0
        tokens = self.capacity + fp_slots
        return 2 * B * H * tokens * head_dim * _FP16_BYTES

    # --- save / load -----------------------------------------------------------------
    @property
    def state(self):
        # The stored tokens only: a saved cache holds no padding.
        if self.offset == 0:
            return {}
        n = self.quantized_length
        state = {}
        if n:
            state["keys"] = [x[..., :n, :] for x in self.keys]
            state["values"] = [x[..., :n, :] for x in self.values]
        if self.window_length:
            state["window_keys"], state["window_values"] = self.window_keys, self.window_values
        if self.sink_length:
            state["sink_keys"], state["sink_values"] = self.sink_keys, self.sink_values
        return state

    @state.setter
    def state(self, value):
        self._clear()
        if not value:
            return
        if not isinstance(value, dict):  # (keys, values): a cache saved without a window
            value = {"keys": value[0], "values": value[1]}
        if "keys" in value:
            self.keys, self.values = list(value["keys"]), list(value["values"])
            self.offset = self.keys[0].shape[2]
        sink = [value[k] for k in ("sink_keys", "sink_values") if k in value]
        window = [value[k] for k in ("window_keys", "window_values") if k in value]
        if sink or window:
            self.sink_length = sink[0].shape[2] if sink else 0
            self.window_start = self.sink_length
            self.window_length = window[0].shape[2] if window else 0
            self.fp_keys, self.fp_values = (mx.concatenate(xs, axis=2).astype(mx.float16)
                                            for xs in zip(*(p for p in (sink, window) if p)))
            held = self.sink_length + self.window_length
            B, H, _, D = self.fp_keys.shape
            self._rebuild_fp(B, H, D, held + FP_SLACK)  # the usual layout, with free slots
            self.offset += held

    @property
    def meta_state(self):
        meta = {"bits": self.bits, "group_size": self.group_size, "step": self.step,
                "recent": self.recent, "sink": self.sink}
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
        self.recent = int(value.get("recent", 0))
        self.sink = int(value.get("sink", 0))
        self.rotation = _rotation_from_meta(value["rotation"]) if "rotation" in value else None
        self._clear()

    def _clear(self):
        self.keys = self.values = self.fp_keys = self.fp_values = None
        self.sink_length = self.window_start = self.window_length = 0
        self.offset = 0


def _rotation_from_meta(meta):
    from . import rotation

    return rotation.from_meta(meta)
