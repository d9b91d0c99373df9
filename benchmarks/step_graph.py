"""The lazily built graph of one decode step, traced without running it, and what it costs.

``decode_step_graph`` builds one decode step (batch 1, one query token) of a model over
given caches inside ``mx.export_function`` with a callback: MLX hands back every primitive
of the step with its inputs' and outputs' shapes and dtypes and its arguments (a
CustomKernel's name, grid and threadgroup among them). Nothing is evaluated, so the cache
contents and the weights can be lazy arrays that never exist: only shapes matter.

How the graph is made the one Metal would run, on any machine:
- mlxq's kernels: ``mlxq.backend.tracing_metal()`` makes the metal backend usable without
  Metal; inside a trace ``mx.fast.metal_kernel`` records a CustomKernel primitive.
- MLX's fused ops (SDPA, RMSNorm, RoPE, LayerNorm): the CPU build decomposes them into
  plain primitives when the graph is built. Without Metal they are replaced, for the
  trace only, by one stand-in primitive each (a CustomKernel named ``mlxfast_<Primitive>``
  counted under the primitive's own name) wherever Metal would fuse them (MLX 0.32's
  ``use_fallback`` rules, copied below). On a Mac nothing is replaced.

Everything is counted by what appears (primitive names, kernel names from the graph), not
by a list of today's kernels, so a rewritten cache is measured the same way.

Device-bytes model (per primitive; a figure for comparing paths, not a profiler):
- views (VIEW_KINDS: slices, reshapes, broadcasts, ...) move nothing: 0 bytes, and an
  array made by views reads as the smaller of its size and its base array's size;
- a SliceUpdate is taken as in place: it reads and writes the update's bytes (whether it
  really is in place is the copy check's business, below);
- a custom kernel given a whole cache buffer reads only the stored tokens of it (the
  kernels take the valid length): the buffer's bytes x stored / capacity, where the
  stored count per buffer comes from the cache's ``state`` after the step (the arrays a
  saved cache holds: the stored tokens only), matched to buffers by dtype and the other
  axes (a buffer no state array fits is counted whole);
- every other primitive reads its inputs and writes its outputs once;
- copies MLX makes when it runs a primitive, outside the graph, are added to it (and
  counted as "Copy (implicit)" dispatches): a kernel built with ensure_row_contiguous
  copies each strided input first; a reshape copies a non-contiguous input.

Copies of cache buffers found in the graph:
- ``whole``: a Copy/Concatenate/AsType/... (COPY_KINDS) of a whole cache buffer;
- ``slice``: the same of part of one (e.g. one token made contiguous, the window
  converted to float32), implicit copies included;
- ``at_risk``: a SliceUpdate into a cache buffer that something else in the same step
  also reads. MLX updates in place only when nothing else holds the buffer; on Metal the
  command buffer holds every input until the GPU is done, so assume a full copy.
"""

import contextlib
import math
import re
from dataclasses import dataclass, field

import mlx.core as mx

# Primitives that only make a view (no kernel when the input is row-contiguous).
VIEW_KINDS = frozenset({
    "Slice", "Reshape", "ExpandDims", "Squeeze", "Transpose", "Broadcast", "BroadcastAxes",
    "AsStrided", "Unflatten", "Flatten", "StopGradient", "Depends", "View", "Split",
})
# Primitives whose output holds a copy of their (first) input's elements.
COPY_KINDS = frozenset({"Copy", "Contiguous", "Concatenate", "AsType", "Pad"})
STAND_IN_PREFIX = "mlxfast_"
CACHE_PREFIX = "cache"
PARAM_PREFIX = "param"
SIMD_WIDTH = 32
IMPLICIT_COPY = "Copy (implicit)"  # made by MLX at run time, not a graph primitive


# --- MLX's fused ops, as Metal would build them ------------------------------------------
def _sdpa_fused_on_metal(q, k, v, mask) -> bool:
    """MLX 0.32 ScaledDotProductAttention::use_fallback on the GPU, negated
    (mlx/backend/metal/scaled_dot_product_attention.cpp)."""
    dq, dv = q.shape[-1], v.shape[-1]
    lq, lk = q.shape[2], k.shape[2]
    gqa = q.shape[1] // k.shape[1]
    has_mask = mask is not None
    has_arr_mask = isinstance(mask, mx.array)
    causal = isinstance(mask, str) and mask == "causal"
    vector_dim = (dq == dv and dq in (64, 96, 128, 256)) or (dq == 192 and dv == 128)
    full_dim = dq == dv and dq in (64, 72, 80, 96, 128)
    full_mask = not has_mask or has_arr_mask or (lq <= lk and causal)
    full = lq > 8 and full_mask and full_dim
    vector = lq <= 8 and lq <= lk and vector_dim and lq * gqa <= 32
    return full or vector


