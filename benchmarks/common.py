"""Shared pieces of the benchmark scripts: timing, machine description, peak bandwidth,
output files (table, JSON, PNG) and the command-line options both scripts take.

A measured figure is a dict with ``status: "ok"`` and numbers; a path the machine cannot
run is a dict with ``status: "n/a"`` and a ``reason`` -- never another path's numbers.
"""

import argparse
import contextlib
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

# Apple unified-memory bandwidth, GB/s (docs/benchmarks.md cites the sources). Chips whose
# bandwidth depends on the GPU bin map GPU core count -> GB/s.
PEAK_GBPS = {
    "M1": 68, "M1 Pro": 200, "M1 Max": 400, "M1 Ultra": 800,
    "M2": 100, "M2 Pro": 200, "M2 Max": 400, "M2 Ultra": 800,
    "M3": 100, "M3 Pro": 150, "M3 Max": {30: 300, 40: 400}, "M3 Ultra": 819,
    "M4": 120, "M4 Pro": 273, "M4 Max": {32: 410, 40: 546},
}

NA_NEEDS_METAL = "n/a: needs Metal"
MAX_CONTEXT = 1 << 20  # contexts beyond this would only exhaust memory


# --- timing -------------------------------------------------------------------------------
def time_call(fn, *, warmup: int, reps: int, inner: int = 1) -> list[float]:
    """Seconds per call of ``fn`` (which returns MLX arrays), one sample per repetition.

    Each sample evaluates ``inner`` independent calls together and divides by ``inner``:
    on the GPU this hides the host round trip of one ``mx.eval`` per call, which a real
    decode step (many layers per eval) does not pay per attention call either.
    """
    for _ in range(warmup):
        mx.eval(fn())
    mx.synchronize()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        mx.eval([fn() for _ in range(inner)])
        samples.append((time.perf_counter() - start) / inner)
    return samples


def summarize(samples, unit: float = 1e3) -> dict:
    """Median and spread of ``samples`` (seconds), scaled by ``unit`` (1e3: ms)."""
    if not samples:
        raise ValueError("no samples")
    x = np.asarray(samples, dtype=np.float64) * unit
    p10, median, p90 = np.percentile(x, [10, 50, 90])
    return {"median": float(median), "p10": float(p10), "p90": float(p90),
            "min": float(x.min()), "n": int(x.size)}


def not_available(reason: str) -> dict:
    return {"status": "n/a", "reason": reason}


def failed(exc: BaseException) -> dict:
    """A path that should have run but raised: recorded, and the script exits non-zero."""
    message = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    return {"status": "error", "reason": f"error: {message}"}


def exit_code(*result_lists) -> int:
    return 1 if any(r["status"] == "error" for rows in result_lists for r in rows) else 0


# --- the machine ----------------------------------------------------------------------------
def _run(cmd) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def chip_name() -> str:
    """E.g. "Apple M2 Max" on a Mac; the CPU model elsewhere."""
    if sys.platform == "darwin":
        name = _run(["sysctl", "-n", "machdep.cpu.brand_string"])
        if name:
            return name
    try:
        name = mx.device_info().get("device_name", "")
    except Exception:
        name = ""
    if name:
        return str(name)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def gpu_cores() -> int | None:
    """Apple GPU core count (it decides the bandwidth of binned chips), if macOS says."""
    if sys.platform != "darwin":
        return None
    out = _run(["system_profiler", "SPDisplaysDataType", "-json"])
    try:
        for gpu in json.loads(out).get("SPDisplaysDataType", []):
            if "sppci_cores" in gpu:
                return int(gpu["sppci_cores"])
    except (ValueError, TypeError):
        pass
    return None


