"""Decode attention latency per call: MLX fused SDPA vs mlx-lm's quantized attention vs
mlxq's fused int4 kernel, over context lengths and the head shapes of real models; plus the
per-token cost of appending (quantizing) one token to each cache.

    python benchmarks/attention_latency.py                  # all models, 512..32768
    python benchmarks/attention_latency.py --quick          # smoke test, < 2 min on a CPU

One query token, batch 1, one layer. Every path reads K/V that are already in memory;
"bytes" is the minimum each path must read (the cache in its own format), so GB/s compares
how close each comes to streaming its cache once.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `mlxq` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx

from benchmarks import common
from mlxq.errors import cli_main
from mlxq.kv_config import KVCacheConfig

# name -> (description, query heads, KV heads, head dim)
MODELS = {
    "default": ("SmolLM2-135M (default model)", 9, 3, 64),
    "llama-3-8b": ("Llama-3-8B", 32, 8, 128),
    "qwen2.5-7b": ("Qwen2.5-7B", 28, 4, 128),
    "mistral-7b": ("Mistral-7B", 32, 8, 128),
}
CONTEXTS = [512, 1024, 2048, 4096, 8192, 16384, 32768]
QUICK_CONTEXTS = [256, 1024]
CACHE_STEP = 256  # mlxq's buffers are whole steps; the kernel reads only `length` tokens


def parse_args(argv=None):
    p = common.parser(__doc__)
    common.add_common_args(p)
    p.add_argument("--contexts", type=common.int_list, default=None,
                   help="context lengths (default: 512..32768; --quick: 256,1024)")
    p.add_argument("--models", type=common.str_list, default=None,
                   help=f"head shapes: {','.join(MODELS)} (default: all; --quick: default)")
    p.add_argument("--reps", type=common.positive_int, default=None,
                   help="timed samples (default 50; quick 5)")
    p.add_argument("--warmup", type=common.non_negative_int, default=None,
                   help="untimed calls (default 5; quick 1)")
    p.add_argument("--inner", type=common.positive_int, default=None,
                   help="calls evaluated together per sample (default 8 on Metal, else 1)")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="activation / fp cache dtype (default: mlxq's compute dtype, "
                        "float16 on Metal, float32 on CPU)")
    p.add_argument("--bits", type=int, choices=[4, 8], default=4)
    p.add_argument("--group-size", type=int, choices=[32, 64, 128], default=64)
    args = p.parse_args(argv)
    for name in args.models or []:
        if name not in MODELS:
            p.error(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    args.contexts = args.contexts or (QUICK_CONTEXTS if args.quick else CONTEXTS)
    args.models = args.models or (["default"] if args.quick else list(MODELS))
    if args.reps is None:
        args.reps = 5 if args.quick else 50
    if args.warmup is None:
        args.warmup = 1 if args.quick else 5
    return args


# --- what each path reads -----------------------------------------------------------------
def fp_bytes(kv_heads, length, D, itemsize):
    return 2 * kv_heads * length * D * itemsize


def quantized_bytes(kv_heads, length, D, bits, group_size, scale_itemsize):
    """Codes plus one scale and one bias per group, for K and V."""
    return 2 * kv_heads * length * (D * bits // 8 + 2 * scale_itemsize * D // group_size)


# --- inputs ---------------------------------------------------------------------------------
class Inputs:
    """Random K/V of one layer at one context length, in every path's storage format."""

    def __init__(self, n_q, n_kv, D, length, dtype, bits, group_size, seed=0):
        key = mx.random.key(seed)
        kq, kk, kv = mx.random.split(key, 3)
        self.length = length
        self.scale = D ** -0.5
        self.queries = mx.random.normal((1, n_q, 1, D), key=kq).astype(dtype)
        self.keys = mx.random.normal((1, n_kv, length, D), key=kk).astype(dtype)
        self.values = mx.random.normal((1, n_kv, length, D), key=kv).astype(dtype)
        # mlx-lm quantizes the model-dtype K/V, so its scales are in that dtype.
        self.mlx_lm_k = mx.quantize(self.keys, group_size=group_size, bits=bits)
        self.mlx_lm_v = mx.quantize(self.values, group_size=group_size, bits=bits)
        # mlxq: its cache filled by its own append (whole buffers of whole steps, valid
        # length apart), pure int4: no rotation, no float16 sink or window (keys centered
        # per block, as by default: their centers count in its bytes).
        self.mlxq_config = KVCacheConfig(bits, group_size, rotation=False, recent=0, sink=0)
        self.mlxq_keys, self.mlxq_values = self.keys, self.values
        # What every path should approximate: exact float32 attention, unquantized K/V.
        self.exact = mx.fast.scaled_dot_product_attention(
            self.queries.astype(mx.float32), self.keys.astype(mx.float32),
            self.values.astype(mx.float32), scale=self.scale)
        mx.eval(self.queries, self.keys, self.values, self.mlx_lm_k, self.mlx_lm_v, self.exact)


