"""Quantize-on-append: new keys/values -> MLX affine codes, float16 scales and biases.

One kernel launch quantizes the keys and the values of a layer. The result equals
``mx.quantize(x.astype(mx.float16), group_size, bits)`` bit for bit (see the rounding notes
in metal/kv_write.metal); the ``reference`` backend computes exactly that.
"""

import functools

import mlx.core as mx

from ..backend import kernel_backend, metal_kernel
from ..kernel_source import read_kernel_source

_OUTPUTS = ("k_codes", "k_scales", "k_biases", "v_codes", "v_scales", "v_biases")
_THREADGROUP = 64


@functools.cache
def _kernel(backend: str):
    return metal_kernel(
        backend=backend,
        name="mlxq_kv_write",
        input_names=["keys", "values", "params"],
        output_names=list(_OUTPUTS),
        source=read_kernel_source("kv_write.metal"),
    )


def _as_input(x):
    # The kernel reads float or half; anything else is first rounded to half, which the
    # kernel would do anyway.
    return x if x.dtype in (mx.float16, mx.float32) else x.astype(mx.float16)


def reference_quantize_kv(keys, values, group_size: int, bits: int):
    k = mx.quantize(keys.astype(mx.float16), group_size=group_size, bits=bits)
    v = mx.quantize(values.astype(mx.float16), group_size=group_size, bits=bits)
    return tuple(k), tuple(v)


def quantize_kv(keys, values, group_size: int, bits: int, backend: str | None = None):
    """Quantize keys and values (..., D) (same shape).

    Returns ``((k_codes, k_scales, k_biases), (v_codes, v_scales, v_biases))`` with codes
    uint32 (..., D*bits/32) and scales/biases float16 (..., D/group_size).
    """
    backend = backend or kernel_backend()
    if backend == "reference":
        return reference_quantize_kv(keys, values, group_size, bits)
    if keys.shape != values.shape:
        raise ValueError(f"keys {keys.shape} and values {values.shape} must have one shape")
    *lead, D = keys.shape
    keys, values = _as_input(keys), _as_input(values)
    if values.dtype != keys.dtype:
        values = values.astype(keys.dtype)
    n_groups = keys.size // group_size
    code_shape = (*lead, D * bits // 32)
    group_shape = (*lead, D // group_size)
    outs = _kernel(backend)(
        inputs=[keys, values, mx.array([n_groups], dtype=mx.int32)],
        template=[("T", keys.dtype), ("D", D), ("BITS", bits), ("GS", group_size)],
        grid=(n_groups, 2, 1),
        threadgroup=(min(_THREADGROUP, n_groups), 1, 1),
        output_shapes=[code_shape, group_shape, group_shape] * 2,
        output_dtypes=[mx.uint32, mx.float16, mx.float16] * 2,
    )
    return tuple(outs[:3]), tuple(outs[3:])
