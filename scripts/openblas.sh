#!/usr/bin/env bash
# Runs a command with OpenBLAS instead of the reference (netlib) BLAS that the mlx[cpu] wheel
# bundles on Linux. MLX's CPU matmuls call cblas_sgemm; the reference one runs at ~1 GFLOP/s,
# OpenBLAS at 10-40x that, so a long `python -m mlxq.evaluate` takes hours less. Same math,
# different summation order: results agree to float32 noise.
#   scripts/openblas.sh .venv/bin/python -m mlxq.evaluate --context 4096 ...
# Installs the optional `openblas` extra (cmeel-openblas, from PyPI) into .venv when missing.
# OPENBLAS_NUM_THREADS limits its threads (default: one per core).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$root/.venv/bin/python}
if [ $# -eq 0 ]; then
    echo "usage: scripts/openblas.sh COMMAND [ARGS...]" >&2
    exit 2
fi
find_libs() {
    "$py" - <<'PY'
import glob, os, site, sys
dirs = site.getsitepackages()
def one(pattern):
    hits = sorted(h for d in dirs for h in glob.glob(os.path.join(d, pattern)))
    return hits[0] if hits else ""
blas = one("cmeel.prefix/lib/libopenblas.so.0")
# cmeel's OpenBLAS links libgfortran.so.5; mlx[cpu] ships one (under a hashed name, with
# its libquadmath), so point the loader at those instead of needing a system package.
gfortran = one("mlx_cpu.libs/libgfortran-*.so.5*")
quadmath = one("mlx_cpu.libs/libquadmath-*.so*")
if not (blas and gfortran):
    sys.exit(1)
libs = os.path.join(os.environ.get("MLXQ_HOME", os.path.expanduser("~/.cache/mlxq")), "openblas-libs")
os.makedirs(libs, exist_ok=True)
for name, target in (("libgfortran.so.5", gfortran), (os.path.basename(quadmath), quadmath)):
    if target:
        link = os.path.join(libs, name)
        if os.path.islink(link) and os.readlink(link) != target:
            os.remove(link)
        if not os.path.lexists(link):
            os.symlink(target, link)
print(blas)
print(libs)
PY
}
if ! out=$(find_libs); then
    "$py" -m pip install -q -e "$root[openblas]" >&2
    out=$(find_libs) || { echo "scripts/openblas.sh: error: no OpenBLAS (cmeel-openblas) or no libgfortran from mlx[cpu] found" >&2; exit 1; }
fi
blas=$(sed -n 1p <<<"$out")
libs=$(sed -n 2p <<<"$out")
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LD_PRELOAD="$blas${LD_PRELOAD:+ $LD_PRELOAD}"
exec "$@"
