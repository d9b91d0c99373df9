"""Batched caches: several sequences decoding together, each at its own length.

Continuous batching keeps a running batch: a sequence is prefilled alone (in a
``QuantizedKVCache``), joins the batch with ``extend`` and leaves it with ``filter``
(mlx-lm's ``BatchKVCache`` names), each a one-time copy of the sequences' rows, and
``extract`` gives one sequence back as a plain ``QuantizedKVCache`` (what it would hold
had it decoded alone: the server's prefix cache keeps it). In
between, every decode step appends one token per sequence at that sequence's own position
and the fused kernel attends each sequence over its own length (``lens``), so one forward
pass decodes the whole batch. The layout is ``QuantizedKVCache``'s, per sequence, plus one
scratch row in the store and one scratch slot in the float16 buffer: a sequence whose new
token has no place there (still in the sink; no window) writes it to the scratch, which no
kernel reads. ``offset`` is an array of lengths, which RoPE takes per sequence.

Every row of the store has the longest sequence's capacity (``store_rows``), so a batch
allocates ``batch_nbytes``: what the server reserves for the sequences it runs together.
With key centering the batch also holds each sequence's ``centers`` (one per block of the
store's rows, plus the next block's) and ``center`` (its current block's); a sequence that
completes a block in a step gets its next center after that step's write, as alone.

``BatchKVCache`` is the same for the full-precision ``KVCache`` (``--kv-bits 16``): keys
and values (B, H, rows, D), a sequence's token p in row p, and attention masks each
sequence to its own length (MLX's fused SDPA with a boolean mask; ``mask``).
"""

import mlx.core as mx

from .cache import KVCache
from .errors import MlxqError
from .kernels.kv_layout import CENTER_BLOCK, fp16_bytes, held_centers, row_bytes, row_words
from .kv_config import KVCacheConfig
from .quantized_cache import (
    QuantizedKVCache,
    QuantizedOptions,
    centers_held,
    held_rows,
    own_center,
    round_up,
    rows_leave_the_window,
    store_capacity,
)


def store_rows(config: KVCacheConfig, longest: int) -> int:
    """Store rows of a batch whose longest sequence holds ``longest`` tokens: the rows
    past the sink, the scratch row and the next token's row, in whole ``step`` blocks."""
    return store_capacity(config, max(1, longest - config.sink + 2))


def batch_centers(config: KVCacheConfig, rows: int) -> int:
    """Key centers per sequence of a batch whose store has ``rows`` rows (0: no centering):
    one per block of rows, plus the block after the last."""
    return held_centers(rows) if config.key_center else 0


def batch_nbytes(config: KVCacheConfig, heads: int, head_dim: int, sequences: int,
                 tokens: int) -> int:
    """An upper bound on one layer's ``BatchQuantizedKVCache`` bytes for ``sequences``
    sequences that each hold fewer than ``tokens`` tokens (``nbytes`` stays within it)."""
    fp_slots = config.sink + config.recent + 1  # + the scratch slot
    rows = store_rows(config, tokens - 1)
    centers = batch_centers(config, rows) + 1 if config.key_center else 0  # + ``center``
    return (sequences * heads * rows * row_bytes(head_dim, config.bits, config.group_size,
                                                 config.key_bits)
            + fp16_bytes(sequences, heads, fp_slots, head_dim, head_dim)
            + sequences * heads * centers * head_dim * 2)


class _Batch:
    """What both batched caches share: ``lengths`` (one per sequence) and the buffers
    named by ``state``."""

    lengths: list

    @property
    def offset(self):
        """Per-sequence lengths (B,), what RoPE takes as positions."""
        return mx.array(self.lengths, dtype=mx.int32)

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in self.state)