def sdpa_call(x: Inputs):
    return lambda: mx.fast.scaled_dot_product_attention(
        x.queries, x.keys, x.values, scale=x.scale)


def mlx_lm_call(x: Inputs, bits, group_size):
    from mlx_lm.models.base import quantized_scaled_dot_product_attention

    # It does `queries *= scale`, which rebinds the array object it is given: hand it a
    # fresh view each call, as a model does, or the shared queries shrink on every call.
    return lambda: quantized_scaled_dot_product_attention(
        x.queries.reshape(x.queries.shape), x.mlx_lm_k, x.mlx_lm_v, scale=x.scale, mask=None,
        group_size=group_size, bits=bits)


def mlxq_call(x: Inputs, bits, group_size, backend):
    from mlxq.attention import attend_stored
    from mlxq.quantized_cache import QuantizedKVCache

    cache = QuantizedKVCache(x.mlxq_config, backend=backend)
    cache.append(x.mlxq_keys, x.mlxq_values)
    mx.eval(cache.state)
    return lambda: attend_stored(x.queries, cache, x.scale)


def measure(fn, x: Inputs, nbytes, args, peak_gbps, slow=False) -> dict:
    """Time ``fn``; also its error against exact attention and its achieved bandwidth."""
    out = fn()
    mx.eval(out)
    err = mx.max(mx.abs(out.astype(mx.float32) - x.exact)).item()
    # The emulator interprets the kernel per thread: a couple of samples say all there is.
    reps, warmup, inner = (min(args.reps, 2), 0, 1) if slow else (args.reps, args.warmup,
                                                                   args.inner)
    stats = common.summarize(common.time_call(fn, warmup=warmup, reps=reps, inner=inner))
    gbps = nbytes / (stats["median"] * 1e-3) / 1e9
    return {"status": "ok", "median_ms": stats["median"], "p10_ms": stats["p10"],
            "p90_ms": stats["p90"], "min_ms": stats["min"], "samples": stats["n"],
            "inner": inner, "bytes": nbytes, "gbps": gbps,
            "peak_fraction": gbps / peak_gbps if peak_gbps else None,
            "max_abs_err_vs_exact": err}


def paths(args, dtype):
    """(key, label, backend or None) for each path, in table order."""
    out = [("sdpa", f"MLX SDPA ({common.dtype_name(dtype)})", None),
           ("mlx_lm", f"mlx-lm quantized {args.bits}-bit", None)]
    for backend in common.mlxq_backends(args):
        out.append((f"mlxq_{backend}", common.mlxq_label(f"mlxq int{args.bits}", backend),
                    backend))
    return out


def run_attention(args, dtype, peak_gbps) -> list[dict]:
    results = []
    for model in args.models:
        desc, n_q, n_kv, D = MODELS[model]
        for length in args.contexts:
            x = Inputs(n_q, n_kv, D, length, dtype, args.bits, args.group_size)
            row_base = {"model": model, "model_desc": desc, "n_q_heads": n_q,
                        "n_kv_heads": n_kv, "head_dim": D, "context": length}
            baseline = None
            for key, label, backend in paths(args, dtype):
                if key == "sdpa":
                    fig = measure(sdpa_call(x), x, fp_bytes(n_kv, length, D, dtype.size),
                                  args, peak_gbps)
                    baseline = fig["median_ms"]
                elif key == "mlx_lm":
                    nbytes = quantized_bytes(n_kv, length, D, args.bits, args.group_size,
                                             dtype.size)
                    fig = measure(mlx_lm_call(x, args.bits, args.group_size), x, nbytes,
                                  args, peak_gbps)
                else:
                    reason = common.backend_unavailable(backend)
                    if reason:
                        fig = common.not_available(reason)
                    else:
                        from mlxq.kernels.decode_attention import bytes_read

                        nbytes = bytes_read(1, n_kv, length, 0, D, args.bits,
                                            args.group_size, x.mlxq_config.key_center)
                        try:
                            fig = measure(mlxq_call(x, args.bits, args.group_size, backend),
                                          x, nbytes, args, peak_gbps,
                                          slow=backend == "emulate")
                        except Exception as e:  # noqa: BLE001 - reported, exit code 1
                            fig = common.failed(e)
                if fig["status"] == "ok":
                    fig["ratio_vs_sdpa"] = fig["median_ms"] / baseline
                results.append({**row_base, "path": key, "label": label, **fig})
                print(f"  {model} ctx {length}: {label}: "
                      f"{common.fmt(fig.get('median_ms')) or fig.get('reason')}",
                      file=sys.stderr, flush=True)
            del x
    return results


