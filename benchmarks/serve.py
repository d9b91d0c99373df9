"""Serving: total tokens/s and per-stream latency of mlxq.server at 1, 4 and 16 concurrent
streams, and how many concurrent 8K-token sessions fit in a KV memory budget, for the
full-precision KV cache and the int4 one.

    python benchmarks/serve.py                  # default model, 1/4/16 streams, 8K sessions
    python benchmarks/serve.py --quick          # smoke test: default model cut to 2 layers

The server runs in this process on a free 127.0.0.1 port and is driven over HTTP by one
client thread per stream (streamed chat completions, temperature 0, prefix cache off so
every request computes its whole prompt). A stream sends ``--requests`` requests one after
the other. Per request: time to first token and decode ms/token (first to last token over
completion_tokens - 1).

Decode step: the server's ``BatchDecoder.step`` alone (no HTTP, no prefill in between),
ms per step with B sequences of different prompt lengths, as one batched forward and as one
forward per sequence (the step before batching), alternated in rounds so both see the same
machine load; tokens/s = B / step time.

Sessions: a cache of each type is filled with ``--session-tokens`` tokens (random keys and
values through the cache's own append path, see ``measure_session``) and its bytes
measured; "fit" is how many such sessions the server admits in each budget, by its
admission accounting (an upper bound per session, checked >= the measured bytes).
"""

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `mlxq` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx

from benchmarks import common
from mlxq.errors import cli_main

