"""Where computation runs: compute dtype and the kernel backend (MLXQ_KERNELS).

Backends:
- ``metal``: mlxq's Metal kernels through ``mx.fast.metal_kernel`` (Apple GPU).
- ``emulate``: the same kernel sources run by ``mlxq.emulator`` on the CPU (tests, Linux).
- ``reference``: plain MLX ops, no custom kernels (the oracle and the CPU fallback).
"""

import contextlib
import os

import mlx.core as mx

from .errors import MlxqError

BACKENDS = ("metal", "emulate", "reference")
ENV_VAR = "MLXQ_KERNELS"

# Set only by `tracing_metal()`: the metal backend without Metal, for graph tracing.
_tracing_metal = False


def metal_available() -> bool:
    try:
        return bool(mx.metal.is_available())
    except Exception:
        return False


@contextlib.contextmanager
def tracing_metal():
    """While active, ``kernel_backend()`` is ``metal`` even without Metal, so mlxq builds
    its Metal kernels (``mx.fast.metal_kernel``) on any machine. Only for tracing inside
    ``mx.export_function``, where a kernel call records a CustomKernel primitive without
    running; called outside a trace, MLX's CPU build raises "No Metal back-end".
    Used by benchmarks/decode_step.py to build a decode step's Metal graph on Linux."""
    global _tracing_metal
    old = _tracing_metal
    _tracing_metal = True
    try:
        yield
    finally:
        _tracing_metal = old


def kernel_backend() -> str:
    """The backend chosen by MLXQ_KERNELS (default: metal where available, else reference)."""
    if _tracing_metal:
        return "metal"
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if not value:
        return "metal" if metal_available() else "reference"
    if value not in BACKENDS:
        raise MlxqError(
            f"{ENV_VAR}={value!r} is not a backend; choose one of {', '.join(BACKENDS)}"
        )
    if value == "metal" and not metal_available():
        raise MlxqError(
            f"{ENV_VAR}=metal but Metal is not available on this machine; "
            "use MLXQ_KERNELS=emulate (CPU emulator) or reference"
        )
    return value


def metal_kernel(backend: str | None = None, **kwargs):
    """Build a kernel with ``mx.fast.metal_kernel``'s arguments on the given backend.

    Returns the real MLX kernel for ``metal`` and the emulated one for ``emulate``.
    The ``reference`` backend runs no custom kernels, so asking for one is a bug.
    """
    backend = backend or kernel_backend()
    if backend == "metal":
        return mx.fast.metal_kernel(**kwargs)
    if backend == "emulate":
        from . import emulator

        return emulator.metal_kernel(**kwargs)
    raise ValueError(f"no custom kernels on the {backend!r} backend")


def compute_dtype() -> mx.Dtype:
    """float16 on the GPU; float32 on the CPU backend (MLX's float16 is very slow on x86)."""
    return mx.float16 if metal_available() else mx.float32
