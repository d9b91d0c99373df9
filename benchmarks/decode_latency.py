"""End-to-end decode latency: ms/token at several context lengths, prefill speed, peak
memory and KV-cache bytes, for mlxq's full-precision KV cache, mlxq's int4 cache and
mlx-lm's QuantizedKVCache (4-bit), all driving the same mlxq model.

    python benchmarks/decode_latency.py                     # default model + 1B-8B shapes
    python benchmarks/decode_latency.py --quick             # smoke test, < 2 min on a CPU

Besides the default model, models are built in memory from the configs of real 1B-8B
models with random weights quantized to 4 bits (no download): their tokens are garbage but
their timings and memory are those of the real shapes. mlx-lm's cache runs inside the same
mlxq model (mlxq's ``attend`` accepts mlx-lm caches), so the caches are the only difference.
"""

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `mlxq` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from benchmarks import common
from mlxq.errors import cli_main

# Shapes from the models' config.json; "tiny" has the default model's attention shape
# (9 query / 3 KV heads of 64) in few layers, for --quick.
RANDOM_CONFIGS = {
    "tiny": dict(model_type="llama", hidden_size=576, num_hidden_layers=4,
                 intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                 vocab_size=8192, rope_theta=100000.0, tie_word_embeddings=True),
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, num_hidden_layers=16,
                         intermediate_size=8192, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256,
                         rope_theta=500000.0, tie_word_embeddings=True),
    "qwen2.5-3b": dict(model_type="qwen2", hidden_size=2048, num_hidden_layers=36,
                       intermediate_size=11008, num_attention_heads=16,
                       num_key_value_heads=2, vocab_size=151936, rope_theta=1000000.0,
                       tie_word_embeddings=True),
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32,
                       intermediate_size=14336, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                       tie_word_embeddings=False),
}
MODELS = ["default", *RANDOM_CONFIGS]
DEFAULT_MODELS = ["default", "llama-3.2-1b", "qwen2.5-3b", "llama-3-8b"]
CONTEXTS = [1024, 4096, 16384]
QUICK_CONTEXTS = [64, 256]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--contexts", type=common.int_list, default=None,
                   help="context lengths, ascending (default: 1024,4096,16384; "
                        "--quick: 64,256)")
    p.add_argument("--models", type=common.str_list, default=None,
                   help=f"{','.join(MODELS)} (default: {','.join(DEFAULT_MODELS)}; "
                        "--quick: tiny)")
    p.add_argument("--decode-tokens", type=int, default=None,
                   help="timed tokens per context (default 32; quick 6)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed decode steps per context (default 2; quick 1)")
    p.add_argument("--prefill-step", type=int, default=512,
                   help="prefill chunk size, as mlxq.generate (default: %(default)s)")
    p.add_argument("--bits", type=int, choices=[4, 8], default=4)
    p.add_argument("--group-size", type=int, choices=[32, 64, 128], default=64)
    p.add_argument("--recent", type=int, default=None,
                   help="mlxq: newest tokens kept in full precision (default: mlxq's, 128)")
    p.add_argument("--sink", type=int, default=None,
                   help="mlxq: first tokens kept in full precision (default: mlxq's, 4)")
    p.add_argument("--weight-bits", type=int, choices=[4, 8], default=4,
                   help="weight quantization of the random models (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in args.models or []:
        if name not in MODELS:
            p.error(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    args.contexts = sorted(set(args.contexts or (QUICK_CONTEXTS if args.quick else CONTEXTS)))
    args.models = args.models or (["tiny"] if args.quick else DEFAULT_MODELS)
    args.decode_tokens = args.decode_tokens or (6 if args.quick else 32)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if args.decode_tokens < 1 or args.warmup < 0 or args.prefill_step < 1:
        p.error("--decode-tokens and --prefill-step must be >= 1, --warmup >= 0")
    if args.quick:
        args.prefill_step = min(args.prefill_step, 128)
    return args


# --- models ---------------------------------------------------------------------------------
def random_model(config: dict, weight_bits: int, dtype, seed: int):
    """A model of ``config``'s shape, random weights quantized like a real 4-bit checkpoint.
    Evaluated layer by layer, so only one layer's float weights exist at a time."""
    from mlxq.models import build_model

    mx.random.seed(seed)
    model = build_model(config)
    nn.quantize(model, group_size=64, bits=weight_bits)
    model.set_dtype(dtype)  # norms and quantization scales in the compute dtype, as loaded
    for module in [model.model.embed_tokens, *model.layers, model]:
        mx.eval(module.parameters())
    return model


def load_model(name: str, args, dtype):
    """(model, description) or raises with why it cannot be had here."""
    if name == "default":
        from mlxq.default_model import default_model_path
        from mlxq.loading import load

        model, _ = load(str(default_model_path()))
        return model, "default model (SmolLM2-135M-Instruct, real weights)"
    config = RANDOM_CONFIGS[name]
    model = random_model(config, args.weight_bits, dtype, args.seed)
    return model, f"{name} shape, random {args.weight_bits}-bit weights"


def weight_bytes(model) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


# --- caches ---------------------------------------------------------------------------------
def cache_paths(args, dtype):
    """(key, label, backend, make_caches(model) or n/a reason), in table order."""
    from mlx_lm.models.cache import QuantizedKVCache as MlxLmQuantizedKVCache

    from mlxq.cache import make_cache

    out = [("fp", f"mlxq KVCache ({common.dtype_name(dtype)})", None,
            lambda m: make_cache(m, kv_bits=16)),
           ("mlx_lm", f"mlx-lm QuantizedKVCache {args.bits}-bit", None,
            lambda m: [MlxLmQuantizedKVCache(group_size=args.group_size, bits=args.bits)
                       for _ in m.layers])]
    for backend in common.mlxq_backends(args):
        label = common.mlxq_label(f"mlxq int{args.bits} KV", backend)
        make = common.backend_unavailable(backend) or (
            lambda m: make_cache(m, kv_bits=args.bits, kv_group_size=args.group_size,
                                 kv_recent=args.recent, kv_sink=args.sink))
        out.append((f"mlxq_{backend}", label, backend, make))
    return out


def cache_arrays(caches):
    """Every array a list of caches holds (mlxq's or mlx-lm's), to evaluate them."""
    held = [[getattr(c, name, None) for name in ("keys", "values", "store", "fp")]
            for c in caches]
    return [a for _, a in tree_flatten(held) if isinstance(a, mx.array)]


# --- one run: prefill to each context, then decode ------------------------------------------
def run_path(model, make_caches, tokens, args):
    """Per context: prefill up to it (continuing the cache), decode, trim the decoded tokens
    off so the next context starts from exactly the prompt. Yields one dict per context."""
    # Warm-up on a throwaway cache: first calls pay for allocation and kernel builds.
    warm = make_caches(model)
    for chunk in (tokens[None, :16], tokens[None, 16:17], tokens[None, 17:18]):
        mx.eval(model(chunk, cache=warm))
    del warm
    caches = make_caches(model)
    done = 0
    prefill_total = 0.0
    for ctx in args.contexts:
        mx.clear_cache()
        mx.reset_peak_memory()
        # Prefill all but the last prompt token in chunks, as mlxq.generate does.
        start = time.perf_counter()
        n_prefill = ctx - 1 - done
        while done < ctx - 1:
            n = min(args.prefill_step, ctx - 1 - done)
            model(tokens[None, done:done + n], cache=caches)
            mx.eval(cache_arrays(caches))
            done += n
        prefill_s = time.perf_counter() - start
        prefill_total += prefill_s

        # Decode pipelined like mlxq.generate: the next step is queued before the current
        # token is read, so a sample is the interval between two tokens becoming ready.
        def step(y):
            return mx.argmax(model(y.reshape(1, -1), cache=caches)[:, -1, :], axis=-1)

        # The first step feeds the prompt's last token; it and `warmup` intervals are untimed.
        n_steps = 1 + args.warmup + args.decode_tokens
        y = step(tokens[ctx - 1:ctx])
        mx.async_eval(y)
        marks = []
        for i in range(n_steps):
            nxt = None
            if i + 1 < n_steps:
                nxt = step(y)
                mx.async_eval(nxt)
            y.item()
            marks.append(time.perf_counter())
            y = nxt
        intervals = [b - a for a, b in zip(marks, marks[1:])][args.warmup:]
        peak = mx.get_peak_memory()
        kv_bytes = sum(c.nbytes for c in caches)
        for c in caches:
            c.trim(n_steps - 1)  # the generated tokens; the prompt's last one stays
        done = ctx
        stats = common.summarize(intervals)
        yield ctx, {"status": "ok", "decode_ms_median": stats["median"],
                    "decode_ms_p10": stats["p10"], "decode_ms_p90": stats["p90"],
                    "decode_tokens": stats["n"], "tokens_per_s": 1e3 / stats["median"],
                    "prefill_tokens": n_prefill, "prefill_s": prefill_s,
                    "prefill_tps": n_prefill / prefill_s if n_prefill else None,
                    "prefill_total_s": prefill_total, "peak_memory_bytes": peak,
                    "kv_bytes": kv_bytes}


def run_model(name, args, dtype) -> list[dict]:
    rows = []
    try:
        model, desc = load_model(name, args, dtype)
    except Exception as e:  # noqa: BLE001
        # The default model may be missing (offline, not installed): n/a. A random model
        # that cannot be built is a bug: error.
        fig = (common.not_available(f"n/a: model not available ({type(e).__name__}: {e})"
                                    .splitlines()[0])
               if name == "default" else common.failed(e))
        return [{"model": name, "model_desc": name, "context": ctx, "path": key,
                 "label": label, **fig}
                for ctx in args.contexts for key, label, _, _ in cache_paths(args, dtype)]
    a = model.args
    base = {"model": name, "model_desc": desc, "layers": len(model.layers),
            "n_q_heads": a.num_attention_heads, "n_kv_heads": model.n_kv_heads,
            "head_dim": model.head_dim, "weight_bytes": weight_bytes(model)}
    # At least 32 tokens: the warm-up in run_path feeds the first 18.
    tokens = mx.random.randint(0, a.vocab_size, (max(32, *args.contexts),),
                               key=mx.random.key(1))
    fp_ms = {}
    for key, label, backend, make in cache_paths(args, dtype):
        if isinstance(make, str):
            rows += [{**base, "context": ctx, "path": key, "label": label,
                      **common.not_available(make)} for ctx in args.contexts]
            continue
        measured = []
        try:
            with common.kernel_backend_env(backend):
                for ctx, fig in run_path(model, make, tokens, args):
                    if key == "fp":
                        fp_ms[ctx] = fig["decode_ms_median"]
                    fig["ratio_vs_fp"] = (fig["decode_ms_median"] / fp_ms[ctx]
                                          if ctx in fp_ms else None)
                    measured.append({**base, "context": ctx, "path": key, "label": label,
                                     **fig})
                    print(f"  {name} ctx {ctx}: {label}: "
                          f"{fig['decode_ms_median']:.2f} ms/token", file=sys.stderr, flush=True)
        except Exception as e:  # noqa: BLE001 - reported, exit code 1
            done = {r["context"] for r in measured}
            measured += [{**base, "context": ctx, "path": key, "label": label,
                          **common.failed(e)} for ctx in args.contexts if ctx not in done]
        rows += measured
        mx.clear_cache()
    del model
    mx.clear_cache()
    return rows


# --- output ---------------------------------------------------------------------------------
def table(results) -> str:
    # One block per model and context, the caches side by side.
    results = sorted(results, key=lambda r: (r["model"], r["context"]))
    headers = ["model", "context", "KV cache", "ms/token", "p10", "p90", "x fp",
               "prefill tok/s", "peak MB", "KV MB"]
    rows = []
    for r in results:
        head = [r["model"], str(r["context"]), r["label"]]
        if r["status"] != "ok":
            rows.append(head + [r["reason"]] + [""] * 6)
            continue
        rows.append(head + [common.fmt(r["decode_ms_median"], ".2f"),
                            common.fmt(r["decode_ms_p10"], ".2f"),
                            common.fmt(r["decode_ms_p90"], ".2f"),
                            common.fmt(r["ratio_vs_fp"], ".2f"),
                            common.fmt(r["prefill_tps"], ".0f"),
                            common.fmt(r["peak_memory_bytes"] / 1e6, ".0f"),
                            common.fmt(r["kv_bytes"] / 1e6, ".1f")])
    return common.format_table(headers, rows)


def plot(path, results, machine):
    panels = {}
    for r in results:
        xs, ys = panels.setdefault(r["model_desc"], {}).setdefault(r["label"], ([], []))
        xs.append(r["context"])
        ys.append(r.get("decode_ms_median"))
    common.plot_panels(path, panels, xlabel="context (tokens)", ylabel="ms per token (median)",
                       title="decode, batch 1\n" + common.machine_title(machine))


@cli_main
def main(argv=None) -> int:
    args = parse_args(argv)
    json_path, png_path = common.output_paths(args, "decode_latency")
    from mlxq.backend import compute_dtype

    machine = common.machine_info()
    dtype = compute_dtype()
    print(f"# {common.machine_title(machine)}", flush=True)
    results = []
    for name in args.models:
        results += run_model(name, args, dtype)

    data = {
        "benchmark": "decode_latency",
        "machine": machine,
        "settings": {"models": args.models, "contexts": args.contexts,
                     "decode_tokens": args.decode_tokens, "warmup": args.warmup,
                     "prefill_step": args.prefill_step, "quick": args.quick,
                     "dtype": common.dtype_name(dtype), "bits": args.bits,
                     "group_size": args.group_size, "weight_bits": args.weight_bits,
                     "batch": 1},
        "results": results,
    }
    common.write_json(json_path, data)
    plot(png_path, results, machine)
    print(table(results))
    print(f"wrote {json_path} and {png_path}")
    return common.exit_code(results)


if __name__ == "__main__":
    sys.exit(main())