# --- append (quantize-on-write) cost per token ---------------------------------------------
def append_calls(args, n_kv, D, dtype, capacity):
    """(key, label, backend, fn or n/a reason) for appending one token of one layer."""
    from mlx_lm.models.cache import QuantizedKVCache as MlxLmQuantizedKVCache

    from mlxq.cache import KVCache

    k = mx.random.normal((1, n_kv, 1, D)).astype(dtype)
    v = mx.random.normal((1, n_kv, 1, D)).astype(dtype)
    mx.eval(k, v)

    def via_update_and_fetch(cache):
        cache.update_and_fetch(mx.zeros((1, n_kv, capacity, D), dtype),
                               mx.zeros((1, n_kv, capacity, D), dtype))
        cache.trim(1)
        mx.eval(cache.keys, cache.values)

        def fn():
            cache.update_and_fetch(k, v)
            cache.trim(1)  # next call writes the same slot: no growth, no drift
            return cache.keys, cache.values
        return fn

    calls = [("fp", f"mlxq KVCache ({common.dtype_name(dtype)})", None,
              via_update_and_fetch(KVCache(dtype=dtype))),
             ("mlx_lm", f"mlx-lm QuantizedKVCache {args.bits}-bit", None,
              via_update_and_fetch(MlxLmQuantizedKVCache(args.group_size, args.bits)))]
    for backend in common.mlxq_backends(args):
        label = common.mlxq_label(f"mlxq append int{args.bits}", backend)
        reason = common.backend_unavailable(backend)
        if reason:
            calls.append((f"mlxq_{backend}", label, backend, reason))
            continue
        from mlxq.quantized_cache import QuantizedKVCache

        # The cache's own append with the default options: one kernel (rotation, float16
        # row), one slice write into the window ring, one launch quantizing the window's
        # oldest token in place and one slice write into the store (its row).
        cache = QuantizedKVCache(KVCacheConfig(args.bits, args.group_size), backend=backend)
        cache.append(mx.zeros((1, n_kv, capacity - 1, D), dtype),
                     mx.zeros((1, n_kv, capacity - 1, D), dtype))
        mx.eval(cache.state)

        def append_one(cache=cache):
            cache.append(k, v)
            cache.trim(1)  # next call writes the same slots: no growth, no drift
            return cache.store, cache.fp
        calls.append((f"mlxq_{backend}", label, backend, append_one))
    return calls


