"""MLX's generated Metal text -> one C++17 translation unit for metal_shim.h.

Rewrites keep every line where it was (no newlines added or removed), so compiler messages and
barrier call sites (via `#line`) point at lines of MLX's text, which map back to body lines.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import UnsupportedFeatureError

# What the emulator cannot run, found in the kernel text (comments stripped).
_UNSUPPORTED = (
    (re.compile(r"\batomic(_\w+)?\b"), "atomics"),
    (re.compile(r"\bsimdgroup_(matrix|float8x8|half8x8|bfloat8x8|load|store|multiply_accumulate|multiply)\b"),
     "simdgroup_matrix"),
    (re.compile(r"\b(texture[123]d\w*|texturecube\w*|depth2d\w*|sampler)\b"), "textures and samplers"),
    (re.compile(r"\bimageblock\b"), "imageblocks"),
)

# Calls that synchronise threads: a kernel with none of them runs without fibers.
_SYNC_CALL = re.compile(r"\b(threadgroup_barrier|simdgroup_barrier|simd_\w+|quad_\w+)\s*\(")

_ATTRIBUTE = re.compile(r"\[\[\s*[A-Za-z_][\w:]*\s*(\([^()\n]*\))?\s*\]\]")
_METAL_INCLUDE = re.compile(r"^[ \t]*#[ \t]*include[ \t]*<metal_\w+>.*$", re.M)

_TYPE = r"[A-Za-z_][\w:]*(?:\s*<[^;{}()\n]*?>)?"
# `threadgroup T name[N][M];` (storage, not a pointer or reference)
_THREADGROUP_DECL = re.compile(
    r"\bthreadgroup\s+(" + _TYPE + r")\s+([A-Za-z_]\w*)\s*((?:\[[^\];\n]*\]\s*)*);")
# `const device T*` / `device const T*` / `device T*` (checking mode)
_DEVICE_POINTER = re.compile(r"(\bconst\s+)?\bdevice\s+(const\s+)?(" + _TYPE + r")\s*\*")
_REINTERPRET_CHECKED = re.compile(r"\breinterpret_cast\s*<\s*(mlxq::checked_ptr<[^;\n]*?>)\s*>")

_SIGNATURE = re.compile(r"\[\[kernel\]\]\s+void\s+(\w+)\s*\(\n(.*?)\)\s*\{\n", re.S)
_PARAM = re.compile(r"^\s*(.*?)\s+(\w+)\s+\[\[\s*(?:buffer\((\d+)\)|(\w+))\s*\]\]\s*$")
_INSTANTIATION = re.compile(r"decltype\((\w+<.*?>)\)\s*\w+<")


@dataclass
class Param:
    decl: str  # type as written, e.g. "const device float16_t*"
    name: str
    buffer: int | None = None
    attribute: str | None = None


@dataclass
class Translation:
    cpp: str
    kernel_name: str
    params: list = field(default_factory=list)
    first_body_line: int = 0  # 1-based line of the body's first line in MLX's text
    body_line_count: int = 0
    uses_sync: bool = False


def strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def check_supported(name: str, source: str, header: str, atomic_outputs: bool) -> None:
    """Raise UnsupportedFeatureError if the kernel needs what the emulator lacks."""
    code = strip_comments(header + "\n" + source)
    found = [what for pattern, what in _UNSUPPORTED if pattern.search(code)]
    if atomic_outputs:
        found.insert(0, "atomic outputs (atomic_outputs=True)")
    if found:
        raise UnsupportedFeatureError(
            f"kernel '{name}': the Metal emulator does not support {', '.join(dict.fromkeys(found))}; "
            "run it on Metal or use the reference backend")


def uses_sync(source: str, header: str) -> bool:
    return bool(_SYNC_CALL.search(strip_comments(header + "\n" + source)))


def parse_signature(text: str):
    m = _SIGNATURE.search(text)
    if not m:
        raise ValueError("no [[kernel]] function in the generated source")
    params = []
    for line in m.group(2).split("\n"):
        line = line.rstrip(",")
        if not line.strip():
            continue
        p = _PARAM.match(line)
        if not p:
            raise ValueError(f"cannot parse kernel parameter {line!r}")
        decl, pname, buf, attr = p.groups()
        params.append(Param(decl, pname, int(buf) if buf is not None else None, attr))
    first_body_line = text.count("\n", 0, m.end()) + 1
    return m.group(1), params, m, first_body_line


def _rewrite_threadgroup_decls(text: str) -> str:
    counter = iter(range(1 << 30))

    def repl(m):
        typ, name, dims = m.group(1), m.group(2), re.sub(r"\s+", "", m.group(3))
        ident = next(counter)
        alloc = f"mlxq_rt::threadgroup_alloc({ident}, sizeof({typ}{dims}), alignof({typ}))"
        if dims:
            return f"{typ} (&{name}){dims} = *reinterpret_cast<{typ}(*){dims}>({alloc});"
        return f"{typ}& {name} = *reinterpret_cast<{typ}*>({alloc});"

    return _THREADGROUP_DECL.sub(repl, text)


def _checked_pointer_type(m) -> str:
    const = "const " if (m.group(1) or m.group(2)) else ""
    return f"mlxq::checked_ptr<{const}{m.group(3).strip()}>"


def _rewrite_device_pointers(text: str) -> str:
    text = _DEVICE_POINTER.sub(_checked_pointer_type, text)
    return _REINTERPRET_CHECKED.sub(r"mlxq::ptr_cast<\1>", text)


def _rewrite_buffer_params(sig: str, names: set) -> str:
    """Checking mode: buffer parameters of inputs/outputs (any address space) become checked_ptr."""
    out = []
    for line in sig.split("\n"):
        p = _PARAM.match(line.rstrip(","))
        if p and p.group(3) is not None and p.group(2) in names and p.group(1).endswith("*"):
            decl = p.group(1)
            base = re.sub(r"\b(device|constant|const)\b", "", decl[:-1]).strip()
            const = "const " if re.search(r"\bconst\b", decl) else ""
            line = line.replace(decl, f"mlxq::checked_ptr<{const}{base}>", 1)
        out.append(line)
    return "\n".join(out)


_ATTRIBUTE_VALUES = {
    "thread_position_in_grid": "t->pos_in_grid[0], t->pos_in_grid[1], t->pos_in_grid[2]",
    "threadgroup_position_in_grid": "t->tg_pos[0], t->tg_pos[1], t->tg_pos[2]",
    "thread_position_in_threadgroup": "t->pos_in_tg[0], t->pos_in_tg[1], t->pos_in_tg[2]",
    "threads_per_threadgroup": "t->tg_size[0], t->tg_size[1], t->tg_size[2]",
    "dispatch_threads_per_threadgroup": "t->dispatch_tg_size[0], t->dispatch_tg_size[1], t->dispatch_tg_size[2]",
    "threadgroups_per_grid": "t->tgs_per_grid[0], t->tgs_per_grid[1], t->tgs_per_grid[2]",
    "threads_per_grid": "t->grid[0], t->grid[1], t->grid[2]",
    "grid_size": "t->grid[0], t->grid[1], t->grid[2]",
    "grid_origin": "0u, 0u, 0u",
    "thread_index_in_threadgroup": "t->index_in_tg",
    "thread_index_in_simdgroup": "t->simd_lane",
    "simdgroup_index_in_threadgroup": "t->simd_group",
    "simdgroups_per_threadgroup": "(t->threads_in_tg + 31u) / 32u",
    "dispatch_simdgroups_per_threadgroup": "(t->dispatch_threads_in_tg + 31u) / 32u",
    "threads_per_simdgroup": "32u",
    "thread_execution_width": "32u",
    "quadgroup_index_in_threadgroup": "t->index_in_tg / 4u",
    "thread_index_in_quadgroup": "t->index_in_tg % 4u",
    "quadgroups_per_threadgroup": "(t->threads_in_tg + 3u) / 4u",
    "dispatch_quadgroups_per_threadgroup": "(t->dispatch_threads_in_tg + 3u) / 4u",
}


def _entry_point(callee: str, params: list, checked_names: set, buffer_names: list) -> str:
    args = []
    for p in params:
        if p.attribute is not None:
            value = _ATTRIBUTE_VALUES.get(p.attribute)
            if value is None:
                raise UnsupportedFeatureError(f"attribute [[{p.attribute}]] is not emulated")
            args.append(f"{p.decl}({value})")
        elif p.decl.endswith("&"):
            args.append(f"*({p.decl[:-1].strip()}*)bufs[{p.buffer}]")
        elif p.name in checked_names:
            base = re.sub(r"\b(device|constant)\b", "", p.decl[:-1]).strip()
            args.append(f"mlxq::checked_ptr<{base}>(({base}*)bufs[{p.buffer}], &mlxq::g_buffers[{p.buffer}])")
        else:
            args.append(f"({p.decl})bufs[{p.buffer}]")
    lines = [
        "namespace {",
        "void mlxq_thread(void* const* bufs, const mlxq_thread_info* t) {",
        f"  (void)bufs; (void)t;\n  {callee}(\n    " + ",\n    ".join(args) + ");",
        "}",
        "}  // namespace",
        'extern "C" __attribute__((visibility("default")))',
        "int mlxq_launch(const mlxq_launch_desc* d, const uint64_t* buffer_bytes) {",
    ]
    if checked_names:
        names = ", ".join('"' + n + '"' for n in buffer_names)
        lines += [
            f"  static const char* names[] = {{{names}}};",
            f"  for (int i = 0; i < {len(buffer_names)}; ++i)",
            "    mlxq::g_buffers[i] = mlxq::buffer_extent{(const char*)d->bufs[i], buffer_bytes[i], names[i]};",
            f"  mlxq::g_buffer_count = {len(buffer_names)};",
        ]
    else:
        lines.append("  (void)buffer_bytes;")
    lines += [
        "  return mlxq_rt::launch(d, &mlxq_thread);",
        "}",
        'extern "C" __attribute__((visibility("default"))) const char* mlxq_last_error() {',
        "  return mlxq_rt::last_error();",
        "}",
    ]
    return "\n".join(lines) + "\n"


def translate(text: str, input_names, output_names, source: str, header: str, checked: bool,
              file_label: str) -> Translation:
    """C++ for MLX's kernel `text`; `checked` turns buffer pointers into bounds-checked pointers."""
    kernel_name, params, sig_match, first_body_line = parse_signature(text)
    inst = _INSTANTIATION.search(text, sig_match.end())
    callee = inst.group(1) if inst else kernel_name

    buffer_params = sorted((p for p in params if p.buffer is not None), key=lambda p: p.buffer)
    buffer_names = [p.name for p in buffer_params]
    checked_names = set()
    if checked:
        checked_names = {p.name for p in buffer_params
                         if p.name in set(input_names) | set(output_names) and p.decl.endswith("*")}

    before, sig, after = text[:sig_match.start(2)], sig_match.group(2), text[sig_match.end(2):]
    if checked:
        sig = _rewrite_buffer_params(sig, checked_names)
        before = _rewrite_device_pointers(before)
        after = _rewrite_device_pointers(after)
    code = before + sig + after
    code = _METAL_INCLUDE.sub("", code)
    code = _rewrite_threadgroup_decls(code)
    code = _ATTRIBUTE.sub("", code)

    cpp = "".join([
        '#include "metal_shim.h"\n',
        "#define MLXQ_CHECKED 1\n" if checked else "",
        f'#line 1 "{file_label}"\n',
        code,
        "\n#line 1 \"mlxq_entry.cpp\"\n",
        _entry_point(callee, params, checked_names, buffer_names),
    ])
    return Translation(
        cpp=cpp,
        kernel_name=kernel_name,
        params=params,
        first_body_line=first_body_line,
        body_line_count=source.count("\n") + 1,
        uses_sync=uses_sync(source, header),
    )