@contextlib.contextmanager
def metal_fast_ops():
    """Inside a trace without Metal: one stand-in primitive per fused MLX op (see above)."""
    from mlxq.backend import metal_available

    if metal_available():
        yield
        return
    fast = mx.fast
    originals = {name: getattr(fast, name) for name in
                 ("scaled_dot_product_attention", "rms_norm", "rope", "layer_norm")}
    make_kernel = fast.metal_kernel
    kernels = {}

    def stand_in(kind, inputs, shape, dtype):
        names = tuple(f"in{i}" for i in range(len(inputs)))
        key = (kind, names)
        if key not in kernels:
            kernels[key] = make_kernel(
                name=STAND_IN_PREFIX + kind, input_names=list(names), output_names=["out"],
                source="// stand-in for MLX's fused primitive: traced, never run\n")
        (out,) = kernels[key](inputs=list(inputs), grid=(1, 1, 1), threadgroup=(1, 1, 1),
                              output_shapes=[shape], output_dtypes=[dtype])
        return out

    def sdpa(q, k, v, *, scale, mask=None, sinks=None, **kw):
        if not _sdpa_fused_on_metal(q, k, v, mask) or kw:
            return originals["scaled_dot_product_attention"](
                q, k, v, scale=scale, mask=mask, sinks=sinks, **kw)
        extra = [x for x in (mask, sinks) if isinstance(x, mx.array)]
        return stand_in("ScaledDotProductAttention", [q, k, v, *extra],
                        (*q.shape[:-1], v.shape[-1]), q.dtype)

    def rms_norm(x, weight, eps, **kw):
        return stand_in("RMSNorm", [x] + ([weight] if weight is not None else []),
                        x.shape, x.dtype)

    def layer_norm(x, weight, bias, eps, **kw):
        extra = [a for a in (weight, bias) if a is not None]
        return stand_in("LayerNorm", [x, *extra], x.shape, x.dtype)

    def rope(x, dims, *, traditional, base, scale, offset, freqs=None, **kw):
        extra = [a for a in (offset, freqs) if isinstance(a, mx.array)]
        return stand_in("RoPE", [x, *extra], x.shape, x.dtype)

    replacements = {"scaled_dot_product_attention": sdpa, "rms_norm": rms_norm,
                    "rope": rope, "layer_norm": layer_norm}
    try:
        for name, fn in replacements.items():
            setattr(fast, name, fn)
        yield
    finally:
        for name, fn in originals.items():
            setattr(fast, name, fn)


# --- arrays held by a cache or a model -----------------------------------------------------
def _walk(obj, path, found):
    if isinstance(obj, mx.array):
        found[path] = obj
    elif isinstance(obj, (list, tuple)):
        for i, x in enumerate(obj):
            _walk(x, f"{path}.{i}", found)
    elif isinstance(obj, dict):
        for k, x in obj.items():
            _walk(x, f"{path}.{k}", found)


def held_arrays(cache) -> dict:
    """Every array a cache object holds in its attributes (lists/tuples/dicts followed),
    by path ("keys.0", "fp_values"): its buffers, whatever the cache's design."""
    found = {}
    for name, value in vars(cache).items():
        if not name.startswith("__"):
            _walk(value, name, found)
    return found


def _replace(obj, path, new):
    if isinstance(obj, mx.array):
        return new[path] if path in new else obj
    if isinstance(obj, (list, tuple)):
        out = [_replace(x, f"{path}.{i}", new) for i, x in enumerate(obj)]
        return out if isinstance(obj, list) else type(obj)(out)
    if isinstance(obj, dict):
        return {k: _replace(x, f"{path}.{k}", new) for k, x in obj.items()}
    return obj


def set_held_arrays(cache, new: dict) -> None:
    for name, value in list(vars(cache).items()):
        if not name.startswith("__"):
            setattr(cache, name, _replace(value, name, new))


def _shape_matches(state_shape, buf_shape):
    """The token axis (the one axis that differs) or -1 if equal; None if unrelated."""
    if len(state_shape) != len(buf_shape):
        return None
    diff = [i for i, (a, b) in enumerate(zip(state_shape, buf_shape)) if a != b]
    if not diff:
        return -1
    if len(diff) == 1 and state_shape[diff[0]] <= buf_shape[diff[0]]:
        return diff[0]
    return None