def run_append(args, dtype) -> list[dict]:
    results = []
    capacity = -(-max(args.contexts) // CACHE_STEP) * CACHE_STEP
    for model in args.models:
        desc, _, n_kv, D = MODELS[model]
        for key, label, backend, fn in append_calls(args, n_kv, D, dtype, capacity):
            row = {"model": model, "model_desc": desc, "n_kv_heads": n_kv, "head_dim": D,
                   "capacity": capacity, "path": key, "label": label}
            if isinstance(fn, str):
                results.append({**row, **common.not_available(fn)})
                continue
            slow = backend == "emulate"
            # inner=1: several pending writes would each hold a version of the buffer and
            # turn the in-place updates into copies.
            try:
                stats = common.summarize(common.time_call(
                    fn, warmup=1 if slow else args.warmup,
                    reps=min(args.reps, 2) if slow else args.reps, inner=1), unit=1e6)
            except Exception as e:  # noqa: BLE001 - reported, exit code 1
                results.append({**row, **common.failed(e)})
                continue
            results.append({**row, "status": "ok", "median_us": stats["median"],
                            "p10_us": stats["p10"], "p90_us": stats["p90"],
                            "samples": stats["n"]})
    return results


def add_append_ratios(results, appends) -> None:
    """``ratio_with_append``: (attention + append of one token) / (SDPA + fp append), the
    per-layer, per-token cost a cache pays at decode, comparable across caches."""
    append_ms = {(a["model"], a["path"]): a["median_us"] / 1e3
                 for a in appends if a["status"] == "ok"}
    base = {(r["model"], r["context"]): r["median_ms"] + append_ms[(r["model"], "fp")]
            for r in results if r["path"] == "sdpa" and (r["model"], "fp") in append_ms}
    for r in results:
        key = (r["model"], "fp" if r["path"] == "sdpa" else r["path"])
        if r["status"] == "ok" and key in append_ms and (r["model"], r["context"]) in base:
            r["ratio_with_append"] = ((r["median_ms"] + append_ms[key])
                                      / base[(r["model"], r["context"])])


# --- output ---------------------------------------------------------------------------------
def attention_table(results) -> str:
    headers = ["model", "context", "path", "median ms", "p10", "p90", "x SDPA",
               "x SDPA+app", "MB read", "GB/s", "% peak", "max err"]
    rows = []
    for r in results:
        if r["status"] != "ok":
            rows.append([r["model"], str(r["context"]), r["label"], r["reason"]]
                        + [""] * 8)
            continue
        rows.append([r["model"], str(r["context"]), r["label"], common.fmt(r["median_ms"]),
                     common.fmt(r["p10_ms"]), common.fmt(r["p90_ms"]),
                     common.fmt(r.get("ratio_vs_sdpa"), ".2f"),
                     common.fmt(r.get("ratio_with_append"), ".2f"),
                     common.fmt(r["bytes"] / 1e6, ".2f"), common.fmt(r["gbps"], ".1f"),
                     common.fmt(r["peak_fraction"] and 100 * r["peak_fraction"], ".0f"),
                     common.fmt(r["max_abs_err_vs_exact"], ".1e")])
    return common.format_table(headers, rows)


def append_table(results) -> str:
    headers = ["model", "cache", "median us/token/layer", "p10", "p90"]
    rows = [[r["model"], r["label"]] + ([r["reason"], "", ""] if r["status"] != "ok" else
            [common.fmt(r["median_us"], ".1f"), common.fmt(r["p10_us"], ".1f"),
             common.fmt(r["p90_us"], ".1f")]) for r in results]
    return common.format_table(headers, rows)


def plot(path, results, machine):
    panels = {}
    for r in results:
        name = f"{r['model_desc']} ({r['n_q_heads']}q/{r['n_kv_heads']}kv, d{r['head_dim']})"
        xs, ys = panels.setdefault(name, {}).setdefault(r["label"], ([], []))
        xs.append(r["context"])
        ys.append(r.get("median_ms"))
    common.plot_panels(path, panels, xlabel="context (tokens)", ylabel="ms per call (median)",
                       title="decode attention, batch 1, one layer\n"
                             + common.machine_title(machine))


@cli_main
def main(argv=None) -> int:
    args = parse_args(argv)
    common.check_environment()
    json_path, png_path = common.output_paths(args, "attention_latency")
    from mlxq.backend import compute_dtype

    machine = common.machine_info()
    dtype = getattr(mx, args.dtype) if args.dtype else compute_dtype()
    if args.inner is None:
        args.inner = 8 if machine["metal"] and not args.quick else 1
    peak = common.resolve_peak(args, machine)
    print(f"# {common.machine_title(machine)}", flush=True)
    results = run_attention(args, dtype, peak["gbps"])
    appends = run_append(args, dtype)
    add_append_ratios(results, appends)

    data = {
        "benchmark": "attention_latency",
        "machine": machine,
        "settings": {"models": args.models, "contexts": args.contexts, "reps": args.reps,
                     "warmup": args.warmup, "inner": args.inner, "quick": args.quick,
                     "dtype": common.dtype_name(dtype), "bits": args.bits,
                     "group_size": args.group_size, "peak_gbps": peak["gbps"],
                     "peak_source": peak["source"], "batch": 1, "query_tokens": 1},
        "attention": results,
        "append": appends,
    }
    common.write_outputs(json_path, png_path, data, lambda path: plot(path, results, machine))
    print(attention_table(results))
    print()
    print(append_table(appends))
    print(f"\npeak bandwidth: {common.fmt(peak['gbps'], '.0f') or 'unknown'} "
          f"({peak['source']})")
    print(f"wrote {json_path} and {png_path}")
    return common.exit_code(results, appends)


if __name__ == "__main__":
    sys.exit(main())
