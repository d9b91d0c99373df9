"""Calls a compiled kernel library through ctypes: buffers in, launch, error text out."""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

from .errors import KernelRuntimeError


class LaunchDesc(ctypes.Structure):
    # Mirrors mlxq_launch_desc in mlxq_runtime.h.
    _fields_ = [
        ("bufs", ctypes.POINTER(ctypes.c_void_p)),
        ("grid", ctypes.c_uint32 * 3),
        ("threadgroup", ctypes.c_uint32 * 3),
        ("use_fibers", ctypes.c_int32),
        ("n_workers", ctypes.c_int32),
        ("stack_bytes", ctypes.c_uint64),
        ("kernel_name", ctypes.c_char_p),
        ("first_body_line", ctypes.c_int32),
    ]


@functools.lru_cache(maxsize=None)
def load_library(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.mlxq_launch.argtypes = [ctypes.POINTER(LaunchDesc), ctypes.POINTER(ctypes.c_uint64)]
    lib.mlxq_launch.restype = ctypes.c_int
    lib.mlxq_last_error.argtypes = []
    lib.mlxq_last_error.restype = ctypes.c_char_p
    return lib


def worker_count() -> int:
    env = os.environ.get("MLXQ_EMULATOR_THREADS")
    if env:
        return max(1, int(env))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return os.cpu_count() or 1


def stack_bytes() -> int:
    return int(os.environ.get("MLXQ_EMULATOR_STACK_KB", "128")) * 1024


def launch(lib: ctypes.CDLL, pointers: list, extents: list, grid, threadgroup, use_fibers: bool,
           kernel_name: str, first_body_line: int) -> None:
    """Run the kernel over `grid` threads; raises KernelRuntimeError with the runtime's message."""
    n = len(pointers)
    bufs = (ctypes.c_void_p * max(n, 1))(*pointers)
    sizes = (ctypes.c_uint64 * max(n, 1))(*extents)
    desc = LaunchDesc(
        bufs=ctypes.cast(bufs, ctypes.POINTER(ctypes.c_void_p)),
        grid=(ctypes.c_uint32 * 3)(*grid),
        threadgroup=(ctypes.c_uint32 * 3)(*threadgroup),
        use_fibers=1 if use_fibers else 0,
        n_workers=worker_count(),
        stack_bytes=stack_bytes(),
        kernel_name=kernel_name.encode(),
        first_body_line=first_body_line,
    )
    if lib.mlxq_launch(ctypes.byref(desc), sizes) != 0:
        raise KernelRuntimeError(lib.mlxq_last_error().decode(errors="replace"))
