"""Attention error of KV formats at long context, per layer, in minutes instead of hours.

A design instrument for KV formats: it runs the model ONCE over a window of text with a
full-precision cache, recording every layer's queries, keys and values (after RoPE), then
for each format quantizes the recorded keys/values exactly as the cache's write path does
(rotation, float16 rounding, ``kv_layout.quantize_groups``) and compares, for the last ``--queries``
positions, each layer's attention with the exact one:

- ``kl``: KL(exact || quantized) of the attention weights (keys only: values do not move
  them), averaged over query heads and positions;
- ``err``: relative L2 error of the attention output (keys and values).

Tokens in a format's sink and window stay exact, as in the cache. The figures are not
perplexity: an error in one layer also moves the inputs of the next, which this does not
follow; ``python -m mlxq.evaluate`` measures that, at ~20x the cost. Use this one to rank
ideas, then evaluate the survivors.

Formats are ``mlxq.evaluate`` names (``int4-g64-rot-kc-w304-s4``): those go through the
cache's own write path (a reference-backend ``QuantizedKVCache`` fed in 512-token chunks,
key centering included). Formats without ``-kc`` take optional experimental suffixes, for
quantizers the cache does not have:

- ``+mse``:    each group's range shrunk around its midpoint by the factor (1.0, 0.98, ...,
               0.70) that minimizes the group's squared error (same bytes);
- ``+kg32``:   keys quantized in groups of 32 (values keep the format's group);
- ``+kcenter``: keys minus their per-channel mean over the whole window before quantizing
               (exact for attention; an upper bound, as a cache cannot know that mean);
- ``+kblock``: keys of each block of 64 tokens minus the per-channel mean of the previous
               block's keys (known when the block's tokens arrive: they are still in the
               float16 window); a cache would store one mean per block, 2 bytes a token.

    python benchmarks/kv_attention_error.py --context 4096 --queries 512 \\
        --formats int4-g64-rot-w256-s4 int4-g64-rot-w256-s4+mse int4-g64-rot-w128-s4
"""

import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mlxq import attention as attention_module  # noqa: E402
from mlxq.cache import make_cache  # noqa: E402
from mlxq.errors import ArgumentParser, MlxqError, cli_main  # noqa: E402
from mlxq.kernels.kv_append import reference_append_rows  # noqa: E402
from mlxq.kernels.kv_layout import dequantize_rows  # noqa: E402
from mlxq.kv_config import KVCacheConfig  # noqa: E402
from mlxq.mlx_lm_bridge import LayerCache  # noqa: E402
from mlxq.models import transformer  # noqa: E402
from mlxq.output_files import check_output_file, write_text_file  # noqa: E402
from mlxq.quantized_cache import QuantizedKVCache  # noqa: E402
from mlxq.rotation import HadamardRotation  # noqa: E402

MODIFIERS = ("mse", "kg32", "kcenter", "kblock")
BLOCK = 64  # tokens per block of +kblock
MSE_SHRINK = np.linspace(1.0, 0.70, 16)


def parse(name: str):
    """'int4-g64-rot-w256-s4+mse' -> (KVCacheConfig, {'mse'})."""
    from mlxq.evaluate import parse_format

    base, *mods = name.split("+")
    unknown = set(mods) - set(MODIFIERS)
    if unknown:
        raise MlxqError(f"unknown suffix +{sorted(unknown)[0]} in {name!r}; use "
                        + ", ".join("+" + m for m in MODIFIERS))
    fmt = parse_format(base)
    if mods and fmt.key_center:
        raise MlxqError(f"{name!r}: the experimental suffixes apply to formats without -kc "
                        "(the cache's own key centering)")
    return fmt, set(mods)


# --- recording ----------------------------------------------------------------------
def record_attention(model, tokens, chunk: int = 512) -> dict:
    """{layer: (q, k, v)} float32 arrays (heads, tokens, head_dim) of one sequence, from a
    full-precision run in chunks; only layers that a quantized cache would hold. Queries
    are recorded at the attention call; keys and values are what the caches hold after."""
    caches = make_cache(model, KVCacheConfig(16))
    quantizable = {i for i, c in enumerate(make_cache(model, KVCacheConfig(4)))
                   if isinstance(c, QuantizedKVCache)}
    layer_of = {id(c): i for i, c in enumerate(caches)}
    queries: dict = {}

    def keep(cache, q):
        i = layer_of.get(id(cache))
        if i in quantizable:
            queries.setdefault(i, []).append(np.array(q[0].astype(mx.float32)))

    originals = transformer.attend, attention_module.attend, LayerCache.attend

    def recording_attend(q, keys, values, cache=None, scale=1.0, *rest):
        keep(cache, q)
        return originals[1](q, keys, values, cache, scale, *rest)

    def recording_layer_attend(self, q, *rest):
        keep(self.cache, q)
        return originals[2](self, q, *rest)

    # mlxq's models call the one attention entry point (imported by name); mlx-lm models
    # reach mlxq's caches through the bridge's per-layer view.
    transformer.attend = attention_module.attend = recording_attend
    LayerCache.attend = recording_layer_attend
    try:
        ids = mx.array([list(tokens)])
        for a in range(0, len(tokens), chunk):
            mx.eval(model(ids[:, a:a + chunk], cache=caches))
    finally:
        transformer.attend, attention_module.attend, LayerCache.attend = originals
    T = len(tokens)
    return {i: (np.concatenate(queries[i], axis=1),
                *(np.array(x[0, :, :T].astype(mx.float32))
                  for x in (caches[i].keys, caches[i].values)))
            for i in sorted(queries)}