class BatchQuantizedKVCache(QuantizedOptions, _Batch):
    """One layer's cache for a batch of sequences (same config and layer)."""

    def __init__(self, caches: list):
        if not caches:
            raise MlxqError("a batch needs at least one sequence")
        first = caches[0]
        for c in caches:
            if not isinstance(c, QuantizedKVCache) or c.config != first.config \
                    or c.layer_index != first.layer_index or c.backend != first.backend:
                raise MlxqError("sequences of one batch need the same KV cache options")
            if c.head_dim is None or c.store is None and c.fp is None:
                raise MlxqError("prefill a sequence before it joins a batch")
        self.config, self.layer_index, self.backend = first.config, first.layer_index, first.backend
        self.head_dim = first.head_dim
        self.rotation, self.signs = first.rotation, first.signs
        self.kernel_rotates = first.kernel_rotates
        self.lengths = [c.offset for c in caches]
        self.window_lengths = [c.window_length for c in caches]
        self.store, self.fp = self._stack([c.store for c in caches], [c.fp for c in caches],
                                          max(self.lengths))
        self.centers = self.center = None
        if self.config.key_center:
            H, D = self.store.shape[1], self.head_dim
            count = batch_centers(self.config, self.store.shape[2])
            self.centers = mx.concatenate([_pad_rows(_empty_if_none(c.centers, H, D)
                                                     [:, :, :count], count) for c in caches])
            self.center = mx.concatenate([_pad_rows(_empty_if_none(c.center, H, D), 1)
                                          for c in caches])

    # --- what attention reads ---------------------------------------------------------
    @property
    def lens(self) -> list:
        return list(zip(self.lengths, self.window_lengths))

    @property
    def state(self):
        """The buffers (what to evaluate after joining or leaving)."""
        if self.centers is None:
            return self.store, self.fp
        return self.store, self.fp, self.centers, self.center

    # --- joining and leaving --------------------------------------------------------
    def _stack(self, stores, fps, longest):
        """Whole buffers for the batch: rows padded to one capacity (+ the scratch row),
        float16 buffers to sink + recent slots (+ the scratch slot)."""
        D, S, R = self.head_dim, self.sink, self.recent
        H = next(x for x in stores + fps if x is not None).shape[1]
        rows = store_rows(self.config, longest)
        words = row_words(D, self.bits, self.group_size, self.key_bits)

        def padded(x, size, width, dtype):
            have = 0 if x is None else x.shape[2]
            pad = mx.zeros((1, H, size - have, width), dtype)
            return pad if x is None else mx.concatenate([x[:, :, :size], pad], axis=2)

        store = mx.concatenate([padded(x, rows, words, mx.uint32) for x in stores])
        fp = mx.concatenate([padded(x, S + R + 1, 2 * D, mx.float16) for x in fps])
        return store, fp

    def extend(self, other: "BatchQuantizedKVCache"):
        """Add ``other``'s sequences after this batch's (a copy of both)."""
        if other.config != self.config or other.layer_index != self.layer_index:
            raise MlxqError("sequences of one batch need the same KV cache options")
        rows = max(self.store.shape[2], other.store.shape[2])
        self.store = mx.concatenate([_pad_rows(self.store, rows), _pad_rows(other.store, rows)])
        self.fp = mx.concatenate([self.fp, other.fp])
        if self.centers is not None:
            count = batch_centers(self.config, rows)
            self.centers = mx.concatenate([_pad_rows(self.centers, count),
                                           _pad_rows(other.centers, count)])
            self.center = mx.concatenate([self.center, other.center])
        self.lengths += other.lengths
        self.window_lengths += other.window_lengths

    def filter(self, keep: list):
        """Keep the sequences at indices ``keep`` (in that order); the others leave, and
        the store shrinks to the longest remaining sequence's rows."""
        if not keep:
            raise MlxqError("a batch needs at least one sequence")
        self.lengths = [self.lengths[i] for i in keep]
        self.window_lengths = [self.window_lengths[i] for i in keep]
        rows = min(self.store.shape[2], store_rows(self.config, max(self.lengths)))
        self.store = _gather(self.store, keep, rows)
        self.fp = _gather(self.fp, keep, self.fp.shape[2])
        if self.centers is not None:
            self.centers = _gather(self.centers, keep, batch_centers(self.config, rows))
            self.center = _gather(self.center, keep, 1)

    def extract(self, i: int) -> QuantizedKVCache:
        """Sequence ``i`` as its own ``QuantizedKVCache`` (a copy; the batch is unchanged):
        the rows, slots, lengths and buffer capacities it would hold had it decoded
        alone (the server's prefix cache keeps it)."""
        n, S, R, D = self.lengths[i], self.sink, self.recent, self.head_dim
        H = self.store.shape[1]
        cache = QuantizedKVCache(self.config, self.layer_index, self.backend)
        cache.head_dim, cache.rotation, cache.signs = D, self.rotation, self.signs
        rows = held_rows(self.config, n, self.window_lengths[i])
        if rows:
            cache._ensure_store(1, H, D, rows)
            cache.store[:, :, :rows] = _gather(self.store, [i], rows)
        cache._ensure_fp(1, H, D, min(n, S) + min(R, max(0, n - S)))
        cache.fp = _gather(self.fp, [i], cache.fp.shape[2])
        if self.centers is not None:
            cache.center = _gather(self.center, [i], 1)
            blocks = centers_held(self.config, n)
            if blocks:
                cache._ensure_centers(1, H, D, n - S)
                cache.centers[:, :, :blocks] = _gather(self.centers, [i], blocks)
        cache.offset, cache.window_length = n, self.window_lengths[i]
        return cache

    # --- writing --------------------------------------------------------------------
    def append(self, keys, values):
        """One new token per sequence, (B, Hkv, 1, D), each at its own position."""
        B, H, L, D = keys.shape
        if L != 1 or B != len(self.lengths) or D != self.head_dim:
            raise MlxqError(f"a batch appends one token per sequence, got {keys.shape} for "
                            f"{len(self.lengths)} sequences of head_dim {self.head_dim}")
        S, R = self.sink, self.recent
        leaving = rows_leave_the_window(self.config)
        if leaving:
            fp_rows, held0 = self.rotate(keys, values), self._rows_held()
        else:
            fp_rows, q_rows = self.encode(keys, values, self.center)
        if max(self.lengths) + 1 - S >= self.store.shape[2]:  # keep the scratch row free
            extra = mx.zeros((*self.store.shape[:2], self.config.step, self.store.shape[3]),
                             mx.uint32)
            self.store = mx.concatenate([self.store, extra], axis=2)
            if self.centers is not None:
                self.centers = _pad_rows(self.centers,
                                         batch_centers(self.config, self.store.shape[2]))
        scratch_row, scratch_slot = self.store.shape[2] - 1, S + R
        fp_at = [n if n < S else (S + (n - S) % R if R else scratch_slot)
                 for n in self.lengths]
        if not leaving:
            store_at = [n - S if n >= S else scratch_row for n in self.lengths]
            self.store = _put_rows(self.store, store_at, q_rows)
        self.fp = _put_rows(self.fp, fp_at, fp_rows)
        self.window_lengths = [min(R, w + 1, max(0, n + 1 - S))
                               for n, w in zip(self.lengths, self.window_lengths)]
        self.lengths = [n + 1 for n in self.lengths]
        if leaving:
            self._write_leaving_rows(held0, scratch_row)
        elif self.centers is not None:
            self._next_centers()

    def _rows_held(self) -> list:
        return [held_rows(self.config, n, w) for n, w in zip(self.lengths, self.window_lengths)]

    def _write_leaving_rows(self, held0: list, scratch_row: int):
        """After the step's float16 writes: blocks completed get their centers (their
        float16 keys' mean, unless rows of theirs are written), then each sequence whose
        window is full quantizes its oldest window row in place (one launch for the batch;
        the others write the scratch row)."""
        S, R = self.sink, self.recent
        if self.centers is not None:
            for i, n in enumerate(self.lengths):
                rows = n - S
                if rows > 0 and rows % CENTER_BLOCK == 0 \
                        and held0[i] <= rows - CENTER_BLOCK:
                    keys = self.window_block(self.fp[i:i + 1], n)[..., :self.head_dim]
                    block = rows // CENTER_BLOCK - 1
                    self.centers[i:i + 1, :, block:block + 1] = own_center(keys)
        held1 = self._rows_held()
        if held1 == held0:
            return
        store_at, slots, blocks = [], [], []
        for before, after in zip(held0, held1):
            writes = after > before
            store_at.append(before if writes else scratch_row)
            slots.append(S + before % R if writes else 0)
            blocks.append(before // CENTER_BLOCK if writes else 0)
        self.store = _put_rows(self.store, store_at, self.quantize_slots(self.fp, slots, blocks))

    def _next_centers(self):
        """Sequences whose step completed a block: closed as ``QuantizedKVCache`` closes
        one (own center from the window's float16 keys, else from the stored rows), after
        the write."""
        for i, n in enumerate(self.lengths):
            rows = n - self.sink
            if rows <= 0 or rows % CENTER_BLOCK:
                continue
            own = (self.window_block(self.fp[i:i + 1], n)
                   if self.window_lengths[i] >= CENTER_BLOCK else None)
            self.close_block(rows, own, seq=slice(i, i + 1))


def full_precision_nbytes(step: int, heads: int, head_dim: int, itemsize: int,
                          sequences: int, tokens: int) -> int:
    """Bytes of full-precision caches (``KVCache`` for one sequence, ``BatchKVCache`` for
    several) whose sequences each hold fewer than ``tokens`` tokens: keys and values in
    whole ``step`` blocks, every row as long as the longest (an upper bound)."""
    return sequences * 2 * heads * round_up(max(tokens, 1), step) * head_dim * itemsize


class BatchKVCache(_Batch):
    """One layer's full-precision cache for a batch of sequences, each at its own length.
    Same API as ``BatchQuantizedKVCache``; attention reads it with ``mask``."""

    def __init__(self, caches: list):
        if not caches:
            raise MlxqError("a batch needs at least one sequence")
        first = caches[0]
        for c in caches:
            if not isinstance(c, KVCache) or (c.step, c.dtype) != (first.step, first.dtype):
                raise MlxqError("sequences of one batch need the same KV cache options")
            if c.keys is None:
                raise MlxqError("prefill a sequence before it joins a batch")
        self.step, self.dtype = first.step, first.dtype
        self.lengths = [c.offset for c in caches]
        rows = round_up(max(self.lengths) + 1, self.step)  # + the next token's row
        self.keys = mx.concatenate([_pad_rows(c.keys[:, :, :c.offset], rows) for c in caches])
        self.values = mx.concatenate([_pad_rows(c.values[:, :, :c.offset], rows)
                                      for c in caches])

    @property
    def mask(self):
        """(B, 1, 1, rows): True where a row holds one of that sequence's tokens."""
        rows = mx.arange(self.keys.shape[2], dtype=mx.int32)
        return (rows[None] < self.offset[:, None])[:, None, None]

    @property
    def state(self):
        return self.keys, self.values

    def update_and_fetch(self, keys, values):
        """One new token per sequence, (B, H, 1, D), each in its own next row; returns all
        rows (attend them under ``mask``)."""
        if keys.shape[2] != 1 or keys.shape[0] != len(self.lengths):
            raise MlxqError(f"a batch appends one token per sequence, got {keys.shape} for "
                            f"{len(self.lengths)} sequences")
        if max(self.lengths) >= self.keys.shape[2]:
            rows = self.keys.shape[2] + self.step
            self.keys, self.values = _pad_rows(self.keys, rows), _pad_rows(self.values, rows)
        self.keys = _put_rows(self.keys, self.lengths, keys.astype(self.dtype))
        self.values = _put_rows(self.values, self.lengths, values.astype(self.dtype))
        self.lengths = [n + 1 for n in self.lengths]
        return self.keys, self.values

    def extend(self, other: "BatchKVCache"):
        """Add ``other``'s sequences after this batch's (a copy of both)."""
        if (other.step, other.dtype) != (self.step, self.dtype):
            raise MlxqError("sequences of one batch need the same KV cache options")
        rows = max(self.keys.shape[2], other.keys.shape[2])
        self.keys = mx.concatenate([_pad_rows(self.keys, rows), _pad_rows(other.keys, rows)])
        self.values = mx.concatenate([_pad_rows(self.values, rows),
                                      _pad_rows(other.values, rows)])
        self.lengths += other.lengths

    def filter(self, keep: list):
        """Keep the sequences at indices ``keep`` (in that order); rows shrink to the
        longest remaining sequence's."""
        if not keep:
            raise MlxqError("a batch needs at least one sequence")
        self.lengths = [self.lengths[i] for i in keep]
        rows = min(self.keys.shape[2], round_up(max(self.lengths) + 1, self.step))
        self.keys = _gather(self.keys, keep, rows)
        self.values = _gather(self.values, keep, rows)

    def extract(self, i: int) -> KVCache:
        """Sequence ``i`` as its own ``KVCache`` (a copy, the capacity it would have had
        alone); the batch is unchanged."""
        n = self.lengths[i]
        cache = KVCache(step=self.step, dtype=self.dtype)
        cache.keys = _gather(self.keys, [i], round_up(n, self.step))
        cache.values = _gather(self.values, [i], round_up(n, self.step))
        cache.offset = n
        return cache


def _empty_if_none(x, heads: int, head_dim: int):
    """A sequence's key centers, or none yet: (1, H, 0, D)."""
    return mx.zeros((1, heads, 0, head_dim), mx.float16) if x is None else x


def _pad_rows(x, rows: int):
    """``x`` (B, H, n, W) with zero rows appended up to ``rows``."""
    if x.shape[2] == rows:
        return x
    return mx.concatenate([x, mx.zeros((*x.shape[:2], rows - x.shape[2], x.shape[3]),
                                       x.dtype)], axis=2)


def _gather(buffer, sequences: list, slots: int):
    """The first ``slots`` rows of these sequences, in a buffer of their own. (A slice,
    also after indexing, is a view that keeps the whole source buffer alive.)"""
    return mx.take(buffer[:, :, :slots], mx.array(sequences, dtype=mx.int32), axis=0)


def _put_rows(buffer, positions, rows):
    """buffer[b, :, positions[b]] = rows[b, :, 0] for every b: one scatter, in place when
    nothing else holds the buffer."""
    B, H, _, W = rows.shape
    index = mx.broadcast_to(mx.array(positions, dtype=mx.int32).reshape(B, 1, 1, 1),
                            (B, H, 1, W))
    return mx.put_along_axis(buffer, index, rows, axis=2)
