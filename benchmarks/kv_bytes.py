"""KV-cache bytes of a sliding-window model (Gemma 3) with mlxq's caches vs float16.

For each context length, the caches ``mlxq.cache.make_cache`` gives the model (sliding
layers: a full-precision window cache; global layers: the int4/int8 cache) are filled to
that many tokens and their ``nbytes`` summed, against two float16 baselines:

- ``fp16_full``: every layer keeps every token (a cache without sliding windows);
- ``fp16_mlx_lm``: mlx-lm's default for the model (RotatingKVCache on sliding layers).

Sliding-window caches are weighed as float16 (what they hold on the GPU; the CPU backend
computes in float32). Filling does not run a 32K-token prefill: the quantized caches get
the tokens through their write path (``append``) without attention, the window caches
their last ``window`` tokens; every figure is the caches' own ``nbytes``.

    python benchmarks/kv_bytes.py                      # Gemma-3-270M's shapes, 4K and 32K
    python benchmarks/kv_bytes.py --model PATH --contexts 4096,32768 --json out.json
"""

import argparse
import json
import sys
from pathlib import Path

import mlx.core as mx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mlxq.cache import KVCache, cache_device_nbytes, cache_format_name, make_cache  # noqa: E402
from mlxq.models import build_model  # noqa: E402

# Gemma-3-270M (from its GGUF's metadata), with hidden/FFN/vocab shrunk: the KV cache
# depends only on layers, KV heads, head_dim, window and pattern.
GEMMA3_270M = {
    "model_type": "gemma3_text", "num_hidden_layers": 18, "num_attention_heads": 4,
    "num_key_value_heads": 1, "head_dim": 256, "sliding_window": 512,
    "sliding_window_pattern": 6, "hidden_size": 64, "intermediate_size": 64,
    "vocab_size": 64, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-6,
}


def _shrunk(config: dict) -> dict:
    return {**config, "hidden_size": 64, "intermediate_size": 64, "vocab_size": 64}


def _kv(n_kv, n, d, key):
    return mx.random.normal((1, n_kv, n, d), key=mx.random.key(key)).astype(mx.float16)


def _fill_quantized(cache, tokens, n_kv, d):
    """Store ``tokens`` tokens in a quantized cache without computing attention."""
    for start in range(0, tokens, 4096):  # the cache's own write path
        n = min(4096, tokens - start)
        cache.append(_kv(n_kv, n, d, 2 * start), _kv(n_kv, n, d, 2 * start + 1))
    mx.eval(cache.state)


def _fill_fp(cache, tokens, n_kv, d):
    """A full-precision cache (mlxq's or a window): store the tokens it would keep."""
    keep = min(tokens, getattr(cache, "max_size", tokens))
    cache.update_and_fetch(_kv(n_kv, keep - 1, d, 9), _kv(n_kv, keep - 1, d, 10))
    cache.update_and_fetch(_kv(n_kv, 1, d, 11), _kv(n_kv, 1, d, 12))
    mx.eval(cache.keys, cache.values)


def measure(config: dict, tokens: int, kv_bits: int = 4, kv_key_bits: int | None = None) -> dict:
    """``kv_key_bits`` None: the model's default (Gemma 3: 8-bit keys under int4)."""
    model = build_model(_shrunk(config))
    n_kv, d = config["num_key_value_heads"], config["head_dim"]
    caches = make_cache(model, kv_bits=kv_bits, kv_key_bits=kv_key_bits)
    for c in caches:
        if isinstance(c, KVCache) or hasattr(c, "max_size"):
            _fill_fp(c, tokens, n_kv, d)
        else:
            _fill_quantized(c, tokens, n_kv, d)
    ours = cache_device_nbytes(caches)
    baseline = make_cache(model)  # 16 bits: windows on sliding layers, KVCache elsewhere
    for c in baseline:
        _fill_fp(c, tokens, n_kv, d)
    mlx_lm_like = cache_device_nbytes(baseline)
    full_layer = KVCache(dtype=mx.float16)
    _fill_fp(full_layer, tokens, n_kv, d)
    full = cache_device_nbytes([full_layer]) * len(caches)
    return {"tokens": tokens, "kv_bits": kv_bits, "format": cache_format_name(caches),
            "bytes": ours, "fp16_full": full,
            "fp16_mlx_lm": mlx_lm_like, "ratio_vs_fp16_full": ours / full,
            "ratio_vs_fp16_mlx_lm": ours / mlx_lm_like,
            "layers": [type(c).__name__ for c in caches]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a model folder whose config.json to use "
                   "(default: Gemma-3-270M's shapes)")
    p.add_argument("--contexts", default="4096,32768", help="comma-separated token counts")
    p.add_argument("--kv-bits", type=int, choices=[4, 8], default=4)
    p.add_argument("--kv-key-bits", type=int, choices=[4, 8], default=None,
                   help="the keys' bits (default: the model's, Gemma 3: 8 under --kv-bits 4)")
    p.add_argument("--json", help="also write the results here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    config = GEMMA3_270M
    if args.model:
        config = json.loads((Path(args.model) / "config.json").read_text())
    rows = [measure(config, int(n), args.kv_bits, args.kv_key_bits)
            for n in args.contexts.split(",")]
    print(f"KV cache of the quantized layers: {rows[0]['format']}")
    print(f"{'tokens':>8} {'mlxq MB':>9} {'fp16 full MB':>13} {'fp16 mlx-lm MB':>15} "
          f"{'vs full':>8} {'vs mlx-lm':>10}")
    for r in rows:
        print(f"{r['tokens']:>8} {r['bytes'] / 1e6:>9.2f} {r['fp16_full'] / 1e6:>13.2f} "
              f"{r['fp16_mlx_lm'] / 1e6:>15.2f} {r['ratio_vs_fp16_full']:>8.3f} "
              f"{r['ratio_vs_fp16_mlx_lm']:>10.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
