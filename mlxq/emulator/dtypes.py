"""MLX dtypes as Metal type names (as MLX's get_type_string writes them) and numpy storage."""

import mlx.core as mx
import numpy as np

# dtype -> (type name in MLX's generated source, numpy dtype with the same bytes)
_TABLE = {
    mx.bool_: ("bool", np.bool_),
    mx.uint8: ("uint8_t", np.uint8),
    mx.uint16: ("uint16_t", np.uint16),
    mx.uint32: ("uint32_t", np.uint32),
    mx.uint64: ("uint64_t", np.uint64),
    mx.int8: ("int8_t", np.int8),
    mx.int16: ("int16_t", np.int16),
    mx.int32: ("int32_t", np.int32),
    mx.int64: ("int64_t", np.int64),
    mx.float16: ("float16_t", np.float16),
    mx.bfloat16: ("bfloat16_t", np.uint16),  # numpy has no bfloat16: move the raw bits
    mx.float32: ("float", np.float32),
    mx.float64: ("double", np.float64),
    mx.complex64: ("complex64_t", np.complex64),
}


def type_name(dtype: mx.Dtype) -> str:
    return _TABLE[dtype][0]


def storage_dtype(dtype: mx.Dtype):
    return _TABLE[dtype][1]


def to_numpy(x: mx.array) -> np.ndarray:
    """The array's elements as numpy (bfloat16 as its uint16 bits)."""
    if x.dtype == mx.bfloat16:
        x = x.view(mx.uint16)
    return np.array(x, copy=False)


def from_numpy(a: np.ndarray, dtype: mx.Dtype) -> mx.array:
    out = mx.array(a)
    return out.view(mx.bfloat16) if dtype == mx.bfloat16 else out
