"""One decode step, as the Metal graph MLX would run: primitives per layer by kind, the
kernels launched (grid, threadgroups, simdgroups), device bytes per layer and whether any
cache buffer is copied, for the fp16 KV cache and mlxq's int4 caches. Built and counted on
any machine without running the step (see benchmarks/step_graph.py); on a Mac it also
times real decode steps.

    python benchmarks/decode_step.py                  # default model + Llama-3-8B, 4K and 32K
    python benchmarks/decode_step.py --quick          # small contexts, seconds

Models have random weights (4-bit) with the real shapes, created lazily and never
evaluated: only shapes reach the graph. ``--layers`` layers are traced (per-layer figures
come from a middle layer, checked alike across the middle layers); per-token figures scale
them by the real model's layer count. The CPU check runs real decode steps of a small
model (the default model's attention shape, reference backend) and compares buffer
addresses between steps.
"""

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `mlxq` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx
import mlx.nn as nn

from benchmarks import common, step_graph
from mlxq.errors import MlxqError, cli_main

MODELS = {
    # SmolLM2-135M-Instruct's config (the default model), weights as converted: 4-bit g32.
    "default": dict(model_type="llama", hidden_size=576, num_hidden_layers=30,
                    intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                    head_dim=64, vocab_size=49152, rope_theta=100000.0,
                    tie_word_embeddings=True, weight_group_size=32),
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32,
                       intermediate_size=14336, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                       tie_word_embeddings=False, weight_group_size=64),
}
CONTEXTS = [4096, 32768]
# Below this the default window (256) and sink (4) are not full: not a steady decode step.
MIN_CONTEXT = 300
QUICK_CONTEXTS = [512, 1024]
PREFILL_CHUNK = 4096
# The caches compared: (key, label, make_cache options). fp16 first: the others' deltas.
CACHES = [
    ("fp16", "fp16", dict(kv_bits=16, dtype=mx.float16)),
    ("int4", "int4 (rotation, recent 304, sink 4)", dict(kv_bits=4)),
    ("int4_r0s0", "int4 --kv-recent 0 --kv-sink 0", dict(kv_bits=4, kv_recent=0, kv_sink=0)),
]
# The CPU check: the default model's attention shape in a few layers, a prompt that fills
# the window and sink (256 + 4) and quantizes a few tokens more.
CPU_CHECK_MODEL = dict(model_type="llama", hidden_size=576, num_hidden_layers=2,
                       intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                       head_dim=64, vocab_size=4096, rope_theta=100000.0,
                       tie_word_embeddings=True, weight_group_size=32)
