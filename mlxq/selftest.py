"""``python -m mlxq.selftest``: every shipped kernel against its oracle, plus a short
fp16-vs-int4 timing, printed as a report to paste into an issue.

On a Mac the kernels run on Metal; elsewhere through the MSL emulator (``--backend``
chooses). Checks: the append kernel (rotation, float16 rows, quantized rows) against MLX's
Hadamard transform + ``kv_layout.quantize_groups``; the segmented decode kernel + merge against the
plain-MLX oracle over a sweep of head dims, GQA ratios, query tokens, lengths (block edges,
8K+), sink/window states and batch 2 with its own lengths; a whole cache decoding on the
backend against the reference backend. Timing (Metal only; the emulator says nothing about
GPU speed): one decode-attention call at Llama-3-8B's heads, MLX fp16 SDPA vs mlxq int4.
Exit code 0 when every check passes, 1 otherwise.
"""

import argparse
import math
import platform
import sys
import time

import mlx.core as mx

from .backend import BACKENDS, metal_available
from .errors import MlxqError, cli_main

# (batch, q_tokens, head_dim, gqa, kv_heads, bits, group, sink, recent, lens, rotate
#  [, key bits]); lens: (tokens, window tokens) per sequence.
DECODE_CASES = [
    (1, 1, 64, 3, 3, 4, 64, 4, 256, [(3, 0)], True),
    (1, 1, 64, 1, 2, 4, 64, 0, 0, [(31, 0)], False),
    (2, 1, 128, 2, 2, 4, 32, 4, 16, [(33, 16), (20, 16)], True),
    (1, 2, 64, 4, 1, 8, 64, 2, 8, [(32, 8)], True),
    (1, 3, 128, 6, 1, 4, 128, 4, 16, [(129, 16)], True),
    (1, 4, 256, 2, 2, 4, 64, 4, 32, [(300, 32)], True),
    (1, 1, 64, 8, 1, 4, 32, 4, 64, [(1000, 64)], True),
    (1, 8, 64, 16, 1, 4, 64, 4, 256, [(700, 256)], True),
    (1, 1, 128, 4, 8, 4, 64, 4, 256, [(4096, 256)], True),
    (1, 1, 128, 4, 2, 4, 64, 4, 256, [(8200, 256)], True),
    (2, 1, 96, 3, 1, 4, 32, 4, 16, [(129, 16), (70, 9)], False),
    (1, 1, 256, 4, 1, 4, 64, 4, 256, [(2000, 256)], True, 8),  # Gemma 3: 8-bit keys
]
QUICK_CASES = DECODE_CASES[:4]
# (bits, group, head_dim[, key bits])
APPEND_CASES = [(4, 64, 64), (4, 32, 128), (8, 64, 128), (4, 128, 256), (8, 32, 96),
                (4, 64, 256, 8)]


def _rel_err(out, ref) -> float:
    out, ref = out.astype(mx.float32), ref.astype(mx.float32)
    return (mx.abs(out - ref).max() / mx.abs(ref).max()).item()


def check_append(backend, bits, gs, D, key_bits=None):
    from .kernels.kv_append import append_rows, reference_append_rows
    from .kernels.kv_layout import dequantize_rows
    from .rotation import HadamardRotation

    keys = mx.random.normal((1, 4, 3, D), key=mx.random.key(D))
    values = mx.random.normal((1, 4, 3, D), key=mx.random.key(D + 1))
    rotate = D & (D - 1) == 0
    rot = HadamardRotation(D, 5, 1) if rotate else None
    fp, q = append_rows(keys, values, mx.array(rot._signs) if rot else None, bits, gs, backend,
                        key_bits=key_bits)
    fp_ref, q_ref = reference_append_rows(keys, values, rot, bits, gs, key_bits=key_bits)
    err = max(_rel_err(fp, fp_ref),
              *(_rel_err(a, b) for a, b in zip(dequantize_rows(q, D, bits, gs, key_bits=key_bits),
                                               dequantize_rows(q_ref, D, bits, gs,
                                                               key_bits=key_bits))))
    # One quantization step of a unit-variance group is ~1/8 (4-bit) of its range.
    return err, err < (0.1 if bits == 4 else 0.01)


def check_decode(backend, case):
    from .kernels.decode_attention import segmented_decode_attention
    from .kernels.kv_append import reference_append_rows
    from .kernels.segmented_attention import cache_segments, segmented_attention
    from .rotation import HadamardRotation

    B, Lq, D, G, Hkv, bits, gs, sink, recent, lens, rotate = case[:11]
    key_bits = case[11] if len(case) > 11 else None
    k0, k1, k2 = mx.random.split(mx.random.key(len(lens) + D + G), 3)
    rows = max(max(0, n - sink) for n, _ in lens) + 8
    x = mx.random.normal((B, Hkv, rows, D), key=k0)
    _, store = reference_append_rows(x, -x, None, bits, gs, key_bits=key_bits)
    fp = mx.random.normal((B, Hkv, sink + recent + 1, 2 * D), key=k1).astype(mx.float16)
    q = 3 * mx.random.normal((B, Hkv * G, Lq, D), key=k2)
    scale = 1 / math.sqrt(D)
    rot = HadamardRotation(D, 3, 0) if rotate else None
    out = segmented_decode_attention(q, store, fp, lens, sink, recent, scale, bits, gs,
                                     mx.array(rot._signs) if rot else None, backend,
                                     key_bits=key_bits)
    positions = mx.array([[n - Lq + t for t in range(Lq)] for n, _ in lens], dtype=mx.int32)
    ref = segmented_attention(rot.forward(q) if rot else q, positions,
                              cache_segments(store, fp, lens, sink, recent, D, bits, gs,
                                             key_bits=key_bits), scale)
    err = _rel_err(out, rot.inverse(ref) if rot else ref)
    return err, err < 2e-4


