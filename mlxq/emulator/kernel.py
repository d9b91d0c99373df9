"""`metal_kernel`: mx.fast.metal_kernel's interface, run on the CPU by the emulator."""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from . import compiler, launcher
from .dtypes import from_numpy, storage_dtype, to_numpy
from .errors import KernelCompileError
from .source import InputSpec, KernelSpec, generated_source
from .translate import Translation, check_supported, translate

MAX_THREADS_PER_THREADGROUP = 1024
CHECK_ENV = "MLXQ_EMULATOR_CHECK"


def check_mode_from_env() -> bool:
    return os.environ.get(CHECK_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


@dataclass
class Variant:
    """One compiled instantiation: MLX's text for a template/dtype/shape-class combination."""

    source: str          # MLX's generated text
    translation: Translation
    library: object      # ctypes.CDLL


_variants: dict = {}
_variants_lock = threading.Lock()


def _template_key(template) -> tuple:
    # bool and int print alike but declare different template parameters: keep the type.
    return tuple((k, type(v).__name__, str(v)) for k, v in (template or ()))


def _compile_error(spec: KernelSpec, text: str, label: str, first_body_line: int, stderr: str):
    lines = text.split("\n")
    header_lines = spec.header.count("\n")
    body_lines = spec.source.count("\n") + 1
    report = []
    seen = set()
    for m in re.finditer(rf"^{re.escape(label)}:(\d+):(?:\d+:)? (?:fatal )?error: (.*)$", stderr, re.M):
        line, message = int(m.group(1)), m.group(2)
        if (line, message) in seen:
            continue
        seen.add((line, message))
        if first_body_line <= line < first_body_line + body_lines:
            where = f"body line {line - first_body_line + 1}"
        elif line <= header_lines:
            where = f"header line {line}"
        else:
            where = f"generated line {line}"
        code = lines[line - 1].strip() if 0 < line <= len(lines) else ""
        report.append(f"  {where}: {code}\n      error: {message}")
    summary = "\n".join(report[:12]) if report else "  (no error located in the kernel text)"
    return KernelCompileError(
        f"kernel '{spec.name}' does not compile:\n{summary}\n--- compiler output ---\n{stderr.strip()}")


def _build_variant(spec: KernelSpec, template, inputs, output_dtypes, checked: bool) -> Variant:
    text = generated_source(spec, template, inputs, output_dtypes)
    label = f"{spec.name}.metal"
    tr = translate(text, spec.input_names, spec.output_names, spec.source, spec.header, checked, label)
    try:
        path = compiler.build_library(tr.cpp)
    except KernelCompileError as e:
        raise _compile_error(spec, text, label, tr.first_body_line, str(e)) from None
    return Variant(text, tr, launcher.load_library(path))


def _variant(spec: KernelSpec, template, inputs, output_dtypes, checked: bool) -> Variant:
    key = (spec, _template_key(template), tuple(inputs), tuple(output_dtypes), checked)
    with _variants_lock:
        v = _variants.get(key)
        if v is None:
            v = _variants[key] = _build_variant(spec, template, inputs, output_dtypes, checked)
    return v


def _extent_bytes(a: np.ndarray) -> int:
    """Bytes from the first element to past the last one reachable with the array's strides."""
    if a.size == 0:
        return 0
    span = sum((n - 1) * s for n, s in zip(a.shape, a.strides) if s > 0)
    return span + a.itemsize


class EmulatedKernel:
    """The emulator's counterpart of the callable mx.fast.metal_kernel returns."""

    def __init__(self, name, input_names, output_names, source, header="", ensure_row_contiguous=True,
                 atomic_outputs=False, compile_options=None, check=None):
        if not output_names:
            raise ValueError("[metal_kernel] Must specify at least one output.")
        check_supported(name, source, header, atomic_outputs)
        self.spec = KernelSpec(name, tuple(input_names), tuple(output_names), source, header,
                               bool(ensure_row_contiguous), bool(atomic_outputs))
        self.compile_options = compile_options
        self.check = check  # None: follow MLXQ_EMULATOR_CHECK at call time

    def _checked(self) -> bool:
        return check_mode_from_env() if self.check is None else bool(self.check)

    def variant(self, inputs, output_dtypes, template=None) -> Variant:
        """The compiled variant (and MLX's text, `.source`) used for these arguments."""
        arrays = [x if isinstance(x, mx.array) else mx.array(x) for x in inputs]
        specs = [InputSpec.of(x) for x in arrays]
        return _variant(self.spec, template, specs, list(output_dtypes), self._checked())

    def __call__(self, *, inputs, output_shapes, output_dtypes, grid, threadgroup, template=None,
                 init_value=None, verbose=False, stream=None):
        spec = self.spec
        for got, want, what in ((len(inputs), len(spec.input_names), "inputs"),
                                (len(output_shapes), len(spec.output_names), "output_shapes"),
                                (len(output_dtypes), len(spec.output_names), "output_dtypes")):
            if got != want:
                raise ValueError(f"[metal_kernel] Expected `{what}` to have size {want} but got size {got}.")
        grid = tuple(int(g) for g in grid)
        threadgroup = tuple(int(t) for t in threadgroup)
        if len(grid) != 3 or len(threadgroup) != 3:
            raise ValueError("[metal_kernel] grid and threadgroup must have 3 components")
        tg_threads = min(threadgroup[0], grid[0]) * min(threadgroup[1], grid[1]) * min(threadgroup[2], grid[2])
        if tg_threads > MAX_THREADS_PER_THREADGROUP:
            raise ValueError(
                f"Thread group size ({tg_threads}) is greater than  the maximum allowed threads per "
                f"threadgroup ({MAX_THREADS_PER_THREADGROUP}).")

        arrays = [x if isinstance(x, mx.array) else mx.array(x) for x in inputs]
        variant = self.variant(arrays, output_dtypes, template)
        if verbose:
            print(f"Generated source code for `{spec.name}`:\n```\n{variant.source}\n```", flush=True)

        mx.eval(arrays)
        inputs_np = {}
        for name, x in zip(spec.input_names, arrays):
            a = to_numpy(x)
            if spec.ensure_row_contiguous or a.ndim == 0:
                a = np.ascontiguousarray(a)
            inputs_np[name] = a
        outputs_np = {}
        for name, shape, dtype in zip(spec.output_names, output_shapes, output_dtypes):
            if init_value is None:
                out = np.empty(tuple(shape), storage_dtype(dtype))
                out.view(np.uint8).fill(0xFF)  # uninitialised, as on a GPU: unwritten elements show
            else:
                out = np.array(to_numpy(mx.full(tuple(shape), init_value, dtype)))
            outputs_np[name] = out

        keep = []  # shape/stride arrays must outlive the launch
        pointers, extents = [], []
        for p in sorted((p for p in variant.translation.params if p.buffer is not None), key=lambda p: p.buffer):
            arr = self._buffer_for(p.name, inputs_np, outputs_np)
            keep.append(arr)
            pointers.append(arr.ctypes.data)
            extents.append(_extent_bytes(arr))
        launcher.launch(variant.library, pointers, extents, grid, threadgroup,
                        variant.translation.uses_sync, spec.name, variant.translation.first_body_line)
        return [from_numpy(outputs_np[n], d) for n, d in zip(spec.output_names, output_dtypes)]

    def _buffer_for(self, name: str, inputs_np: dict, outputs_np: dict) -> np.ndarray:
        if name in outputs_np:
            return outputs_np[name]
        if name in inputs_np:
            return inputs_np[name]
        for suffix in ("_shape", "_strides", "_ndim"):
            base = name[: -len(suffix)]
            if name.endswith(suffix) and base in inputs_np:
                a = inputs_np[base]
                if suffix == "_shape":
                    return np.array(a.shape, np.int32)
                if suffix == "_strides":
                    return np.array([s // a.itemsize for s in a.strides], np.int64)
                return np.array([a.ndim], np.int32)
        raise KernelCompileError(f"kernel '{self.spec.name}': no buffer for parameter '{name}'")


def metal_kernel(name, input_names, output_names, source, header="", ensure_row_contiguous=True,
                 atomic_outputs=False, compile_options=None, check=None) -> EmulatedKernel:
    """Same arguments as mx.fast.metal_kernel (plus `check`: bounds-check buffer accesses;
    default from MLXQ_EMULATOR_CHECK). The result is called like MLX's kernel."""
    return EmulatedKernel(name, input_names, output_names, source, header, ensure_row_contiguous,
                          atomic_outputs, compile_options, check)