def stored_fractions(cache, buffers: dict) -> dict:
    """Per buffer path: the fraction of it that holds stored tokens. ``cache.state`` holds
    the stored tokens only; each state array is matched to the buffers it fits (same dtype,
    all axes equal but the token axis), and the tokens of those arrays are shared among
    the buffers of that shape (keys and values: two arrays, two buffers)."""
    from mlx.utils import tree_flatten

    state = [a for _, a in tree_flatten(cache.state) if isinstance(a, mx.array)]
    fractions = {}
    for path, buf in buffers.items():
        twins = sum(1 for b in buffers.values() if b.dtype == buf.dtype and b.shape == buf.shape)
        tokens, axis = 0, None
        for s in state:
            if s.dtype != buf.dtype:
                continue
            a = _shape_matches(s.shape, buf.shape)
            if a == -1:
                tokens, axis = None, None  # the state is the whole buffer
                break
            if a is not None and axis in (None, a):
                axis = a
                tokens += s.shape[a]
        if tokens is None or not buf.size:
            fractions[path] = 1.0
        elif axis is None:
            fractions[path] = 1.0  # no state array fits it: counted whole, never less
        else:
            fractions[path] = min(1.0, tokens / twins / buf.shape[axis])
    return fractions


# --- tracing -------------------------------------------------------------------------------
@dataclass
class Prim:
    kind: str          # primitive name; "kernel:<name>" for a custom kernel
    inputs: list       # [(name, shape, dtype)]
    outputs: list
    arguments: list
    layer: int | None = None
    read: int = 0
    written: int = 0
    implicit_copies: int = 0   # copies MLX makes when it runs this (non-contiguous inputs)
    read_weights: int = 0      # the part of `read` that is model weights


@dataclass
class StepGraph:
    prims: list
    input_names: dict              # graph name -> trace keyword ("cache.3.keys.0", ...)
    output_names: list
    buffer_fraction: dict = field(default_factory=dict)  # trace keyword -> stored fraction


def _nbytes(shape, dtype) -> int:
    return int(math.prod(shape)) * dtype.size


# Type names MLX appends to a kernel's name (its inputs' and outputs' dtypes).
_MSL_TYPES = ("bool", "uint8_t", "uint16_t", "uint32_t", "uint64_t", "int8_t", "int16_t",
              "int32_t", "int64_t", "float16_t", "bfloat16_t", "float", "complex64_t", "half")


def kernel_short_name(mlx_name: str) -> str:
    """"custom_kernel_mlxq_kv_write__float_64_4_64_..." -> "mlxq_kv_write": MLX joins the
    kernel's name and its template arguments with a double underscore and appends the
    arrays' dtypes."""
    name = mlx_name[len("custom_kernel_"):] if mlx_name.startswith("custom_kernel_") else mlx_name
    name = name.split("__", 1)[0]
    changed = True
    while changed:
        changed = False
        for t in _MSL_TYPES:
            if name.endswith("_" + t):
                name, changed = name[:-len(t) - 1], True
    return name


def trace(fn, named_inputs: dict) -> StepGraph:
    """Trace ``fn(**named_inputs) -> list of arrays`` with ``mx.export_function``'s
    callback; nothing is evaluated."""
    events = []
    mx.export_function(events.append, lambda **kw: fn(**kw), **named_inputs)
    keywords, outputs, prims = {}, [], []
    for e in events:
        if e["type"] == "keyword_inputs":
            keywords = {graph_name: kw for kw, graph_name in e["keywords"]}
        elif e["type"] == "outputs":
            outputs = [name for name, _, _ in e["outputs"]]
        elif e["type"] == "primitive":
            kind = e["name"]
            if kind == "CustomKernel":
                short = kernel_short_name(str(e["arguments"][0]))
                kind = (short[len(STAND_IN_PREFIX):] if short.startswith(STAND_IN_PREFIX)
                        else f"kernel:{short}")
            prims.append(Prim(kind, list(e["inputs"]), list(e["outputs"]),
                              list(e["arguments"])))
    return StepGraph(prims, keywords, outputs)


def is_kernel(prim) -> bool:
    return prim.kind.startswith("kernel:")


