"""Append new tokens to the int4/int8 KV cache: rotate, round to float16, quantize.

``append_rows`` turns the new keys/values (B, Hkv, L, D) of one layer into the two forms the
cache stores (``fp_rows`` for its float16 sink/window buffer, ``q_rows`` for its quantized
store; layouts in ``kv_layout``) with one kernel launch (metal/kv_append.metal) on the kernel
backends; ``quantize_slots`` quantizes float16 rows already in the window buffer (the token
leaving the window) with the same kernel, reading them in place. ``reference_append_rows`` is the oracle: MLX's Hadamard transform, a float16
cast and ``kv_layout.quantize_groups`` (``mx.quantize`` for 8-bit groups); the kernel
matches it up to float rounding order in the rotation (bit for bit without rotation). With a key ``center`` (one per sequence and KV head, shared
by the new tokens: they are in one center block) the keys are quantized minus it, in
float32 after the float16 rounding; the float16 rows keep the keys themselves.
"""

import functools

import mlx.core as mx

from ..backend import metal_kernel
from ..kernel_source import read_kernel_source
from .kv_layout import pack_rows, quantize_groups, row_words

_THREADS = 64  # two simdgroups: keys and values


@functools.cache
def _kernel(backend: str, name: str = "mlxq_kv_append"):
    # One source; the GATHER variant has a name of its own (mlxq_kv_quantize_slots), so a
    # traced step tells it apart (it reads one row of the buffers it is given).
    return metal_kernel(
        backend=backend,
        name=name,
        input_names=["keys", "values", "signs", "center", "tokens", "at"],
        output_names=["fp_rows", "q_rows"],
        header=read_kernel_source("hadamard.h") + read_kernel_source("kv_row.h"),
        source=read_kernel_source("kv_append.metal"),
    )


def reference_append_rows(keys, values, rotation, bits: int, group_size: int, center=None,
                          key_bits: int | None = None):
    """(fp_rows (..., 2D) float16, q_rows (..., ROW) uint32) with plain MLX ops.
    ``rotation``: None or an object with ``forward(x)`` (x @ R); ``center``: None or
    (B, H, 1, D) float16 subtracted from the keys (B, H, L, D) before quantizing; ``bits``
    the values' (and the keys', unless ``key_bits``)."""
    fp_rows = reference_fp_rows(keys, values, rotation)
    D = keys.shape[-1]
    k16, v16 = fp_rows[..., :D], fp_rows[..., D:]
    k_in = k16 if center is None else k16.astype(mx.float32) - center.astype(mx.float32)
    q_rows = pack_rows(quantize_groups(k_in, key_bits or bits, group_size),
                       quantize_groups(v16, bits, group_size))
    return fp_rows, q_rows


def reference_fp_rows(keys, values, rotation):
    """The float16 rows (..., 2D) [key | value] of new tokens, rotated (``rotation`` None:
    as they are)."""
    if rotation is not None:
        keys, values = rotation.forward(keys), rotation.forward(values)
    return mx.concatenate([keys.astype(mx.float16), values.astype(mx.float16)], axis=-1)


def append_rows(keys, values, signs, bits: int, group_size: int, backend: str, center=None,
                key_bits: int | None = None, quantize: bool = True):
    """Kernel version of ``reference_append_rows`` with the rotation given by its ``signs``
    (D,) float32 (None: no rotation). keys/values (..., D), D a power of two if rotated;
    ``center`` as there (keys then (B, H, L, D)). ``quantize`` False: the float16 rows
    only (q_rows is then a placeholder; rows written as tokens leave the window)."""
    if keys.shape != values.shape:
        raise ValueError(f"keys {keys.shape} and values {values.shape} must have one shape")
    *lead, D = keys.shape
    if keys.dtype not in (mx.float16, mx.float32):
        keys = keys.astype(mx.float32)
    if values.dtype != keys.dtype:
        values = values.astype(keys.dtype)
    rows = keys.size // D
    if center is not None:
        center = center.astype(mx.float16)
    fp_rows, q_rows = _kernel(backend)(
        inputs=[keys, values, signs if signs is not None else mx.zeros((1,), mx.float32),
                center if center is not None else mx.zeros((1,), mx.float16),
                mx.array([keys.shape[-2] if center is not None else 1], dtype=mx.int32),
                mx.zeros((1,), mx.int32)],
        template=[("T", keys.dtype), ("D", D), ("BITS", bits), ("KBITS", key_bits or bits),
                  ("GS", group_size), ("ROTATE", signs is not None),
                  ("CENTER", center is not None), ("QUANT", quantize), ("GATHER", False)],
        grid=(rows * _THREADS, 1, 1),
        threadgroup=(_THREADS, 1, 1),
        output_shapes=[(*lead, 2 * D),
                       (*lead, row_words(D, bits, group_size, key_bits)) if quantize else (1,)],
        output_dtypes=[mx.float16, mx.uint32],
    )
    return fp_rows, q_rows


def reference_quantize_slots(fp, slots, centers, blocks, bits: int, group_size: int,
                             key_bits: int | None = None):
    """The quantized rows (B, H, 1, ROW) of one float16 window row per sequence: sequence
    b's row in slot ``slots[b]`` of ``fp`` (B, H, slots, 2D) (rotated already), its keys
    minus ``centers[b, :, blocks[b]]`` (``centers`` None: no centering). Plain MLX ops."""
    B, H, _, D2 = fp.shape
    D = D2 // 2
    rows = mx.take_along_axis(fp, _index(slots, (B, H, 1, D2)), axis=2)
    center = (None if centers is None
              else mx.take_along_axis(centers, _index(blocks, (B, H, 1, D)), axis=2))
    return reference_append_rows(rows[..., :D], rows[..., D:], None, bits, group_size,
                                 center, key_bits)[1]


def quantize_slots(fp, slots, centers, blocks, bits: int, group_size: int, backend: str,
                   key_bits: int | None = None):
    """Kernel version of ``reference_quantize_slots``: one launch that reads each row and
    its center where they lie in the cache's buffers (no gathered copy)."""
    B, H, n_slots, D2 = fp.shape
    D = D2 // 2
    slab = [b * H + h for b in range(B) for h in range(H)]
    at = [s * n_slots * D2 + slots[s // H] * D2 for s in slab]
    if centers is not None:
        at += [s * centers.shape[2] * D + blocks[s // H] * D for s in slab]
    else:
        at += [0] * len(slab)
    _, q_rows = _kernel(backend, "mlxq_kv_quantize_slots")(
        inputs=[fp, fp, mx.zeros((1,), mx.float32),
                centers if centers is not None else mx.zeros((1,), mx.float16),
                mx.array([1], dtype=mx.int32), mx.array(at, dtype=mx.int32)],
        template=[("T", mx.float16), ("D", D), ("BITS", bits), ("KBITS", key_bits or bits),
                  ("GS", group_size), ("ROTATE", False), ("CENTER", centers is not None),
                  ("QUANT", True), ("GATHER", True)],
        grid=(B * H * _THREADS, 1, 1),
        threadgroup=(_THREADS, 1, 1),
        output_shapes=[(B, H, 1, D2), (B, H, 1, row_words(D, bits, group_size, key_bits))],
        output_dtypes=[mx.float16, mx.uint32],
    )
    return q_rows


def _index(positions, shape):
    """positions (one per sequence) as an index along axis 2 of that (B, H, 1, W) shape."""
    return mx.broadcast_to(mx.array(positions, dtype=mx.int32).reshape(-1, 1, 1, 1), shape)
