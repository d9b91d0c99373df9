"""The kernel text MLX generates for a metal_kernel call: traced from MLX itself, or replicated.

MLX builds the Metal source at call time from the body, the input dtypes and shape classes, the
template arguments and the attribute names the body mentions. `traced_source` asks MLX for it
(tracing under mx.export_function with verbose=True prints it, even without Metal);
`replica_source` rebuilds it with the rules of mlx/backend/common/metal_kernel.cpp (0.32) and is
the fallback when tracing is unavailable.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
from dataclasses import dataclass

import mlx.core as mx

from .dtypes import type_name

MAX_CONSTANT_ARRAY_SIZE = 8  # inputs with fewer elements go in the `constant` address space

# The attribute parameters MLX adds when their name appears in the body, in MLX's order.
METAL_ATTRIBUTES = (
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
)


@dataclass(frozen=True)
class InputSpec:
    """What of an input the generated source depends on."""

    dtype: mx.Dtype
    ndim: int
    small: bool  # fewer than MAX_CONSTANT_ARRAY_SIZE elements

    @staticmethod
    def of(x: mx.array) -> "InputSpec":
        return InputSpec(x.dtype, x.ndim, x.size < MAX_CONSTANT_ARRAY_SIZE)

    def example(self) -> mx.array:
        """A small array with the same dtype, ndim and address-space class."""
        if self.ndim == 0:
            return mx.zeros((), self.dtype)
        first = 1 if self.small else MAX_CONSTANT_ARRAY_SIZE
        return mx.zeros((first,) + (1,) * (self.ndim - 1), self.dtype)


@dataclass(frozen=True)
class KernelSpec:
    """Constructor arguments of a metal_kernel."""

    name: str
    input_names: tuple
    output_names: tuple
    source: str
    header: str = ""
    ensure_row_contiguous: bool = True
    atomic_outputs: bool = False


def template_value(value) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"  # std::ostream prints bools as 1/0
    if isinstance(value, int):
        return str(value)
    if isinstance(value, mx.Dtype):
        return type_name(value)
    raise TypeError(f"template argument {value!r} is not a Dtype, int or bool")


def template_param_kind(value) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    return "typename"


def host_name(spec: KernelSpec, template, inputs, output_dtypes) -> str:
    """MLX's name for the instantiated kernel (it encodes everything the source depends on)."""
    name = "custom_kernel_" + spec.name
    if template:
        defn = "<" + ", ".join(template_value(v) for _, v in template) + ">"
        name += "_" + defn.replace(", ", "_").replace("<", "_").replace(">", "_")[:-1]
    for s in inputs:
        name += "_" + type_name(s.dtype) + ("s" if s.ndim == 0 else "c" if s.small else "")
    for d in output_dtypes:
        name += "_" + type_name(d)
    return name


def attributes_used(source: str) -> list:
    return [(a, t) for a, t in METAL_ATTRIBUTES if a in source]


def replica_source(spec: KernelSpec, template, inputs, output_dtypes) -> str:
    """The source MLX generates, rebuilt with its rules (mlx/backend/common/metal_kernel.cpp)."""
    name = host_name(spec, template, inputs, output_dtypes)
    attrs = attributes_used(spec.source)
    out = [spec.header]
    if template:
        out.append("template <" + ", ".join(f"{template_param_kind(v)} {k}" for k, v in template) + ">\n")
    out.append(f"[[kernel]] void {name}(\n")
    params = []
    index = 0
    for input_name, s in zip(spec.input_names, inputs):
        space = "constant" if s.small else "device"
        ref = "&" if s.ndim == 0 else "*"
        params.append(f"  const {space} {type_name(s.dtype)}{ref} {input_name} [[buffer({index})]]")
        index += 1
        if s.ndim > 0:
            for suffix, decl in (("_shape", "const constant int*"), ("_strides", "const constant int64_t*"),
                                 ("_ndim", "const constant int&")):
                if input_name + suffix in spec.source:
                    params.append(f"  {decl} {input_name}{suffix} [[buffer({index})]]")
                    index += 1
    for output_name, d in zip(spec.output_names, output_dtypes):
        t = type_name(d)
        if spec.atomic_outputs:
            t = f"atomic<{t}>"
        params.append(f"  device {t}* {output_name} [[buffer({index})]]")
        index += 1
    params.extend(f"  {t} {a} [[{a}]]" for a, t in attrs)
    out.append(",\n".join(params) + ") {\n")
    out.append(spec.source)
    out.append("\n}\n")
    if template:
        inst = name + "<" + ", ".join(template_value(v) for _, v in template) + ">"
        out.append(f'\ntemplate [[host_name("{name}")]] [[kernel]] decltype({inst}) {inst};\n')
    return "".join(out)


_capture_lock = threading.Lock()


@contextlib.contextmanager
def _captured_fd1(sink):
    """Send file descriptor 1 (where MLX's C++ std::cout writes) to `sink` for the block."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(sink.fileno(), 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _parse_verbose_output(text: str, kernel_name: str) -> str:
    marker = f"Generated source code for `{kernel_name}`:\n```\n"
    start = text.find(marker)
    if start < 0:
        raise ValueError("MLX printed no generated source")
    start += len(marker)
    end = text.rfind("\n```")
    if end < start:
        raise ValueError("unterminated generated source")
    return text[start:end]  # MLX prints the source followed by one std::endl


def traced_source(spec: KernelSpec, template, inputs, output_dtypes) -> str:
    """The source MLX itself generates, captured from a traced verbose call (no Metal needed)."""
    kernel = mx.fast.metal_kernel(
        name=spec.name,
        input_names=list(spec.input_names),
        output_names=list(spec.output_names),
        source=spec.source,
        header=spec.header,
        ensure_row_contiguous=spec.ensure_row_contiguous,
        atomic_outputs=spec.atomic_outputs,
    )

    def call(*xs):
        return kernel(
            inputs=list(xs),
            template=list(template) if template else None,
            grid=(1, 1, 1),
            threadgroup=(1, 1, 1),
            output_shapes=[(1,)] * len(output_dtypes),
            output_dtypes=list(output_dtypes),
            verbose=True,
        )

    examples = [s.example() for s in inputs]
    with _capture_lock, tempfile.TemporaryDirectory() as tmp, \
            open(os.path.join(tmp, "stdout"), "w+b") as sink:
        with _captured_fd1(sink):
            mx.export_function(os.path.join(tmp, "trace.mlxfn"), call, *examples)
        sink.seek(0)
        printed = sink.read().decode("utf-8", errors="replace")
    return _parse_verbose_output(printed, spec.name)


def generated_source(spec: KernelSpec, template, inputs, output_dtypes) -> str:
    """MLX's text for this call: traced where MLX can trace it, else the replica."""
    if os.environ.get("MLXQ_EMULATOR_SOURCE", "").lower() != "replica":
        try:
            return traced_source(spec, template, inputs, output_dtypes)
        except Exception:  # noqa: BLE001 - an MLX without tracing support: fall back below
            pass
    return replica_source(spec, template, inputs, output_dtypes)