STREAMS = [1, 4, 16]
BUDGETS_GB = [2, 4, 8, 16]
TOPICS = ["a robot", "the sea", "a city at night", "an old map", "a small cat", "the moon",
          "a train", "winter", "a garden", "a library", "a storm", "a violin", "a desert",
          "a lighthouse", "a market", "a mountain"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_output_args(p, "smoke test: 2-layer model, short requests, 1K-token sessions")
    p.add_argument("--streams", type=common.int_list, default=None,
                   help="concurrent streams (default: 1,4,16; --quick: 1,4)")
    p.add_argument("--requests", type=int, default=None,
                   help="requests per stream (default 2; quick 1)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="completion tokens per request (default 64; quick 8)")
    p.add_argument("--session-tokens", type=int, default=None,
                   help="tokens of one session (default 8192; quick 1024)")
    p.add_argument("--budgets", type=common.int_list, default=None,
                   help="KV memory budgets in GB (default: 2,4,8,16)")
    p.add_argument("--step-batches", type=common.int_list, default=None,
                   help="batch sizes of the decode-step measurement (default: --streams)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed decode steps per mode and round (default 4; quick 2)")
    p.add_argument("--layers", type=int, default=None,
                   help="use only the model's first N layers (default: all; quick: 2)")
    args = p.parse_args(argv)
    args.streams = args.streams or ([1, 4] if args.quick else STREAMS)
    args.requests = args.requests or (1 if args.quick else 2)
    args.max_tokens = args.max_tokens or (8 if args.quick else 64)
    args.session_tokens = args.session_tokens or (1024 if args.quick else 8192)
    args.budgets = args.budgets or BUDGETS_GB
    args.layers = args.layers or (2 if args.quick else None)
    args.step_batches = args.step_batches or args.streams
    args.steps = args.steps or (2 if args.quick else 4)
    if min(args.requests, args.max_tokens, args.session_tokens, args.steps) < 1:
        p.error("--requests, --max-tokens, --session-tokens and --steps must be >= 1")
    return args


def kv_paths(machine) -> list[tuple[str, str, dict]]:
    """(key, label, kv options); the int4 path is named by the backend that runs it."""
    fp = f"full-precision KV ({machine['compute_dtype']})"
    return [("fp", fp, {"kv_bits": 16}),
            ("int4", common.mlxq_label("int4 KV", machine["mlxq_backend"]), {"kv_bits": 4})]


# --- throughput and latency -----------------------------------------------------------------
def _one_request(client, url, body) -> dict:
    start = time.perf_counter()
    first = last = None
    tokens = 0
    with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:200]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            if event["choices"] and event["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
    if first is None:
        raise RuntimeError("no text came back")
    return {"ttft_s": first - start, "tokens": tokens,
            "ms_per_token": (last - first) * 1e3 / (tokens - 1) if tokens > 1 else None}


def measure_streams(server, n_streams: int, args) -> dict:
    import httpx

    from mlxq.server.background import running

    results, errors = [], []
    with running(server) as url:
        def stream(k):
            with httpx.Client(timeout=600) as client:
                for i in range(args.requests):
                    topic = TOPICS[(k + i * n_streams) % len(TOPICS)]
                    body = {"messages": [{"role": "user", "content":
                                          f"Write a long story about {topic} ({k}, {i})."}],
                            "max_tokens": args.max_tokens, "temperature": 0, "stream": True,
                            "stream_options": {"include_usage": True}}
                    try:
                        results.append(_one_request(client, url, body))
                    except Exception as e:  # noqa: BLE001 - recorded, exit code 1
                        errors.append(e)

        # Warm-up: the first request pays for graph and kernel builds.
        stream(-1)
        results.clear()
        start = time.perf_counter()
        threads = [threading.Thread(target=stream, args=(k,)) for k in range(n_streams)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
    if errors:
        raise errors[0]
    tokens = sum(r["tokens"] for r in results)
    per_token = [r["ms_per_token"] for r in results if r["ms_per_token"] is not None]
    return {"status": "ok", "requests": len(results), "completion_tokens": tokens,
            "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttft_ms_median": statistics.median(r["ttft_s"] for r in results) * 1e3,
            "ms_per_token_median": statistics.median(per_token) if per_token else None}


# --- the decode step alone ------------------------------------------------------------------
def measure_decode_step(model, kv: dict, batch: int, steps: int, rounds: int = 3) -> dict:
    """Median ms per ``BatchDecoder.step`` over ``batch`` sequences, batched vs per sequence
    (the same prefilled prompts, fresh caches for each mode and round)."""
    from mlxq.cache import copy_caches, make_cache
    from mlxq.generate import prefill_chunks
    from mlxq.sampling import make_sampler
    from mlxq.server.scheduler import BatchDecoder, Sequence

    prompts = [[(7 * i + 3 * b) % 1000 + 10 for i in range(16 + 3 * b)] for b in range(batch)]
    prefilled = []  # prefilled once; each mode and round decodes from copies
    for ids in prompts:
        caches = make_cache(model, **kv)
        for _ in prefill_chunks(model, ids, caches, 512):
            pass
        prefilled.append(caches)
    times = {"batched": [], "per_sequence": []}
    for _ in range(rounds):
        for mode in times:
            decoder = BatchDecoder(model, kv)
            decoder.batched = decoder.batched and mode == "batched"
            seqs = [Sequence(i, None, None, caches=copy_caches(caches),
                             last=mx.array(ids[-1:]), sampler=make_sampler())
                    for i, (ids, caches) in enumerate(zip(prompts, prefilled))]
            for n in range(steps + 1):  # the first step (joining, graph setup) untimed
                start = time.perf_counter()
                for s, (token, _) in zip(seqs, decoder.step(seqs)):
                    s.last = mx.array([token])
                if n:
                    times[mode].append(time.perf_counter() - start)
            del decoder, seqs
            mx.clear_cache()
    out = {"status": "ok", "batch": batch}
    for mode, t in times.items():
        ms = statistics.median(t) * 1e3
        out[f"{mode}_ms_per_step"], out[f"{mode}_tokens_per_s"] = ms, batch * 1e3 / ms
    return out


# --- sessions in a budget ---------------------------------------------------------------------
def measure_session(model, kv: dict, tokens: int, chunk: int = 512) -> dict:
    """Bytes of one cache holding ``tokens`` tokens, filled through ``mlxq.attention.attend``
    (the append path a prefill takes, chunk by chunk) with random keys/values and a single
    query per chunk: the bytes do not depend on the values, and a real
    8K-token prefill of the whole model takes most of an hour on a 2-core CPU."""
    from mlxq.attention import attend
    from mlxq.cache import cache_nbytes, make_cache
    from mlxq.server.scheduler import BatchDecoder

    heads, kv_heads, dim = model.args.num_attention_heads, model.n_kv_heads, model.head_dim
    caches = make_cache(model, **kv)
    key = mx.random.key(0)
    start = time.perf_counter()
    for done in range(0, tokens, chunk):
        n = min(chunk, tokens - done)
        key, k1, k2, k3 = mx.random.split(key, 4)
        k = mx.random.normal((1, kv_heads, n, dim), key=k1)
        v = mx.random.normal((1, kv_heads, n, dim), key=k2)
        q = mx.random.normal((1, heads, 1, dim), key=k3)
        mx.eval([attend(q, k, v, c, dim ** -0.5) for c in caches])
    fill_s = time.perf_counter() - start
    measured = cache_nbytes(caches)
    if any(c.offset != tokens for c in caches):
        raise RuntimeError(f"a cache holds {caches[0].offset} tokens, not {tokens}")
    del caches
    mx.clear_cache()
    return {"measured_bytes": measured, "fill_s": fill_s,
            "admission_bytes": BatchDecoder(model, kv).kv_bytes([tokens])}


# --- output ---------------------------------------------------------------------------------
def table(rows, sessions, steps=()) -> str:
    headers = ["KV cache", "streams", "tokens/s", "TTFT ms", "ms/token/stream", "requests"]
    body = [[r["label"], str(r["streams"]), common.fmt(r.get("tokens_per_s"), ".1f"),
             common.fmt(r.get("ttft_ms_median"), ".0f"),
             common.fmt(r.get("ms_per_token_median"), ".1f"),
             str(r.get("requests", "")) if r["status"] == "ok" else r["reason"]]
            for r in rows]
    out = common.format_table(headers, body)
    headers = ["KV cache", "session tokens", "MB/session measured", "MB/session admitted",
               *(f"fit in {gb} GB" for gb in (sessions[0]["fit"] if sessions else []))]
    body = [[s["label"], str(s["session_tokens"]), common.fmt(s["measured_bytes"] / 1e6, ".1f"),
             common.fmt(s["admission_bytes"] / 1e6, ".1f"),
             *[str(n) for n in s["fit"].values()]] for s in sessions]
    out += "\n\n" + common.format_table(headers, body)
    if steps:
        headers = ["KV cache", "batch", "ms/step batched", "ms/step per sequence",
                   "tokens/s batched", "tokens/s per sequence"]
        body = [[r["label"], str(r["batch"]), common.fmt(r.get("batched_ms_per_step"), ".0f"),
                 common.fmt(r.get("per_sequence_ms_per_step"), ".0f"),
                 common.fmt(r.get("batched_tokens_per_s"), ".1f"),
                 common.fmt(r.get("per_sequence_tokens_per_s"), ".1f")] for r in steps]
        out += "\n\n" + common.format_table(headers, body)
    return out


def plot(path, rows, sessions, machine, model_desc):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    panels = [("total tokens/s", "tokens_per_s"), ("per-stream decode ms/token (median)",
                                                   "ms_per_token_median")]
    for ax, (ylabel, key) in zip(axes, panels):
        for label in dict.fromkeys(r["label"] for r in rows):
            pts = [(r["streams"], r[key]) for r in rows
                   if r["label"] == label and r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["streams"] for r in rows}),
                      [str(s) for s in sorted({r["streams"] for r in rows})])
        ax.minorticks_off()
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes[2]
    for s in sessions:
        budgets = list(s["fit"])
        ax.plot(budgets, list(s["fit"].values()), marker="o", label=s["label"])
    if sessions:
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.minorticks_off()
        ax.set_title(f"{sessions[0]['session_tokens']}-token sessions", fontsize=9)
    ax.set_xlabel("KV memory budget (GB)")
    ax.set_ylabel("concurrent sessions admitted")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(f"mlxq.server, {model_desc}\n{common.machine_title(machine)}, "
                 f"mlxq backend: {machine['mlxq_backend']}", fontsize=9)
    fig.tight_layout()
    from mlxq.output_files import replacing

    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


@cli_main
def main(argv=None) -> int:
    args = parse_args(argv)
    json_path, png_path = common.output_paths(args, "serve")
    from mlxq.default_model import default_model_path
    from mlxq.loading import load
    from mlxq.server import create_server
    from mlxq.server.scheduler import BatchDecoder

    machine = common.machine_info()
    print(f"# {common.machine_title(machine)}", flush=True)
    model, tokenizer = load(str(default_model_path()))
    if args.layers:
        model.model.layers = model.model.layers[:args.layers]
    model_desc = (f"default model (SmolLM2-135M-Instruct, {len(model.layers)} layers"
                  f"{' of 30' if args.layers else ''})")
    rows, sessions, steps = [], [], []
    for key, label, kv in kv_paths(machine):
        for n in args.streams:
            server = create_server(model, tokenizer, "bench", kv_options=kv,
                                   max_kv_bytes=8 * 10**9, prompt_cache_size=0,
                                   decode_concurrency=max(args.streams))
            try:
                fig = measure_streams(server, n, args)
            except Exception as e:  # noqa: BLE001 - recorded, exit code 1
                fig = common.failed(e)
            rows.append({"path": key, "label": label, "streams": n, **fig})
            print(f"  {label}, {n} streams: {fig.get('tokens_per_s', 0):.1f} tokens/s",
                  file=sys.stderr, flush=True)
        for b in args.step_batches:
            try:
                fig = measure_decode_step(model, kv, b, args.steps)
            except Exception as e:  # noqa: BLE001 - recorded, exit code 1
                fig = common.failed(e)
            steps.append({"path": key, "label": label, "batch": b, **fig})
            print(f"  {label}, decode step of {b}: {fig.get('batched_ms_per_step', 0):.0f} ms "
                  f"batched, {fig.get('per_sequence_ms_per_step', 0):.0f} ms per sequence",
                  file=sys.stderr, flush=True)
        s = measure_session(model, kv, args.session_tokens)
        s["fit"] = {gb: int(gb * 10**9 // s["admission_bytes"]) for gb in args.budgets}
        sessions.append({"path": key, "label": label, "session_tokens": args.session_tokens,
                         **s})
    data = {"benchmark": "serve", "machine": machine,
            "settings": {"model": model_desc, "streams": args.streams,
                         "requests_per_stream": args.requests, "max_tokens": args.max_tokens,
                         "session_tokens": args.session_tokens, "budgets_gb": args.budgets,
                         "quick": args.quick, "prefix_cache": False,
                         "step_batches": args.step_batches, "timed_steps": args.steps,
                         "batch_decode": {key: "one (B, 1) forward per step"
                                          if BatchDecoder(model, kv).batched else
                                          "one forward per sequence per step"
                                          for key, _, kv in kv_paths(machine)}},
            "results": rows, "decode_step": steps, "sessions": sessions}
    common.write_json(json_path, data)
    plot(png_path, rows, sessions, machine, model_desc)
    print(table(rows, sessions, steps))
    print(f"wrote {json_path} and {png_path}")
    return common.exit_code(rows, steps)


if __name__ == "__main__":
    sys.exit(main())