def check_cache(backend):
    """A default int4 cache decoding past its window and across a key-center block (window
    16: rows written on arrival, the next center from the stored block; window 128, one
    CENTER_BLOCK: the block's center from its float16 keys, rows written as tokens leave
    the window, quantized in place by the second append launch) on the backend vs the
    reference."""
    from .attention import attend
    from .kv_config import KVCacheConfig
    from .quantized_cache import QuantizedKVCache

    err = 0.0
    for recent in (16, 128):
        config = KVCacheConfig(4, 64, recent=recent, sink=4)
        caches = [QuantizedKVCache(config, 2, b) for b in (backend, "reference")]
        for step, L in enumerate([120] + [1] * 12 + [3]):  # store row 128 at a decode step
            keys = mx.random.split(mx.random.key(step), 3)
            q = mx.random.normal((1, 6, L, 128), key=keys[0])
            k = mx.random.normal((1, 2, L, 128), key=keys[1]) + 2.0
            v = mx.random.normal((1, 2, L, 128), key=keys[2])
            a, b = (attend(q, k, v, c, 128 ** -0.5) for c in caches)
            err = max(err, _rel_err(a, b))
    return err, err < 1e-3


def time_decode(backend, contexts, reps=20):
    """ms per decode-attention call, Llama-3-8B heads (32q/8kv, d128), float16."""
    from .attention import attend_stored
    from .kv_config import KVCacheConfig
    from .quantized_cache import QuantizedKVCache

    rows = []
    for n in contexts:
        q = mx.random.normal((1, 32, 1, 128)).astype(mx.float16)
        k = mx.random.normal((1, 8, n, 128)).astype(mx.float16)
        v = mx.random.normal((1, 8, n, 128)).astype(mx.float16)
        cache = QuantizedKVCache(KVCacheConfig(4, 64), backend=backend)
        cache.append(k, v)
        mx.eval(q, k, v, cache.state)
        fns = {"fp16 SDPA": lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=0.088),
               "int4 mlxq": lambda: attend_stored(q, cache, 0.088)}
        row = {"context": n}
        for name, fn in fns.items():
            mx.eval(fn())
            t = time.perf_counter()
            for _ in range(reps):
                mx.eval(fn())
            row[name] = (time.perf_counter() - t) / reps * 1e3
        rows.append(row)
    return rows


def _parser():
    p = argparse.ArgumentParser(prog="python -m mlxq.selftest", description=__doc__.split("\n")[0])
    p.add_argument("--backend", choices=[b for b in BACKENDS if b != "reference"],
                   help="metal where available, else emulate")
    p.add_argument("--quick", action="store_true", help="a few decode shapes only")
    return p


@cli_main
def main(argv=None):
    args = _parser().parse_args(argv)
    backend = args.backend or ("metal" if metal_available() else "emulate")
    if backend == "metal" and not metal_available():
        raise MlxqError("--backend metal needs Metal (an Apple GPU); use --backend emulate")
    print("## mlxq selftest")
    print(f"- mlxq {__import__('mlxq').__version__}, MLX {mx.__version__}, "
          f"Python {platform.python_version()}, {platform.platform()}")
    if backend == "metal":
        info = mx.metal.device_info()
        print(f"- device: {info.get('architecture', '?')}, "
              f"{info.get('memory_size', 0) / 2**30:.0f} GiB")
    print(f"- backend: {backend}\n")
    print("| check | shape | max rel. error | result |\n|---|---|---|---|")
    failures = 0
    checks = [("append", f"bits {c[0]} g{c[1]} d{c[2]}" + (f" keys {c[3]}" if len(c) > 3 else ""),
               lambda c=c: check_append(backend, *c)) for c in APPEND_CASES]
    checks += [("decode", "B{} L{} d{} G{} Hkv{} b{} g{} sink{} recent{} n{}".format(
        *c[:9], "/".join(str(n) for n, _ in c[9])) + (f" keys {c[11]}" if len(c) > 11 else ""),
        lambda c=c: check_decode(backend, c))
        for c in (QUICK_CASES if args.quick else DECODE_CASES)]
    checks.append(("cache", "int4 d128 recent 16 / 128 sink 4, 135 tokens",
                   lambda: check_cache(backend)))
    for name, shape, run in checks:
        try:
            err, ok = run()
            result = "pass" if ok else "FAIL"
            err = f"{err:.2e}"
        except Exception as e:  # noqa: BLE001 - a kernel that fails to compile is a finding
            ok, err, result = False, "-", f"FAIL: {type(e).__name__}: {str(e).splitlines()[0]}"
        failures += not ok
        print(f"| {name} | {shape} | {err} | {result} |", flush=True)
    if backend == "metal":
        print("\n| context | fp16 SDPA ms | int4 mlxq ms | int4 / fp16 |\n|---|---|---|---|")
        for row in time_decode(backend, [1024, 4096, 16384, 32768]):
            print(f"| {row['context']} | {row['fp16 SDPA']:.3f} | {row['int4 mlxq']:.3f} | "
                  f"{row['int4 mlxq'] / row['fp16 SDPA']:.2f} |")
    else:
        print("\n(timing: skipped, the emulator says nothing about GPU speed)")
    print(f"\n{len(checks) - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