CPU_CHECK_PROMPT = 300
CPU_CHECK_STEPS = 8


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("out/benchmarks"),
                   help="folder for decode_step.json (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="overwrite decode_step.json")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: contexts 512,1024, default model only")
    p.add_argument("--models", type=common.str_list, default=None,
                   help=f"{','.join(MODELS)} (default: all; --quick: default)")
    p.add_argument("--contexts", type=common.int_list, default=None,
                   help="tokens in the cache after the step (default: 4096,32768)")
    p.add_argument("--layers", type=int, default=4,
                   help="layers traced, >= 3 (default: %(default)s)")
    p.add_argument("--no-cpu-check", action="store_true",
                   help="skip the real decode steps that look for copied buffers")
    p.add_argument("--time-steps", type=int, default=32,
                   help="Metal only: decode steps timed per context (default: %(default)s)")
    args = p.parse_args(argv)
    args.models = args.models or (["default"] if args.quick else list(MODELS))
    for name in args.models:
        if name not in MODELS:
            p.error(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    args.contexts = sorted(set(args.contexts or (QUICK_CONTEXTS if args.quick else CONTEXTS)))
    if min(args.contexts) < MIN_CONTEXT:
        p.error(f"--contexts must be at least {MIN_CONTEXT} tokens (the default full-precision "
                "window and sink full, some tokens quantized)")
    if args.layers < 3:
        p.error("--layers must be at least 3 (per-layer figures come from a middle layer)")
    if args.time_steps < 1:
        p.error("--time-steps must be at least 1")
    return args


# --- models and caches ------------------------------------------------------------------------
def split_config(config: dict):
    """(model config, weight group size): MODELS entries carry the group size too."""
    config = dict(config)
    return config, config.pop("weight_group_size")


def lazy_model(config: dict, layers: int | None = None, dtype=mx.float16):
    """A model of ``config``'s shape with random 4-bit weights, never evaluated: tracing
    needs only shapes, so even Llama-3-8B's weights cost nothing."""
    from mlxq.models import build_model

    config, group = split_config(config)
    if layers is not None:
        config["num_hidden_layers"] = layers
    model = build_model(config)
    nn.quantize(model, group_size=group, bits=4)
    model.set_dtype(dtype)
    return model


def make_caches(model, options: dict):
    from mlxq.cache import KVCache, make_cache

    options = dict(options)
    dtype = options.pop("dtype", None)
    if options.get("kv_bits") == 16 and dtype is not None:
        # The fp16 cache as on a Mac (the CPU's compute dtype is float32).
        return [KVCache(dtype=dtype) for _ in model.layers]
    return make_cache(model, **options)


def prefill(model, caches, tokens: int, dtype=mx.float16, evaluate: bool = False) -> None:
    """Bring every cache to ``tokens`` stored tokens without running the model: each layer
    stores chunks of random keys/values (the cache's own append path, on the current
    backend). Only the caches' bookkeeping and array shapes matter to the graph
    of the next step, so by default this runs inside a throwaway ``mx.export_function``
    trace: nothing is computed, and Metal kernels record without Metal (a cache that picks
    its backend when made can be made under ``tracing_metal()``). ``evaluate`` computes
    the contents chunk by chunk instead (for timing real steps)."""
    d = model.head_dim

    def fill():
        chunk = 0
        for c in caches:
            done = 0
            while done < tokens:
                n = min(PREFILL_CHUNK, tokens - done)
                shape = (1, model.n_kv_heads, n, d)
                # Explicit keys: the global random state must not pick up traced arrays.
                k, v = (mx.random.normal(shape, key=mx.random.key(2 * chunk + i)).astype(dtype)
                        for i in range(2))
                store = getattr(c, "append", None) or c.update_and_fetch
                store(k, v)
                if evaluate:
                    mx.eval(list(step_graph.held_arrays(c).values()))
                done += n
                chunk += 1

    if evaluate:
        fill()
        return

    def traced(x):
        fill()
        return [x]

    mx.export_function(lambda _: None, traced, mx.zeros((1,)))


def steady_prefill(context: int, options: dict) -> int:
    """Tokens stored before the step measured at ``context``: the step to ``context``
    tokens, or the one before it when that step would complete a key-center block (1 step
    in CENTER_BLOCK (128), which also computes the next block's center: not the steady step)."""
    from mlxq.cache import config_from_options
    from mlxq.kernels.kv_layout import CENTER_BLOCK

    config = config_from_options(**{k: v for k, v in options.items() if k != "dtype"})
    if config.quantized and config.key_center and (context - config.sink) % CENTER_BLOCK == 0:
        return context - 2
    return context - 1


# --- one row: trace a step ---------------------------------------------------------------------
def traced_step(name: str, context: int, options: dict, layers: int) -> dict:
    """Trace the steady step at ``context`` tokens (``steady_prefill``)."""
    from mlxq.backend import tracing_metal

    model = lazy_model(MODELS[name], layers)
    with tracing_metal():
        caches = make_caches(model, options)
        prefill(model, caches, steady_prefill(context, options))
        graph = step_graph.decode_step_graph(model, caches)
    summary = step_graph.per_layer(graph, layers)
    if options.get("kv_bits", 16) < 16 and not summary["kernels"]:
        raise MlxqError("the traced int4 step launched no custom kernel: the cache did not "
                        "take the metal backend for tracing (mlxq.backend.tracing_metal)")
    whole = {k: sum(1 for c in graph.copies if c["kind"] == k)
             for k in ("whole", "at_risk", "slice")}
    return {**summary, "graph_copies": whole}


def time_steps(name: str, context: int, options: dict, steps: int) -> dict:
    """UNMEASURED: nothing here has run on a Mac. With Metal: the median interval between
    decode steps at ``context`` tokens, all the model's layers, random 4-bit weights,
    pipelined as mlxq.generate does (the next step queued before the token is read)."""
    import time

    from benchmarks.decode_latency import random_model
    from mlxq.backend import compute_dtype, metal_available

    if not metal_available():
        return common.not_available(common.NA_NEEDS_METAL)
    model = random_model(split_config(MODELS[name])[0], 4, compute_dtype(), seed=0)  # evaluated layer by layer
    caches = make_caches(model, options)
    prefill(model, caches, steady_prefill(context, options), evaluate=True)

    def step(y):
        return mx.argmax(model(y[None], cache=caches)[:, -1, :], axis=-1)

    warmup = 2
    y = step(mx.array([0]))
    mx.async_eval(y)
    marks = []
    for _ in range(warmup + steps + 1):
        nxt = step(y)
        mx.async_eval(nxt)
        y.item()
        marks.append(time.perf_counter())
        y = nxt
    y.item()
    stats = common.summarize([b - a for a, b in zip(marks, marks[1:])][warmup:])
    return {"status": "ok", "ms_median": stats["median"], "ms_p10": stats["p10"],
            "ms_p90": stats["p90"], "steps": stats["n"]}


def cpu_check(options: dict) -> dict:
    """Real decode steps on this machine's CPU (reference backend, float32): which cache
    buffers get a new address while keeping their shape (= copied)."""
    from benchmarks.decode_latency import random_model

    model = random_model(split_config(CPU_CHECK_MODEL)[0], 4, mx.float32, seed=0)
    opts = {k: v for k, v in options.items() if k != "dtype"}
    with common.kernel_backend_env("reference"):
        caches = make_caches(model, opts)
        return step_graph.cpu_copy_check(model, caches, CPU_CHECK_PROMPT, CPU_CHECK_STEPS)


# --- output ------------------------------------------------------------------------------------
def _mb(x):
    return common.fmt(x / 1e6, ".3f")


def table(results) -> str:
    headers = ["model", "context", "KV cache", "dispatch/layer", "vs fp16", "prims/layer",
               "kernels", "simdgroups", "read MB/layer", "+ weights MB", "write MB/layer",
               "d read vs fp16",
               "copies/layer whole/at-risk/slice",
               "ms/step (Metal)"]
    rows = []
    for r in results:
        head = [r["model"], str(r["context"]), r["label"]]
        if r["status"] != "ok":
            rows.append(head + [r["reason"]] + [""] * (len(headers) - 4))
            continue
        d = r["dispatches"]
        delta = "" if r["delta_dispatches"] is None else f"{r['delta_dispatches']:+d}"
        launches = r["kernels"]
        rows.append(head + [
            str(d), delta, str(r["primitives"]), str(len(launches)),
            ",".join(str(k["simdgroups"]) for k in launches),
            _mb(r["bytes_read"] - r["bytes_read_weights"]), _mb(r["bytes_read_weights"]),
            _mb(r["bytes_written"]),
            "" if r["delta_bytes_read"] is None else f"{r['delta_bytes_read'] / 1e6:+.3f}",
            "/".join(str(r["copies"][k]) for k in ("whole", "at_risk", "slice")),
            common.fmt(r["timing"].get("ms_median"), ".2f") or r["timing"].get("reason", "")])
    return common.format_table(headers, rows)


def kinds_table(results) -> str:
    """Primitives per layer by kind, one column per cache (first context of each model)."""
    blocks = []
    for model in dict.fromkeys(r["model"] for r in results):
        rows = [r for r in results if r["model"] == model and r["status"] == "ok"]
        if not rows:
            continue
        ctx = rows[0]["context"]
        rows = [r for r in rows if r["context"] == ctx]
        kinds = sorted({k for r in rows for k in r["by_kind"]})
        headers = [f"{model} @ {ctx}: kind"] + [r["key"] for r in rows]
        body = [[k] + [str(r["by_kind"].get(k, 0)) for r in rows] for k in kinds]
        blocks.append(common.format_table(headers, body))
    return "\n\n".join(blocks)


def kernels_table(results) -> str:
    headers = ["model", "context", "KV cache", "kernel", "grid", "threadgroup",
               "threadgroups", "simdgroups"]
    rows = []
    for r in results:
        for k in r.get("kernels", []):
            rows.append([r["model"], str(r["context"]), r["key"], k["kernel"],
                         "x".join(map(str, k["grid"])), "x".join(map(str, k["threadgroup"])),
                         str(k["threadgroups"]), str(k["simdgroups"])])
    return common.format_table(headers, rows)


def cpu_table(checks) -> str:
    headers = ["KV cache", "steps", "buffers", "copied (buffer: steps)", "reallocated"]
    rows = []
    for c in checks:
        if c["status"] != "ok":
            rows.append([c["label"], c["reason"], "", "", ""])
            continue
        rows.append([c["label"], str(c["steps"]), str(c["buffers"]),
                     ", ".join(f"{k}: {n}" for k, n in c["copied"].items()) or "none",
                     ", ".join(f"{k}: {n}" for k, n in c["reallocated"].items()) or "none"])
    return common.format_table(headers, rows)


def run(args) -> dict:
    results = []
    for name in args.models:
        for ctx in args.contexts:
            fp = None
            for key, label, options in CACHES:
                row = {"model": name, "context": ctx, "key": key, "label": label,
                       "real_layers": MODELS[name]["num_hidden_layers"]}
                try:
                    fig = traced_step(name, ctx, options, args.layers)
                except Exception as e:  # noqa: BLE001 - recorded, exit code 1
                    results.append({**row, **common.failed(e)})
                    continue
                fp = fp or (fig if key == "fp16" else None)
                fig["delta_dispatches"] = fig["dispatches"] - fp["dispatches"] if fp else None
                fig["delta_primitives"] = fig["primitives"] - fp["primitives"] if fp else None
                fig["delta_bytes_read"] = fig["bytes_read"] - fp["bytes_read"] if fp else None
                fig["delta_bytes_written"] = (fig["bytes_written"] - fp["bytes_written"]
                                              if fp else None)
                fig["per_token_dispatches"] = fig["dispatches"] * row["real_layers"]
                fig["timing"] = time_steps(name, ctx, options, args.time_steps)
                results.append({**row, "status": "ok", **fig})
                print(f"  {name} ctx {ctx} {label}: {fig['dispatches']} dispatches/layer",
                      file=sys.stderr, flush=True)
    checks = []
    if not args.no_cpu_check:
        for key, label, options in CACHES:
            try:
                checks.append({"key": key, "label": label, "status": "ok",
                               **cpu_check(options)})
            except Exception as e:  # noqa: BLE001
                checks.append({"key": key, "label": label, **common.failed(e)})
    return {"results": results, "cpu_check": checks}


@cli_main
def main(argv=None) -> int:
    args = parse_args(argv)
    from mlxq.output_files import check_output_file

    json_path = check_output_file(args.out / "decode_step.json", args.force)
    machine = common.machine_info()
    print(f"# {common.machine_title(machine)}", flush=True)
    out = run(args)
    data = {"benchmark": "decode_step", "machine": machine,
            "settings": {"models": args.models, "contexts": args.contexts,
                         "layers_traced": args.layers, "quick": args.quick, "batch": 1,
                         "query_tokens": 1, "graph": "Metal (traced, not run)",
                         "cpu_check": {"prompt": CPU_CHECK_PROMPT, "steps": CPU_CHECK_STEPS,
                                       "backend": "reference"}},
            **out}
    common.write_json(json_path, data)
    print(table(out["results"]))
    print()
    print(kinds_table(out["results"]))
    print()
    print(kernels_table(out["results"]))
    if out["cpu_check"]:
        print()
        print(cpu_table(out["cpu_check"]))
    print(f"wrote {json_path}")
    return common.exit_code(out["results"], out["cpu_check"])


if __name__ == "__main__":
    sys.exit(main())