def peak_bandwidth(chip: str, cores: int | None = None):
    """(GB/s, how it was found) for an Apple chip name, or (None, why not)."""
    m = re.search(r"\b(M\d)(?:\s+(Pro|Max|Ultra))?\b", chip or "")
    if not m or "Apple" not in chip:
        return None, "unknown chip"
    key = m.group(1) + (f" {m.group(2)}" if m.group(2) else "")
    value = PEAK_GBPS.get(key)
    if value is None:
        return None, f"{key} not in the bandwidth table"
    if isinstance(value, dict):
        if cores in value:
            return float(value[cores]), f"table: {key}, {cores}-core GPU"
        # Unknown bin: the larger figure, so fractions of peak err low, never high.
        return float(max(value.values())), f"table: {key}, GPU bin unknown, upper figure"
    return float(value), f"table: {key}"


def machine_info() -> dict:
    import mlx_lm

    import mlxq
    from mlxq.backend import compute_dtype, kernel_backend, metal_available
    from mlxq.errors import MlxqError

    try:
        backend = kernel_backend()
    except MlxqError as e:
        backend = f"error: {e}"
    try:
        memory = mx.device_info().get("memory_size")
    except Exception:
        memory = None
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "chip": chip_name(),
        "gpu_cores": gpu_cores(),
        "memory_bytes": memory,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm.__version__,
        "mlxq": mlxq.__version__,
        "metal": metal_available(),
        "device": str(mx.default_device()),
        "mlxq_backend": backend,
        "compute_dtype": dtype_name(compute_dtype()),
    }


def dtype_name(dtype) -> str:
    return str(dtype).rsplit(".", 1)[-1]


def mlxq_label(what: str, backend: str) -> str:
    """Names mlxq's int4 path by the backend that ran it: a plain-MLX or emulated run is
    never shown under the Metal kernel's name."""
    return f"{what} ({backend})"


def mlxq_backends(args) -> list[str]:
    """mlxq backends to measure: the Metal kernel always (n/a without Metal), others only
    when asked, since their times say nothing about the kernel's speed."""
    backends = ["metal"]
    if args.include_reference:
        backends.append("reference")
    if args.include_emulated:
        backends.append("emulate")
    return backends


def backend_unavailable(backend: str) -> str | None:
    """Why mlxq cannot run ``backend`` here, or None."""
    from mlxq.backend import metal_available

    if backend == "metal" and not metal_available():
        return NA_NEEDS_METAL
    if backend == "emulate":
        try:
            import mlxq.emulator as emulator

            if not hasattr(emulator, "metal_kernel"):
                return "n/a: the Metal emulator is not available in this build"
        except ImportError:
            return "n/a: the Metal emulator is not available in this build"
    return None


@contextlib.contextmanager
def kernel_backend_env(backend: str | None):
    """mlxq's cache picks its kernels from MLXQ_KERNELS at each call: pin it for a run."""
    from mlxq.backend import ENV_VAR

    old = os.environ.get(ENV_VAR)
    if backend is not None:
        os.environ[ENV_VAR] = backend
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = old


