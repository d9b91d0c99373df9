"""Append new tokens to the int4/int8 KV cache: rotate, round to float16, quantize.

``append_rows`` turns the new keys/values (B, Hkv, L, D) of one layer into the two forms the
cache stores (``fp_rows`` for its float16 sink/window buffer, ``q_rows`` for its quantized
store; layouts in ``kv_layout``) with one kernel launch (metal/kv_append.metal) on the kernel
backends. ``reference_append_rows`` is the oracle: MLX's Hadamard transform, a float16
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
def _kernel(backend: str):
    return metal_kernel(
        backend=backend,
        name="mlxq_kv_append",
        input_names=["keys", "values", "signs", "center", "tokens"],
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
    if rotation is not None:
        keys, values = rotation.forward(keys), rotation.forward(values)
    k16, v16 = keys.astype(mx.float16), values.astype(mx.float16)
    k_in = k16 if center is None else k16.astype(mx.float32) - center.astype(mx.float32)
    q_rows = pack_rows(quantize_groups(k_in, key_bits or bits, group_size),
                       quantize_groups(v16, bits, group_size))
    return mx.concatenate([k16, v16], axis=-1), q_rows


def append_rows(keys, values, signs, bits: int, group_size: int, backend: str, center=None,
                key_bits: int | None = None):
    """Kernel version of ``reference_append_rows`` with the rotation given by its ``signs``
    (D,) float32 (None: no rotation). keys/values (..., D), D a power of two if rotated;
    ``center`` as there (keys then (B, H, L, D))."""
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
                mx.array([keys.shape[-2] if center is not None else 1], dtype=mx.int32)],
        template=[("T", keys.dtype), ("D", D), ("BITS", bits), ("KBITS", key_bits or bits),
                  ("GS", group_size),
                  ("ROTATE", signs is not None), ("CENTER", center is not None)],
        grid=(rows * _THREADS, 1, 1),
        threadgroup=(_THREADS, 1, 1),
        output_shapes=[(*lead, 2 * D), (*lead, row_words(D, bits, group_size, key_bits))],
        output_dtypes=[mx.float16, mx.uint32],
    )
    return fp_rows, q_rows
