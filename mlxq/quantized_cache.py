"""The int4/int8 KV cache: what it stores and where (attention is decided in attention.py).

Per layer, two preallocated buffers:
- ``store`` (B, Hkv, capacity, ROW) uint32: one packed row per token from position
  ``sink`` on (``kernels/kv_layout``: key and value codes, scales, zero points), row i =
  position sink + i. With a window of at least CENTER_BLOCK tokens (the default) a row is
  written as its token leaves the window, so the window's tokens are not stored twice
  (``held_rows``); with a smaller window, or none, as the token arrives.
- ``fp`` (B, Hkv, fp_capacity, 2D) float16, rows [key | value]: slots [0, sink) hold the
  first tokens (attention sinks, never read from the store), slots [sink, sink + recent) a
  ring of the newest ``recent`` tokens (position p in slot sink + (p - sink) % recent).

With key centering (``config.key_center``, layout in ``kernels/kv_layout``) a third buffer,
``centers`` (B, Hkv, blocks, D) float16, holds one key center per block of CENTER_BLOCK
store rows: what the block's keys are quantized minus. Rows written on leaving: when a
block completes, all its tokens are still in the window, and its center becomes their
float16 keys' mean before any of its rows is written. Rows written on arrival: ``center``
(B, Hkv, 1, D) is the one new rows are written with; when a block completes its center is
fixed (its own keys' mean, its rows encoded again, when they are at hand; else as written)
and the next block's chosen. Either way a few ops every CENTER_BLOCK tokens, after that
step's writes. An append that crosses a block boundary is written in pieces, one per block.

Attention reads the sink and the window (the newest ``window_length`` tokens) in float16
and the store rows before the window. A decode step writes first, then reads: the new
token's float16 row into its ring slot, then (window full) the row of the window's oldest
token, quantized where it lies in the ring, into the store; attention reads both buffers
after. MLX updates a buffer in place only when nothing else holds it, and nothing does (no
copy of the cache per step). The kernels (``kernels/kv_append``) also apply the rotation.
"""
import mlx.core as mx

from .errors import MlxqError
from .kernels.kv_append import (
    append_rows,
    quantize_slots,
    reference_append_rows,
    reference_fp_rows,
    reference_quantize_slots,
)
from .kernels.kv_layout import (
    CENTER_BLOCK,
    ROW_LAYOUT,
    dequantize_rows,
    fp16_bytes,
    held_centers,
    row_bytes,
    row_words,
)
from .kv_config import KVCacheConfig
from .rotation import HadamardRotation, random_signs

FP_STEP = 64  # the float16 buffer grows by this many slots, up to sink + recent


def round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def store_capacity(config: KVCacheConfig, rows: int) -> int:
    """Store rows allocated to hold ``rows``: whole ``step`` blocks."""
    return round_up(rows, config.step)


def fp_capacity(config: KVCacheConfig, slots: int) -> int:
    """float16 slots allocated to hold ``slots``: FP_STEP blocks, at most sink + recent."""
    return min(config.sink + config.recent, round_up(slots, FP_STEP))