# --- command line ---------------------------------------------------------------------------
def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    if max(values) > MAX_CONTEXT:
        raise argparse.ArgumentTypeError(f"at most {MAX_CONTEXT} tokens, got {max(values)}")
    return values


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def parser(doc: str):
    """The benchmarks' argparse: usage errors are one line (mlxq.errors.ArgumentParser)."""
    from mlxq.errors import ArgumentParser

    return ArgumentParser(description=doc.split("\n\n")[0],
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def check_environment() -> None:
    """A bad MLXQ_KERNELS is reported at once, as by every mlxq command."""
    from mlxq.backend import kernel_backend

    kernel_backend()


def str_list(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return values


def add_output_args(parser: argparse.ArgumentParser, quick_help: str) -> None:
    """--out, --force and --quick: what every benchmark script takes."""
    parser.add_argument("--out", type=Path, default=Path("out/benchmarks"),
                        help="folder for the JSON and PNG files (default: %(default)s)")
    parser.add_argument("--force", action="store_true",
                        help="overwrite this benchmark's JSON and PNG in --out if they exist")
    parser.add_argument("--quick", action="store_true", help=quick_help)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    add_output_args(parser, "smoke test: small contexts, few repetitions, small shapes")
    parser.add_argument("--peak-gbps", type=positive_float, default=None,
                        help="peak memory bandwidth of this machine in GB/s "
                             "(default: from the table of Apple chips; unknown: blank)")
    parser.add_argument("--include-reference", action="store_true",
                        help="also time mlxq's plain-MLX reference path (labelled as such)")
    parser.add_argument("--include-emulated", action="store_true",
                        help="also run mlxq's kernel in the CPU Metal emulator (correct, "
                             "but its times mean nothing for speed)")


def resolve_peak(args, machine: dict) -> dict:
    if args.peak_gbps is not None:
        return {"gbps": args.peak_gbps, "source": "--peak-gbps"}
    if not machine["metal"]:
        # The table holds GPU bandwidths; a CPU run is not measured against them.
        return {"gbps": None, "source": "no Metal: not an Apple GPU run"}
    gbps, source = peak_bandwidth(machine["chip"], machine["gpu_cores"])
    return {"gbps": gbps, "source": source}


# --- output ---------------------------------------------------------------------------------
def _finite_or_none(obj):
    # JSON has no NaN/inf; a figure that could not be computed is null.
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def output_paths(args, name: str) -> tuple[Path, Path]:
    """The JSON and PNG this benchmark writes, checked before it runs (exists without
    --force, not writable: one clear error now rather than after minutes of timing)."""
    from mlxq.output_files import check_output_file

    return tuple(check_output_file(args.out / f"{name}.{ext}", args.force)
                 for ext in ("json", "png"))


def json_text(data: dict) -> str:
    return json.dumps(_finite_or_none(data), indent=2, allow_nan=False) + "\n"


def write_json(path: Path, data: dict) -> None:
    from mlxq.output_files import write_text_file

    write_text_file(path, json_text(data))


def write_outputs(json_path: Path, png_path: Path, data: dict, draw) -> None:
    """The JSON (``data``) and the PNG (``draw(path)``), both or neither: written to
    temporary files and renamed into place together (an error, Ctrl-C or SIGTERM leaves
    no file behind)."""
    from mlxq.output_files import replacing

    with replacing(json_path, png_path) as (json_tmp, png_tmp):
        json_tmp.write_text(json_text(data), encoding="utf-8")
        draw(png_tmp)


def fmt(value, spec: str = ".3f") -> str:
    return "" if value is None else format(value, spec)


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def plot_panels(path: Path, panels: dict, *, xlabel: str, ylabel: str, title: str) -> None:
    """One subplot per panel; ``panels[name][label] = (xs, ys)``, log-x, a line per label.
    Points that were not measured (None) are left out of their line."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed (CI, ssh)
    import matplotlib.pyplot as plt

    n = max(1, len(panels))
    cols = min(n, 2)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 4.2 * rows), squeeze=False)
    for ax, (name, lines) in zip(axes.flat, panels.items()):
        missing, ticks = [], set()
        for label, (xs, ys) in lines.items():
            pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
                ticks.update(x for x, _ in pts)
            else:
                missing.append(label)
        ax.set_xscale("log", base=2)
        if ticks:
            ax.set_xticks(sorted(ticks), [str(t) for t in sorted(ticks)])
            ax.minorticks_off()
        ax.set_title(name)
        # Say what is absent rather than let it look forgotten.
        ax.set_xlabel(xlabel + ("\nnot measured here: " + ", ".join(missing) if missing else ""))
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110, format="png")
    finally:
        plt.close(fig)


def machine_title(machine: dict) -> str:
    where = "Apple GPU (Metal)" if machine["metal"] else "CPU, no Metal"
    return f"{machine['chip']}, {where}, MLX {machine['mlx']}"
