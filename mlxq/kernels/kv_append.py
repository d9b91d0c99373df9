"""Append new tokens to the int4/int8 KV cache: rotate, round to float16, quantize.

``append_rows`` turns the new keys/values (B, Hkv, L, D) of one layer into the two forms the
cache stores (``fp_rows`` for its float16 sink/window buffer, ``q_rows`` for its quantized
store; layouts in ``kv_layout``) with one kernel launch (metal/kv_append.metal) on the kernel
backends. ``reference_append_rows`` is the oracle: MLX's Hadamard transform, a float16
cast and ``mx.quantize``; the kernel matches it up to float rounding order in the rotation
(bit for bit without rotation).
"""

import functools

import mlx.core as mx

from ..backend import metal_kernel
from ..kernel_source import read_kernel_source
from .kv_layout import pack_rows, row_words

_THREADS = 64  # two simdgroups: keys and values


@functools.cache
def _kernel(backend: str):
    return metal_kernel(
        backend=backend,
        name="mlxq_kv_append",
        input_names=["keys", "values", "signs"],
        output_names=["fp_rows", "q_rows"],
        header=read_kernel_source("hadamard.h"),
        source=read_kernel_source("kv_append.metal"),
    )


def reference_append_rows(keys, values, rotation, bits: int, group_size: int):
    """(fp_rows (..., 2D) float16, q_rows (..., ROW) uint32) with plain MLX ops.
    ``rotation``: None or an object with ``forward(x)`` (x @ R)."""
    if rotation is not None:
        keys, values = rotation.forward(keys), rotation.forward(values)
    k16, v16 = keys.astype(mx.float16), values.astype(mx.float16)
    q_rows = pack_rows(mx.quantize(k16, group_size=group_size, bits=bits),
                       mx.quantize(v16, group_size=group_size, bits=bits))
    return mx.concatenate([k16, v16], axis=-1), q_rows


def append_rows(keys, values, signs, bits: int, group_size: int, backend: str):
    """Kernel version of ``reference_append_rows`` with the rotation given by its ``signs``
    (D,) float32 (None: no rotation). keys/values (..., D), D a power of two if rotated."""
    if keys.shape != values.shape:
        raise ValueError(f"keys {keys.shape} and values {values.shape} must have one shape")
    *lead, D = keys.shape
    if keys.dtype not in (mx.float16, mx.float32):
        keys = keys.astype(mx.float32)
    if values.dtype != keys.dtype:
        values = values.astype(keys.dtype)
    rows = keys.size // D
    fp_rows, q_rows = _kernel(backend)(
        inputs=[keys, values, signs if signs is not None else mx.zeros((1,), mx.float32)],
        template=[("T", keys.dtype), ("D", D), ("BITS", bits), ("GS", group_size),
                  ("ROTATE", signs is not None)],
        grid=(rows * _THREADS, 1, 1),
        threadgroup=(_THREADS, 1, 1),
        output_shapes=[(*lead, 2 * D), (*lead, row_words(D, bits, group_size))],
        output_dtypes=[mx.float16, mx.uint32],
    )
    return fp_rows, q_rows