# --- quantizers -------------------------------------------------------------------------
def quantize_dequantize(x, bits: int, group_size: int, mse: bool = False):
    """x (..., D) float32 (already rotated) -> what the cache's store gives back: its own
    write path (``reference_append_rows``: float16 rounding, ``quantize_groups``) read back by
    ``dequantize_rows``; ``+mse`` chooses each group's range by squared error instead."""
    if not mse:
        t = mx.array(x)
        _, rows = reference_append_rows(t, t, None, bits, group_size)
        return np.array(dequantize_rows(rows, x.shape[-1], bits, group_size)[0])
    g = x.astype(np.float16).astype(np.float32).reshape(-1, group_size)
    lo, hi = g.min(1, keepdims=True), g.max(1, keepdims=True)
    mid, half, levels = (lo + hi) / 2, (hi - lo) / 2, 2 ** bits - 1
    best, best_err = None, None
    for shrink in MSE_SHRINK:
        scale = np.maximum(2 * shrink * half / levels, 1e-7).astype(np.float16).astype(np.float32)
        bias = (mid - shrink * half).astype(np.float16).astype(np.float32)
        r = np.clip(np.rint((g - bias) / scale), 0, levels) * scale + bias
        err = ((r - g) ** 2).sum(1, keepdims=True)
        if best is None:
            best, best_err = r, err
        else:
            better = err < best_err
            best, best_err = np.where(better, r, best), np.minimum(err, best_err)
    return best.reshape(x.shape)


def cache_stored_kv(k, v, fmt: KVCacheConfig, layer: int, chunk: int = 512):
    """What a real ``QuantizedKVCache`` (reference backend) stores for keys/values (H, T,
    D), appended in chunks as a prefill would, read back in the rotated basis (key centers
    included); positions in the sink, and those whose rows are not written yet (still in
    the window: attention reads them in float16 at any query position), are left exact."""
    from mlxq.kernels.kv_layout import add_key_centers

    cache = QuantizedKVCache(fmt, layer_index=layer, backend="reference")
    T = k.shape[1]
    for a in range(0, T, chunk):
        cache.append(mx.array(k[None, :, a:a + chunk]), mx.array(v[None, :, a:a + chunk]))
    S, held = min(fmt.sink, T), cache.rows_held
    kq, vq = dequantize_rows(cache.store[:, :, :held], k.shape[-1], fmt.bits, fmt.group_size,
                             key_bits=fmt.key_bits)
    if cache.centers is not None:
        kq = add_key_centers(kq, cache.centers, 0)
    R = cache.rotation

    def exact(x, first, last):
        part = x[:, first:last]
        return part if R is None or first == last else np.array(R.forward(mx.array(part)))

    return tuple(np.concatenate([exact(x, 0, S), np.array(q[0]), exact(x, S + held, T)], axis=1)
                 for x, q in zip((k, v), (kq, vq)))


def stored_kv(k, v, fmt: KVCacheConfig, mods: set):
    """The keys/values attention reads from the quantized store, in the rotated basis
    (experimental quantizers; the cache's own formats go through ``cache_stored_kv``)."""
    mse = "mse" in mods
    center = 0.0
    if "kcenter" in mods:
        center = k.mean(axis=1, keepdims=True)
    elif "kblock" in mods:
        T = k.shape[1]
        starts = np.arange(T) // BLOCK * BLOCK  # each token's block start
        prev = np.zeros_like(k)
        for b in range(BLOCK, T, BLOCK):
            prev[:, b:b + BLOCK] = k[:, b - BLOCK:b].mean(axis=1, keepdims=True)
        center = np.where((starts >= BLOCK)[None, :, None], prev, 0.0)
    kq = quantize_dequantize(k - center, fmt.bits, 32 if "kg32" in mods else fmt.group_size,
                             mse) + center
    return kq, quantize_dequantize(v, fmt.bits, fmt.group_size, mse)


# --- comparison -------------------------------------------------------------------------
def _softmax(s):
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    return p / p.sum(axis=-1, keepdims=True)


