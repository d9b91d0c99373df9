"""CPU emulator for MLX ``mx.fast.metal_kernel`` kernels (Metal Shading Language).

``metal_kernel(...)`` takes mx.fast.metal_kernel's arguments and returns a callable with the same
call signature. It runs the exact text MLX generates for the call, compiled as C++ against a
Metal shim, with one fiber per GPU thread so barriers and SIMD-group ops behave as on a GPU.
Set MLXQ_EMULATOR_CHECK=1 (or pass check=True) to bounds-check every buffer access.
See docs/emulator.md.
"""

from .errors import (EmulatorError, KernelCompileError, KernelRuntimeError,
                     UnsupportedFeatureError)
from .kernel import CHECK_ENV, EmulatedKernel, metal_kernel

__all__ = [
    "metal_kernel",
    "EmulatedKernel",
    "EmulatorError",
    "KernelCompileError",
    "KernelRuntimeError",
    "UnsupportedFeatureError",
    "CHECK_ENV",
]