def launch(prim) -> dict:
    """Grid (threads), threadgroup, and the threadgroups/simdgroups it launches, from a
    CustomKernel's recorded arguments (name, source, grid x3, threadgroup x3, ...)."""
    grid = tuple(int(x) for x in prim.arguments[2:5])
    tg = tuple(int(x) for x in prim.arguments[5:8])
    groups = math.prod(-(-g // t) for g, t in zip(grid, tg))
    per_group = -(-math.prod(tg) // SIMD_WIDTH)
    return {"kernel": prim.kind.split(":", 1)[1], "grid": list(grid), "threadgroup": list(tg),
            "threadgroups": groups, "simdgroups_per_threadgroup": per_group,
            "simdgroups": groups * per_group}


def _layer_of(keyword):
    m = re.search(r"(?:^|\.)(?:layers|%s)\.(\d+)\." % CACHE_PREFIX, keyword or "")
    return int(m.group(1)) if m else None


RESHAPE_KINDS = frozenset({"Reshape", "Flatten", "Unflatten"})


def _view_contiguous(p, src_contiguous: bool) -> bool:
    """Whether a view primitive's output is row-contiguous (MLX runs kernels on it as is)."""
    if not src_contiguous or p.kind == "AsStrided":
        return False
    in_shape, out_shape = p.inputs[0][1], p.outputs[0][1]
    if p.kind == "Slice":
        strides = p.arguments[2] if len(p.arguments) > 2 else ()
        if any(int(x) != 1 for x in strides):
            return False
        first = next((k for k, n in enumerate(out_shape) if n != 1), len(out_shape))
        return all(out_shape[j] == in_shape[j] for j in range(first + 1, len(out_shape)))
    if p.kind == "Transpose":
        perm = [int(x) for x in p.arguments[0]]
        moved = [a for a in perm if in_shape[a] != 1]
        return moved == sorted(moved)
    if p.kind in ("Broadcast", "BroadcastAxes"):
        return math.prod(in_shape) == math.prod(out_shape)
    return True


def _implicit_copy(p, item, base_bytes, view_of, copies) -> None:
    name, shape, dtype = item
    size = _nbytes(shape, dtype)
    p.implicit_copies += 1
    p.read += min(size, base_bytes.get(name, size))
    p.written += size
    if name in view_of:
        copies.append({"kind": "slice", "primitive": f"Copy (implicit, {p.kind} input)",
                       "layer": p.layer, "buffer": view_of[name], "bytes": size})


# Kernels given whole cache buffers that read one row of each per row they write (the
# token leaving the float16 window and its key center), not the whole buffer.
ROW_READ_KERNELS = {"kernel:mlxq_kv_quantize_slots"}


def analyse(graph: StepGraph) -> None:
    """Fill each primitive's layer and read/written bytes; find cache-buffer copies."""
    producer, consumers = {}, {}
    for i, p in enumerate(graph.prims):
        for name, _, _ in p.outputs:
            producer[name] = i
        for name, _, _ in p.inputs:
            consumers.setdefault(name, []).append(i)

    # Layer: the largest layer among the named inputs a primitive depends on; primitives
    # fed by nothing named (constants, zeros) take their first consumer's layer.
    layer_of_array = {name: _layer_of(kw) for name, kw in graph.input_names.items()}
    for p in graph.prims:
        layers = [layer_of_array.get(n) for n, _, _ in p.inputs]
        layers = [x for x in layers if x is not None]
        p.layer = max(layers) if layers else None
        for name, _, _ in p.outputs:
            layer_of_array[name] = p.layer
    for p in reversed(graph.prims):
        if p.layer is None:
            users = [graph.prims[j].layer for n, _, _ in p.outputs
                     for j in consumers.get(n, []) if graph.prims[j].layer is not None]
            p.layer = min(users) if users else None

    # Cache lineage: the traced cache buffers, their slice-updated versions, views of them.
    buffer = {n: kw for n, kw in graph.input_names.items() if kw.startswith(CACHE_PREFIX + ".")}
    whole = dict(buffer)      # array name -> cache keyword, for whole-buffer versions
    view_of = {}              # array name -> cache keyword, for views of a buffer
    base_bytes = {}
    contiguous = {}           # array name -> row-contiguous (trace inputs: yes)
    weights = {n for n, kw in graph.input_names.items() if kw.startswith(PARAM_PREFIX + ".")}
    graph.copies = []
    for p in graph.prims:
        ins = p.inputs
        if p.kind in VIEW_KINDS:
            src = ins[0][0] if ins else None
            out_contig = _view_contiguous(p, contiguous.get(src, True)) if src else True
            for name, shape, dtype in p.outputs:
                own = _nbytes(shape, dtype)
                base_bytes[name] = min(own, base_bytes.get(src, own)) if src else own
                if src in whole or src in view_of:
                    view_of[name] = whole.get(src) or view_of[src]
                contiguous[name] = out_contig
            if p.kind in RESHAPE_KINDS and src and not contiguous.get(src, True):
                # MLX copies a non-contiguous array it has to reshape.
                _implicit_copy(p, ins[0], base_bytes, view_of, graph.copies)
                for name, _, _ in p.outputs:
                    contiguous[name] = True
            continue
        for name, shape, dtype in p.outputs:
            base_bytes[name] = _nbytes(shape, dtype)
            contiguous[name] = True
        if is_kernel(p) and len(p.arguments) > 9 and p.arguments[9] is True:
            # ensure_row_contiguous: MLX copies each strided input before the launch.
            for item in ins:
                if not contiguous.get(item[0], True):
                    _implicit_copy(p, item, base_bytes, view_of, graph.copies)
        if p.kind == "SliceUpdate":
            update = ins[1]
            p.read += base_bytes.get(update[0], _nbytes(update[1], update[2]))
            p.written += base_bytes.get(update[0], _nbytes(update[1], update[2]))
            if ins[0][0] in whole:
                whole[p.outputs[0][0]] = whole[ins[0][0]]
            continue
        for name, shape, dtype in ins:
            size = base_bytes.get(name, _nbytes(shape, dtype))
            if p.kind in ROW_READ_KERNELS and name in whole:
                rows = math.prod(p.outputs[-1][1][:-1])
                size = rows * shape[-1] * dtype.size
            elif is_kernel(p) and name in whole:
                size = int(size * graph.buffer_fraction.get(whole[name], 1.0))
            p.read += size
            if name in weights:
                p.read_weights += size
        p.written += sum(_nbytes(s, d) for _, s, d in p.outputs)

    for i, p in enumerate(graph.prims):
        if p.kind == "SliceUpdate" and p.inputs[0][0] in whole:
            target = p.inputs[0][0]
            others = [graph.prims[j].kind for j in consumers.get(target, []) if j != i]
            if others:
                graph.copies.append({"kind": "at_risk", "primitive": p.kind, "layer": p.layer,
                                     "buffer": whole[target], "also_read_by": others,
                                     "bytes": _nbytes(p.inputs[0][1], p.inputs[0][2])})
        elif p.kind in COPY_KINDS:
            for name, shape, dtype in p.inputs:
                if name in whole or name in view_of:
                    graph.copies.append({
                        "kind": "whole" if name in whole else "slice", "primitive": p.kind,
                        "layer": p.layer, "buffer": whole.get(name) or view_of[name],
                        "bytes": base_bytes.get(name, _nbytes(shape, dtype))})


def layer_summary(graph: StepGraph, layer: int) -> dict:
    """Counts by kind, dispatches, kernels with their launches, bytes, copies of one layer."""
    prims = [p for p in graph.prims if p.layer == layer]
    kinds = {}
    for p in prims:
        kinds[p.kind] = kinds.get(p.kind, 0) + 1
        if p.implicit_copies:
            kinds[IMPLICIT_COPY] = kinds.get(IMPLICIT_COPY, 0) + p.implicit_copies
    implicit = sum(p.implicit_copies for p in prims)
    copies = [c for c in graph.copies if c["layer"] == layer]
    return {
        "primitives": len(prims) + implicit,
        "dispatches": sum(1 for p in prims if p.kind not in VIEW_KINDS) + implicit,
        "by_kind": dict(sorted(kinds.items())),
        "kernels": [launch(p) for p in prims if is_kernel(p)],
        "bytes_read": sum(p.read for p in prims),
        "bytes_read_weights": sum(p.read_weights for p in prims),
        "bytes_written": sum(p.written for p in prims),
        "copies": {k: sum(1 for c in copies if c["kind"] == k) for k in ("whole", "at_risk",
                                                                           "slice")},
        "copy_details": copies,
    }


# --- one decode step -------------------------------------------------------------------------
def decode_step_graph(model, caches, token: int = 0) -> StepGraph:
    """The analysed graph of ``model(token)`` over ``caches``: outputs are the logits and
    every array the caches hold after the step. Weights and cache arrays are the trace's
    named inputs (``param.<name>``, ``cache.<layer>.<path>``), so they are never evaluated
    and the graph holds the step alone. The caches are left in their after-step state,
    holding traced arrays: use them for nothing else."""
    from mlx.utils import tree_flatten, tree_unflatten

    params = dict(tree_flatten(model.parameters()))
    named = {f"{PARAM_PREFIX}.{k}": v for k, v in params.items()}
    for i, c in enumerate(caches):
        for path, arr in held_arrays(c).items():
            named[f"{CACHE_PREFIX}.{i}.{path}"] = arr
    fractions = {}

    def step(**kw):
        n = len(PARAM_PREFIX) + 1
        model.update(tree_unflatten([(k[n:], v) for k, v in kw.items()
                                     if k.startswith(PARAM_PREFIX + ".")]))
        before = []
        for i, c in enumerate(caches):
            prefix = f"{CACHE_PREFIX}.{i}."
            mine = {k[len(prefix):]: v for k, v in kw.items() if k.startswith(prefix)}
            set_held_arrays(c, mine)
            before.append(mine)
        with metal_fast_ops():
            logits = model(mx.array([[token]], dtype=mx.int32), cache=caches)
        outs = [logits]
        for i, c in enumerate(caches):
            outs += list(held_arrays(c).values())
            for path, f in stored_fractions(c, before[i]).items():
                fractions[f"{CACHE_PREFIX}.{i}.{path}"] = f
        return outs

    try:
        graph = trace(step, named)
    finally:
        model.update(tree_unflatten(list(params.items())))
    graph.buffer_fraction = fractions
    analyse(graph)
    return graph


def middle_layers(n_layers: int) -> list[int]:
    """Layers whose primitives are theirs alone: not the first (it also holds what feeds
    the embedding output) nor the last (it also holds the final norm and the head)."""
    return list(range(1, n_layers - 1)) if n_layers >= 3 else list(range(n_layers))


def per_layer(graph: StepGraph, n_layers: int) -> dict:
    """One middle layer's summary, and whether every middle layer counts the same."""
    layers = middle_layers(n_layers)
    summaries = [layer_summary(graph, i) for i in layers]
    first = summaries[0]
    same = all(s["by_kind"] == first["by_kind"] and s["bytes_read"] == first["bytes_read"]
               for s in summaries)
    return {**first, "layer": layers[0], "layers_alike": same}


# --- the CPU check: is a cache buffer copied by a real decode step? -------------------------
def buffer_address(a) -> int:
    """Where an evaluated array's data lives (a buffer-protocol view, dropped at once:
    holding it would itself stop the next in-place update)."""
    import numpy as np

    return int(np.asarray(memoryview(a)).__array_interface__["data"][0])


def _addresses(caches):
    out = {}
    for i, c in enumerate(caches):
        for path, a in held_arrays(c).items():
            out[f"{i}.{path}"] = (a.shape, a.dtype, buffer_address(a))
    return out


def cpu_copy_check(model, caches, prompt_len: int, steps: int, seed: int = 0) -> dict:
    """Run ``steps`` real decode steps after a ``prompt_len`` prompt (on this machine, with
    whatever backend is set) and compare every cache buffer's address between steps.
    Each step evaluates the next token and every cache array (the traced graph's
    outputs), then addresses are read: an address that changes while the shape stays is
    a copy; a changed shape is a reallocation (a cache growing by a block). Steps are not
    pipelined (generate's overlap of two steps can add copies; the graph's at_risk count
    is the check for that)."""
    vocab = model.args.vocab_size
    tokens = mx.random.randint(0, vocab, (prompt_len + 1,), key=mx.random.key(seed))
    model(tokens[None, :prompt_len], cache=caches)
    mx.eval([list(held_arrays(c).values()) for c in caches])
    y = tokens[prompt_len:]
    prev = _addresses(caches)
    copied, reallocated = {}, {}
    for _ in range(steps):
        logits = model(y[None], cache=caches)
        y = mx.argmax(logits[:, -1, :], axis=-1)
        mx.eval([y] + [list(held_arrays(c).values()) for c in caches])
        cur = _addresses(caches)
        for key, (shape, dtype, addr) in cur.items():
            if key not in prev:
                continue
            old_shape, old_dtype, old_addr = prev[key]
            if (shape, dtype) != (old_shape, old_dtype):
                reallocated[key] = reallocated.get(key, 0) + 1
            elif addr != old_addr:
                copied[key] = copied.get(key, 0) + 1
        prev = cur
    return {"steps": steps, "prompt": prompt_len, "buffers": len(prev),
            "copied": dict(sorted(copied.items())),
            "reallocated": dict(sorted(reallocated.items()))}