def layer_error(q, k, v, kq, vq, scale: float, queries: int, recent: int, sink: int):
    """(mean relative output error, mean attention KL) of the last ``queries`` positions."""
    Hq, T, _ = q.shape
    group = Hq // k.shape[0]
    pos = np.arange(T - queries, T)[:, None]
    key = np.arange(T)[None, :]
    causal = key <= pos
    exact = (key < sink) | (key > pos - recent)  # sink and window: float16 in the cache
    errs, kls = [], []
    for h in range(Hq):
        kv = h // group
        qh = q[h, T - queries:]
        s_exact = np.where(causal, scale * qh @ k[kv].T, -np.inf)
        s_mixed = np.where(causal, np.where(exact, scale * qh @ k[kv].T,
                                            scale * qh @ kq[kv].T), -np.inf)
        p, pm = _softmax(s_exact), _softmax(s_mixed)
        o = p @ v[kv]
        om = (pm * exact) @ v[kv] + (pm * ~exact) @ vq[kv]
        errs.append(np.linalg.norm(om - o, axis=-1) / np.linalg.norm(o, axis=-1))
        with np.errstate(divide="ignore", invalid="ignore"):
            kls.append(np.where(p > 0, p * (np.log(p) - np.log(pm)), 0.0).sum(-1))
    return float(np.mean(errs)), float(np.mean(kls))


def attention_errors(recorded: dict, names: list, queries: int, scale: float) -> dict:
    """{format name: {"layers": [(err, kl), ...], "err": mean, "kl": mean}}."""
    parsed = {n: parse(n) for n in names}
    out = {n: {"layers": []} for n in names}
    for layer, (q, k, v) in recorded.items():
        D = q.shape[-1]
        rotations = {}
        for name, (fmt, mods) in parsed.items():
            if fmt.rotation not in rotations:
                R = (np.array(HadamardRotation(D, fmt.seed, layer).matrix)
                     if fmt.rotation else np.eye(D, dtype=np.float32))
                rotations[fmt.rotation] = tuple(x @ R for x in (q, k, v))
            qr, kr, vr = rotations[fmt.rotation]
            if mods:
                kq, vq = stored_kv(kr, vr, fmt, mods)
            else:
                kq, vq = cache_stored_kv(k, v, fmt, layer)
            out[name]["layers"].append(layer_error(qr, kr, vr, kq, vq, scale,
                                                   min(queries, q.shape[1]),
                                                   fmt.recent, fmt.sink))
    for entry in out.values():
        errs, kls = zip(*entry["layers"])
        entry.update(err=float(np.mean(errs)), kl=float(np.mean(kls)))
    return out


def _scale(model) -> float:
    attn = getattr(model.layers[0], "self_attn", None)
    return float(getattr(attn, "scale", model.head_dim ** -0.5))


@cli_main
def main(argv=None) -> int:
    p = ArgumentParser(prog="python benchmarks/kv_attention_error.py",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model folder (default: the default model)")
    p.add_argument("--corpus", default="moby-dick", choices=("moby-dick", "botchan"))
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--queries", type=int, default=512,
                   help="last positions whose attention is compared (default 512)")
    p.add_argument("--formats", nargs="+", default=["int4-g64-rot-w256-s4"])
    p.add_argument("--json", dest="json_path", help="also write the figures as JSON here")
    p.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    args = p.parse_args(argv)
    if args.json_path:
        check_output_file(args.json_path, args.force)
    for name in args.formats:
        parse(name)  # a bad name fails before the model runs
    if args.context < 2 or args.queries < 1:
        raise MlxqError("--context must be at least 2 and --queries at least 1")
    from mlxq.corpus import load_text
    from mlxq.evaluate import dense_weights, encode_text
    from mlxq.loading import load_for_cli

    model, tokenizer = load_for_cli(args.model)
    dense_weights(model)
    tokens = encode_text(tokenizer, load_text(args.corpus), args.context)
    if len(tokens) < args.context:
        raise MlxqError(f"the corpus has only {len(tokens)} tokens")
    recorded = record_attention(model, tokens)
    if not recorded:
        raise MlxqError("no layer of this model takes the quantized cache")
    result = attention_errors(recorded, args.formats, args.queries, _scale(model))
    print(f"context {args.context}, last {min(args.queries, args.context)} queries, "
          f"{len(recorded)} layers; err = relative attention-output error, "
          "kl = attention-weight KL")
    print(f"{'format':<36}{'err':>9}{'kl':>10}")
    for name, entry in result.items():
        print(f"{name:<36}{entry['err']:>9.4f}{entry['kl']:>10.5f}")
    if args.json_path:
        write_text_file(args.json_path, json.dumps(
            {"context": args.context, "queries": args.queries, "layers": sorted(recorded),
             "formats": result}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