def centers_capacity(config: KVCacheConfig, rows: int) -> int:
    """Centers allocated once ``rows`` > 0 store rows are written: through the block of the
    next row, in steps of ``step`` tokens' worth of blocks."""
    return round_up(held_centers(rows), max(1, config.step // CENTER_BLOCK))


def rows_leave_the_window(config: KVCacheConfig) -> bool:
    """Store rows are written as their tokens leave the float16 window, not as they arrive,
    when the window holds at least a center block: a block's keys are then all in float16
    when it completes, so its center (their mean) is fixed before any of its rows is
    written. Smaller windows (and none) write every row on arrival."""
    return config.recent >= CENTER_BLOCK


def held_rows(config: KVCacheConfig, offset: int, window: int) -> int:
    """Store rows a cache holds at ``offset`` tokens with ``window`` of them in the window:
    every row past the sink if rows are written on arrival; else the rows before the
    window, and the window's oldest once it is full (written a step early: the step that
    evicts it writes the new token into its ring slot, and a read must follow the write)."""
    S, R = config.sink, config.recent
    if not rows_leave_the_window(config):
        return max(0, offset - S)
    return max(0, offset - S - window + (window == R))


def centers_held(config: KVCacheConfig, offset: int) -> int:
    """Key centers a cache at ``offset`` tokens holds: with rows written on arrival
    ``held_centers`` of its rows (the next block's chosen ahead); with rows written on
    leaving, one per completed block."""
    rows = max(0, offset - config.sink)
    if not config.key_center or not rows:
        return 0
    return rows // CENTER_BLOCK if rows_leave_the_window(config) else held_centers(rows)


def own_center(keys):
    """A completed block's key center: the mean of its float16 keys (B, H, CENTER_BLOCK, D),
    in float32, as float16 (B, H, 1, D)."""
    return keys.astype(mx.float32).mean(axis=2, keepdims=True).astype(mx.float16)


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class QuantizedOptions:
    """The config's fields under the names the attention path reads (both quantized
    caches), and what both do on a write: encoding new tokens and closing key blocks."""

    @property
    def bits(self) -> int:
        return self.config.bits

    @property
    def key_bits(self) -> int | None:
        return self.config.key_bits

    @property
    def group_size(self) -> int:
        return self.config.group_size

    @property
    def sink(self) -> int:
        return self.config.sink

    @property
    def recent(self) -> int:
        return self.config.recent

    def encode(self, keys, values, center=None, rotated: bool = False):
        """New keys/values -> (float16 rows, quantized rows), rotated, on the backend;
        ``center`` (B, H, 1, D): the key center of their block (None: no centering);
        ``rotated``: already rotated float16 (the window's rows of a block encoded again)."""
        rotation = None if rotated else self.rotation
        if self.backend == "reference":
            return reference_append_rows(keys, values, rotation, self.bits, self.group_size,
                                         center, self.key_bits)
        signs = self.signs if self.kernel_rotates and not rotated else None
        if rotation is not None and signs is None:
            keys, values = rotation.forward(keys), rotation.forward(values)
        return append_rows(keys, values, signs, self.bits, self.group_size, self.backend,
                           center, self.key_bits)

    def rotate(self, keys, values):
        """New keys/values -> their float16 rows (B, H, L, 2D), rotated, on the backend
        (their quantized rows are written later, as they leave the window)."""
        if self.backend == "reference":
            return reference_fp_rows(keys, values, self.rotation)
        signs = self.signs if self.kernel_rotates else None
        if self.rotation is not None and signs is None:
            keys, values = self.rotation.forward(keys), self.rotation.forward(values)
        return append_rows(keys, values, signs, self.bits, self.group_size, self.backend,
                           key_bits=self.key_bits, quantize=False)[0]

    def quantize_slots(self, fp, slots: list, blocks: list):
        """The quantized rows (B, H, 1, ROW) of one window row per sequence (slot
        ``slots[b]`` of ``fp``), keys minus their block's center (``blocks[b]``), read
        where they lie (one launch on the kernel backends)."""
        if self.backend == "reference":
            return reference_quantize_slots(fp, slots, self.centers, blocks, self.bits,
                                            self.group_size, self.key_bits)
        return quantize_slots(fp, slots, self.centers, blocks, self.bits, self.group_size,
                              self.backend, self.key_bits)

    def window_block(self, fp, n: int):
        """The float16 rows of positions [n - CENTER_BLOCK, n) from ``fp``'s ring (all of
        them still in the window)."""
        S, R = self.sink, self.recent
        slots = [S + (p - S) % R for p in range(n - CENTER_BLOCK, n)]
        return mx.take(fp, mx.array(slots, dtype=mx.int32), axis=2)

    def close_block(self, rows: int, own, seq=None):
        """Store rows [rows - CENTER_BLOCK, rows) complete a block (of sequence ``seq``, a
        slice of the batch; None: every sequence). ``own``: the block's float16 rows if at
        hand (B, H, CENTER_BLOCK, 2D), else None. With them the block's center becomes
        their key mean and its rows are encoded again with it; without, the block keeps
        the center it was written with. Either way the next block starts from the new
        ``center``, written to ``centers``. Returns True if the block was encoded again."""
        block, done = rows // CENTER_BLOCK - 1, slice(rows - CENTER_BLOCK, rows)
        at = slice(None) if seq is None else seq
        center = self.center if seq is None else self.center[seq]
        if own is None:
            center = self.block_center(self.store[at, :, done], center)
        else:
            D = self.head_dim
            k16 = own[..., :D]
            center = own_center(k16)
            self.store[at, :, done] = self.encode(k16, own[..., D:], center, rotated=True)[1]
            self.centers[at, :, block:block + 1] = center
        self.centers[at, :, block + 1:block + 2] = center
        if seq is None:
            self.center = center
        else:
            self.center[seq] = center
        return own is not None

    def block_center(self, rows, center):
        """The next block's key center (B, H, 1, D) float16: the mean of a completed block's
        keys as stored, from its ``rows`` (B, H, CENTER_BLOCK, ROW) and ``center``."""
        keys, _ = dequantize_rows(rows, self.head_dim, self.bits, self.group_size,
                                  key_bits=self.key_bits)
        return (keys.mean(axis=2, keepdims=True)
                + center.astype(mx.float32)).astype(mx.float16)


class QuantizedKVCache(QuantizedOptions):
    """One layer's int4/int8 cache. ``layer_index`` picks the rotation's signs;
    ``backend`` ('metal' | 'emulate' | 'reference') is fixed when the cache is made."""

    def __init__(self, config: KVCacheConfig, layer_index: int = 0,
                 backend: str = "reference"):
        if not config.quantized:
            raise MlxqError("QuantizedKVCache needs kv_bits 8 or 4")
        self.config = config
        self.layer_index = layer_index
        self.backend = backend
        self.row_layout = ROW_LAYOUT  # of the rows a state brings (a saved cache's meta)
        self._clear()

    def _clear(self):
        self.store = None
        self.fp = None
        self.centers = None    # key centers per store block (config.key_center)
        self.center = None     # the current block's, (B, H, 1, D)
        self.offset = 0
        self.window_length = 0
        self.head_dim = None
        self.rotation = None   # HadamardRotation, applied with MLX ops where needed
        self.signs = None      # its signs, for kernels that rotate in registers

    @property
    def kernel_rotates(self) -> bool:
        """The kernels rotate in registers (power-of-two head dims); otherwise the rotation
        runs as MLX ops around them."""
        return (self.rotation is not None and self.backend != "reference"
                and _is_power_of_two(self.head_dim))

    def _setup(self, head_dim: int):
        self.config.check_head_dim(head_dim)
        self.head_dim = head_dim
        if self.config.rotation:
            self.rotation = HadamardRotation(head_dim, self.config.seed, self.layer_index)
            self.signs = mx.array(random_signs(head_dim, self.config.seed, self.layer_index))

    # --- what attention reads --------------------------------------------------------
    @property
    def sink_length(self) -> int:
        return min(self.offset, self.sink)

    @property
    def quantized_length(self) -> int:
        """Store rows read by attention: positions [sink, sink + this)."""
        return max(0, self.offset - self.sink - self.window_length)

    @property
    def rows_held(self) -> int:
        """Store rows written (``held_rows``): attention reads the first
        ``quantized_length`` of them."""
        return held_rows(self.config, self.offset, self.window_length)

    @property
    def ring_slots(self) -> int:
        """fp slots that can hold tokens (sink and ring), within the allocated buffer."""
        return 0 if self.fp is None else min(self.fp.shape[2], self.sink + self.recent)

    # --- writing ---------------------------------------------------------------------
    def append(self, keys, values):
        """Store (B, Hkv, L, D) keys/values (rotated, float16 and quantized). Returns the
        new tokens' float16 rows (B, Hkv, L, 2D) (a prefill chunk attends to them)."""
        B, H, L, D = keys.shape
        if self.head_dim is None:
            self._setup(D)
        if values.shape != keys.shape or D != self.head_dim:
            raise MlxqError(f"the quantized KV cache needs keys and values of one head_dim "
                            f"({self.head_dim}), got {keys.shape} and {values.shape}")
        if rows_leave_the_window(self.config):
            return self._append_on_leaving(keys, values)
        if not self.config.key_center:
            fp_rows, q_rows = self.encode(keys, values)
            self._write(fp_rows, q_rows, B, H, D)
            return fp_rows
        # One piece per center block (the sink's tokens go with the first).
        pieces, start = [], 0
        while start < L:
            row = self.offset - self.sink  # the next store row (< 0: in the sink)
            stop = min(L, start + CENTER_BLOCK * (1 + max(row, 0) // CENTER_BLOCK) - row)
            if self.center is None:
                self.center = mx.zeros((B, H, 1, D), mx.float16)
            whole = start == 0 and stop == L
            fp_rows, q_rows = self.encode(
                keys if whole else keys[:, :, start:stop],
                values if whole else values[:, :, start:stop], self.center)
            first = self.offset  # the piece's first position
            self._write(fp_rows, q_rows, B, H, D)
            self._finish_block_if_done(fp_rows, first, more=stop < L)
            pieces.append(fp_rows)
            start = stop
        return pieces[0] if len(pieces) == 1 else mx.concatenate(pieces, axis=2)

    def _append_on_leaving(self, keys, values):
        """Rows written as tokens leave the window: the new tokens go to the sink and the
        ring; blocks they complete get their centers (their float16 keys' mean); then the
        rows of the tokens that left (and of the window's oldest, once it is full) are
        quantized from float16. A decode step reads them from the ring after writing it
        (nothing is copied); a chunk that overwrites ring slots reads those first."""
        B, H, L, D = keys.shape
        S, R = self.sink, self.recent
        n0, held0 = self.offset, self.rows_held
        fp_rows = self.rotate(keys, values)
        # Ring rows this write overwrites, read first (a chunk only; the read makes the
        # write copy the ring once): a decode step overwrites nothing it still needs.
        old_fp = self._ring_rows(self.fp, max(S + held0, n0 - self.window_length),
                                 min(n0, n0 + L - R))
        self._write_fp(fp_rows, B, H, D)
        n1, held1 = self.offset, self.rows_held
        if self.config.key_center:
            for end in range(S + round_up(max(1, n0 + 1 - S), CENTER_BLOCK), n1 + 1,
                             CENTER_BLOCK):
                self._center_block(end, held0, n0, old_fp, fp_rows)
        if held1 <= held0:
            return fp_rows
        self._ensure_store(B, H, D, held1)
        if L == 1:  # one row, in its ring slot
            position = S + held0
            self.store[:, :, held0:held1] = self.quantize_slots(
                self.fp, [S + (position - S) % R] * B, [held0 // CENTER_BLOCK] * B)
            return fp_rows
        rows = self._rows_at(S + held0, S + held1, n0, old_fp, fp_rows)
        first = held0
        while first < held1:  # one piece per center block
            last = min(held1, (first // CENTER_BLOCK + 1) * CENTER_BLOCK)
            block = first // CENTER_BLOCK
            center = self.centers[:, :, block:block + 1] if self.config.key_center else None
            piece = rows[:, :, first - held0:last - held0]
            self.store[:, :, first:last] = self.encode(piece[..., :D], piece[..., D:], center,
                                                       rotated=True)[1]
            first = last
        return fp_rows

    def _center_block(self, end: int, held0: int, n0: int, old_fp, fp_rows):
        """Positions [end - CENTER_BLOCK, end) complete a block: its center becomes the
        mean of its float16 keys, unless rows of it are already written (a trim took the
        cache back into it; they keep the center they were written with)."""
        B, H, D = fp_rows.shape[0], fp_rows.shape[1], self.head_dim
        block = (end - self.sink) // CENTER_BLOCK - 1
        self._ensure_centers(B, H, D, end - self.sink)
        if held0 > block * CENTER_BLOCK:
            return
        keys = self._rows_at(end - CENTER_BLOCK, end, n0, old_fp, fp_rows)[..., :D]
        self.centers[:, :, block:block + 1] = own_center(keys)

    def _ring_rows(self, fp, first: int, last: int):
        """(first, the float16 rows of positions [first, last) from ``fp``'s ring), or None
        if there are none."""
        if first >= last:
            return None
        S, R = self.sink, self.recent
        slots = [S + (p - S) % R for p in range(first, last)]
        return first, mx.take(fp, mx.array(slots, dtype=mx.int32), axis=2)

    def _rows_at(self, first: int, last: int, n0: int, old_fp, fp_rows):
        """float16 rows of positions [first, last) (past the sink, not yet left the ring
        when the append began at ``n0``): from the ring as it is now where they still are,
        else from the new tokens' ``fp_rows`` or the overwritten ring rows ``old_fp``."""
        R, n1 = self.recent, self.offset
        kept = max(first, n1 - R)  # from here on, in the ring now
        parts = []
        if first < min(n0, kept):
            start, rows = old_fp
            parts.append(rows[:, :, first - start:min(n0, kept) - start])
        if max(first, n0) < kept:
            parts.append(fp_rows[:, :, max(first, n0) - n0:min(last, kept) - n0])
        if kept < last:
            parts.append(self._ring_rows(self.fp, kept, last)[1])
        return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=2)

    def _finish_block_if_done(self, fp_rows, first: int, more: bool):
        """After a piece (positions [first, offset)) is written: if it completed a block,
        that block's center becomes the mean of its float16 keys and its rows are encoded
        again with it, when those keys are at hand (in the piece, or all still in the
        window); the next block starts from the same center. Otherwise the block keeps the
        center it was written with, and the next block starts from the mean of its keys as
        stored (evaluated at once if another piece will write the store, so that this read
        does not make the write copy it)."""
        rows = self.offset - self.sink
        if rows <= 0 or rows % CENTER_BLOCK:
            return
        start = self.offset - CENTER_BLOCK  # the completed block's first position
        if start >= first:  # all in this piece
            own = fp_rows[:, :, start - first:]
        elif start >= self.offset - self.window_length:  # all in the window's ring
            own = self.window_block(self.fp, self.offset)
        else:
            own = None
        if not self.close_block(rows, own) and more:
            mx.eval(self.center)

    def _ensure_centers(self, B, H, D, rows):
        have = 0 if self.centers is None else self.centers.shape[2]
        if rows // CENTER_BLOCK < have:
            return
        extra = mx.zeros((B, H, centers_capacity(self.config, rows) - have, D), mx.float16)
        self.centers = extra if self.centers is None else mx.concatenate([self.centers, extra], 2)

    def _write(self, fp_rows, q_rows, B, H, D):
        p0, n = self.offset, self.offset + fp_rows.shape[2]
        S = self.sink
        if n > S:  # the store: rows [max(p0, S) - S, n - S)
            first = max(p0, S)
            self._ensure_store(B, H, D, n - S)
            if self.config.key_center:
                self._ensure_centers(B, H, D, n - S)
            self.store[:, :, first - S:n - S] = q_rows[:, :, first - p0:]
        self._write_fp(fp_rows, B, H, D)

    def _write_fp(self, fp_rows, B, H, D):
        """The new tokens' float16 rows into the sink and the ring; the offset and the
        window advance."""
        p0, L = self.offset, fp_rows.shape[2]
        n = p0 + L
        S, R = self.sink, self.recent
        if p0 < S:  # the sink: slots [p0, min(n, S))
            self._ensure_fp(B, H, D, min(n, S))
            self.fp[:, :, p0:min(n, S)] = fp_rows[:, :, :min(n, S) - p0]
        if R and n > S:  # the ring: the newest min(R, n - S) tokens, split at the wrap
            first = max(p0, S, n - R)
            self._ensure_fp(B, H, D, S + min(R, n - S))
            while first < n:
                slot = S + (first - S) % R
                count = min(n - first, S + R - slot)
                self.fp[:, :, slot:slot + count] = fp_rows[:, :, first - p0:first - p0 + count]
                first += count
        self.offset = n
        self.window_length = min(R, self.window_length + L, max(0, n - S))

    def _ensure_store(self, B, H, D, rows):
        # Whole steps of zeros appended: one copy per `step` tokens, never per token.
        have = 0 if self.store is None else self.store.shape[2]
        if rows <= have:
            return
        extra = mx.zeros((B, H, store_capacity(self.config, rows) - have,
                          row_words(D, self.bits, self.group_size, self.key_bits)), mx.uint32)
        self.store = extra if self.store is None else mx.concatenate([self.store, extra], 2)

    def _ensure_fp(self, B, H, D, slots):
        # Sized by what is held, not by `recent`: a huge window allocates as it fills.
        have = 0 if self.fp is None else self.fp.shape[2]
        if slots <= have:
            return
        extra = mx.zeros((B, H, fp_capacity(self.config, slots) - have, 2 * D), mx.float16)
        self.fp = extra if self.fp is None else mx.concatenate([self.fp, extra], 2)

    # --- bookkeeping -----------------------------------------------------------------
    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        """Forget the newest ``n`` tokens (buffers stay allocated). The window shrinks with
        them: the ring slots they held are not refilled with older tokens, which are read
        from the store instead. Returns how many were forgotten."""
        n = max(0, min(self.offset, n))
        self.offset -= n
        self.window_length = max(0, min(self.window_length - n, self.offset - self.sink))
        self._restore_center()
        return n

    def _restore_center(self):
        """``center`` from ``centers`` for the block the next token goes to (after a trim
        or a load); centers of later blocks are recomputed as their blocks start."""
        if self.centers is None:
            self.center = None
            return
        block = max(0, self.offset - self.sink) // CENTER_BLOCK
        # A gather, not a slice: a buffer of its own (the append kernel reads it each step).
        self.center = mx.take(self.centers, mx.array([block], dtype=mx.int32), axis=2)

    def empty(self) -> bool:
        return self.offset == 0 and self.store is None and self.fp is None

    @property
    def nbytes(self) -> int:
        """Bytes of the allocated buffers (capacity, not just the stored tokens)."""
        return sum(x.nbytes for x in (self.store, self.fp, self.centers) if x is not None)

    @property
    def fp16_nbytes(self) -> int:
        """What an fp16 cache holding the same tokens would allocate (ratios): the sink
        slots and the tokens past it in whole ``step`` blocks."""
        if self.head_dim is None:
            return 0
        B, H = (self.store if self.store is not None else self.fp).shape[:2]
        tokens = self.sink_length + store_capacity(self.config, self.offset - self.sink_length)
        return fp16_bytes(B, H, tokens, self.head_dim, self.head_dim)

    # --- save / load -----------------------------------------------------------------
    @property
    def state(self):
        # The stored tokens only: a saved cache holds no padding.
        state = {}
        if self.offset and self.fp is not None:
            state["fp"] = self.fp[:, :, :self.ring_slots]
        rows, centers = self.rows_held, centers_held(self.config, self.offset)
        if rows:
            state["store"] = self.store[:, :, :rows]
        if centers:
            state["centers"] = self.centers[:, :, :centers]
        return state

    @state.setter
    def state(self, value):
        offset, window, head_dim = self.offset, self.window_length, self.head_dim
        self._clear()
        if not value:
            return
        # Refused: other buffers, other counts of rows or centers (another block size, rows
        # written on arrival), rows of another layout.
        def count(name):
            return value[name].shape[2] if name in value else 0

        if not isinstance(value, dict) or not set(value) <= {"fp", "store", "centers"} \
                or count("store") != held_rows(self.config, offset, window) \
                or count("centers") != centers_held(self.config, offset) \
                or ("store" in value and self.row_layout != ROW_LAYOUT):
            raise MlxqError("this saved cache has an older int4/int8 layout; save it again")
        self.fp, self.store = value.get("fp"), value.get("store")
        self.centers = value.get("centers")
        self._setup(head_dim)
        self.offset, self.window_length = offset, window
        self._restore_center()

    @property
    def meta_state(self):
        return {"config": self.config.to_meta(), "layer_index": self.layer_index,
                "head_dim": self.head_dim, "offset": self.offset,
                "window_length": self.window_length, "row_layout": ROW_LAYOUT}

    @meta_state.setter
    def meta_state(self, value):
        self.config = KVCacheConfig.from_meta(value.get("config"))
        self.layer_index = int(value.get("layer_index", 0))
        from .backend import kernel_backend

        self.backend = getattr(self, "backend", None) or kernel_backend()
        self._clear()
        self.head_dim = value.get("head_dim")
        self.offset = int(value.get("offset", 0))
        self.window_length = int(value.get("window_length", 0))
        self.row_layout = int(value.get("row_layout", 1))


def quantized_nbytes(config: KVCacheConfig, heads: int, head_dim: int, tokens: int) -> int:
    """Bytes one layer's ``QuantizedKVCache`` of one sequence allocates once it holds
    ``tokens`` tokens (``nbytes`` agrees; the server reserves memory by it): store rows
    past the sink in whole ``step`` blocks, float16 slots in FP_STEP blocks up to
    sink + recent."""
    S, R = config.sink, config.recent
    rows = store_capacity(config, held_rows(config, tokens, min(R, max(0, tokens - S))))
    slots = fp_capacity(config, min(tokens, S) + min(R, max(0, tokens - S)))
    centers = (centers_capacity(config, tokens - S)
               if centers_held(config, tokens) else 0)
    return (heads * rows * row_bytes(head_dim, config.bits, config.group_size, config.key_bits)
            + fp16_bytes(1, heads, slots, head_dim, head_dim)
            + heads * centers * head_dim * 2)
