"""Compiles translated kernels into shared libraries, cached on disk by a hash of all inputs.

Cache: $MLXQ_EMULATOR_CACHE, else $MLXQ_HOME/emulator-cache, else ~/.cache/mlxq/emulator.
Files are written under a temporary name and renamed into place, so processes compiling the
same kernel at once never see a partial library.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from .errors import KernelCompileError

PACKAGE_DIR = Path(__file__).resolve().parent
SHIM_FILES = ("metal_shim.h", "metal_swizzles.h", "mlx_utils_shim.h", "checked_ptr.h", "mlxq_runtime.h")


def cache_dir() -> Path:
    if os.environ.get("MLXQ_EMULATOR_CACHE"):
        path = Path(os.environ["MLXQ_EMULATOR_CACHE"])
    elif os.environ.get("MLXQ_HOME"):
        path = Path(os.environ["MLXQ_HOME"]) / "emulator-cache"
    else:
        path = Path.home() / ".cache" / "mlxq" / "emulator"
    path.mkdir(parents=True, exist_ok=True)
    return path


def compiler() -> str:
    return os.environ.get("MLXQ_EMULATOR_CXX") or os.environ.get("CXX") or "g++"


def _arch_flags() -> list:
    # Native code converts half with F16C and vectorises; the CPU's identity goes into the hash.
    flags = ["-march=native"] if platform.machine() in ("x86_64", "AMD64") else []
    # Extra flags for experiments, e.g. -DMLXQ_UCONTEXT (the portable context switch).
    return flags + os.environ.get("MLXQ_EMULATOR_CXXFLAGS", "").split()


def _link_flags() -> list:
    return [] if sys.platform == "darwin" else ["-Wl,-Bsymbolic"]


COMMON_FLAGS = [
    "-std=c++17", "-O2", "-fPIC", "-fvisibility=hidden", "-pthread",
    "-ffp-contract=off",            # no FMA contraction: results comparable to numpy references
    "-fsingle-precision-constant",  # unsuffixed literals are float, as in Metal
    "-fno-strict-aliasing", "-w",
]


@functools.lru_cache(maxsize=None)
def _toolchain_fingerprint() -> str:
    try:
        version = subprocess.run([compiler(), "--version"], capture_output=True, text=True).stdout
    except OSError as e:
        raise KernelCompileError(f"the Metal emulator needs a C++ compiler ({compiler()}): {e}") from e
    cpu = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^flags\s*:(.*)$", text, re.M)
        cpu = m.group(1) if m else ""
    except OSError:
        cpu = platform.processor()
    shim = "".join((PACKAGE_DIR / f).read_text() for f in SHIM_FILES)
    return hashlib.sha256((version + cpu + shim + " ".join(COMMON_FLAGS + _arch_flags())).encode()).hexdigest()


def _digest(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def _run(cmd: list, what: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise KernelCompileError(f"{what} failed:\n{proc.stderr}")
    return proc


def _atomic_build(target: Path, build) -> Path:
    """Run build(tmp_path) and rename the result to target (unless another process won)."""
    if target.exists():
        return target
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        build(Path(tmp))
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.lru_cache(maxsize=None)
def runtime_object() -> Path:
    source = (PACKAGE_DIR / "runtime.cpp").read_text()
    target = cache_dir() / f"runtime-{_digest(source, _toolchain_fingerprint())}.o"

    def build(tmp: Path):
        _run([compiler(), *COMMON_FLAGS, *_arch_flags(), "-I", str(PACKAGE_DIR), "-c",
              str(PACKAGE_DIR / "runtime.cpp"), "-o", str(tmp)], "compiling the emulator runtime")

    return _atomic_build(target, build)


def build_library(cpp: str) -> Path:
    """A shared library for the translated kernel `cpp` (from the cache when built before).

    Raises KernelCompileError with the compiler's messages; the caller maps lines to the body.
    """
    runtime = runtime_object()
    target = cache_dir() / f"kernel-{_digest(cpp, _toolchain_fingerprint(), runtime.name)}.so"
    if target.exists():
        return target

    def build(tmp: Path):
        src = tmp.with_suffix(".cpp")
        src.write_text(cpp)
        try:
            proc = subprocess.run(
                [compiler(), *COMMON_FLAGS, *_arch_flags(), "-I", str(PACKAGE_DIR), "-shared",
                 str(src), str(runtime), "-o", str(tmp), *_link_flags(), "-lm"],
                capture_output=True, text=True)
        finally:
            src.unlink(missing_ok=True)
        if proc.returncode != 0:
            raise KernelCompileError(proc.stderr)

    return _atomic_build(target, build)
