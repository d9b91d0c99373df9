"""Speed of the Metal emulator (mlxq.emulator): compile time, a decode-attention-sized launch, and
the fixed overhead of a small launch. Prints a table.

    python benchmarks/emulator_speed.py

Targets on a 2-core machine: compile <= 2 s, decode-sized launch <= 2 s, small launch << 50 ms.
"""

import os
import statistics
import sys
import tempfile
import time

import mlx.core as mx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from mlxq.emulator import metal_kernel  # noqa: E402
from mlxq.errors import ArgumentParser, cli_main  # noqa: E402

# One threadgroup = one head x 1024 tokens; each thread scores one token (fp16 K, D=128), the group
# finds max and sum with simd_max/simd_sum and threadgroup merges, then 128 threads accumulate
# p @ V for the chunk. Writes unnormalised partial outputs with their max and sum (split-K style).
DECODE_SOURCE = """
    const uint TG = 1024;
    uint head = threadgroup_position_in_grid.y;
    uint chunk = threadgroup_position_in_grid.x;
    uint tid = thread_index_in_threadgroup;
    uint lane = thread_index_in_simdgroup;
    uint sg = simdgroup_index_in_threadgroup;
    uint token = chunk * TG + tid;

    threadgroup float red[32];
    threadgroup float probs[TG];

    const device half* qh = q + head * D;
    const device half* kt = k + (head * S + token) * D;
    float s = 0.0f;
    for (uint d = 0; d < D; d += 4) {
        float4 qv = float4(qh[d], qh[d + 1], qh[d + 2], qh[d + 3]);
        float4 kv = float4(kt[d], kt[d + 1], kt[d + 2], kt[d + 3]);
        s += dot(qv, kv);
    }
    s *= scale;

    float m = simd_max(s);
    if (lane == 0) red[sg] = m;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    m = simd_max(red[lane]);
    threadgroup_barrier(mem_flags::mem_threadgroup);

    float p = metal::exp(s - m);
    probs[tid] = p;
    float l = simd_sum(p);
    if (lane == 0) red[sg] = l;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    l = simd_sum(red[lane]);

    if (tid < D) {
        const device half* vt = v + (head * S + chunk * TG) * D + tid;
        float acc = 0.0f;
        for (uint t = 0; t < TG; ++t) acc += probs[t] * float(vt[t * D]);
        out[(head * gridDimX + chunk) * D + tid] = acc;
    }
    if (tid == 0) {
        stats[(head * gridDimX + chunk) * 2] = m;
        stats[(head * gridDimX + chunk) * 2 + 1] = l;
    }
"""


def timed(fn, repeat=1):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times), statistics.median(times)


def decode_case(H=32, S=4096, D=128):
    src = DECODE_SOURCE.replace("gridDimX", str(S // 1024))
    kernel = metal_kernel(name="bench_decode", input_names=["q", "k", "v", "scale"],
                          output_names=["out", "stats"], source=src)
    q = mx.random.normal((H, D)).astype(mx.float16)
    k = mx.random.normal((H, S, D)).astype(mx.float16)
    v = mx.random.normal((H, S, D)).astype(mx.float16)
    scale = mx.array(D ** -0.5)
    mx.eval(q, k, v)

    def run():
        return kernel(inputs=[q, k, v, scale], template=[("D", D), ("S", S)], grid=(S, H, 1),
                      threadgroup=(1024, 1, 1), output_shapes=[(H, S // 1024, D), (H, S // 1024, 2)],
                      output_dtypes=[mx.float32, mx.float32])

    # Check against plain MLX so the benchmark measures a correct kernel.
    out, stats = run()
    scores = (k.astype(mx.float32) @ q.astype(mx.float32)[:, :, None])[..., 0] * D ** -0.5
    w = mx.softmax(scores, axis=-1)
    ref = (w[:, None, :] @ v.astype(mx.float32))[:, 0, :]
    m, l = stats[..., 0:1], stats[..., 1:2]
    gm = m.max(axis=1, keepdims=True)
    emu = (out * mx.exp(m - gm)).sum(1) / (l * mx.exp(m - gm)).sum(1)
    err = float(mx.abs(emu - ref).max())
    assert err < 1e-2, err
    return run


def small_case():
    kernel = metal_kernel(name="bench_small", input_names=["x"], output_names=["y"],
                          source="uint i = thread_position_in_grid.x; y[i] = simd_sum(x[i]);")
    x = mx.ones((64,))
    mx.eval(x)
    return lambda: kernel(inputs=[x], grid=(64, 1, 1), threadgroup=(64, 1, 1),
                          output_shapes=[(64,)], output_dtypes=[mx.float32])


@cli_main
def main(argv=None):
    # No options; --help says what this measures and unknown flags are one-line errors.
    ArgumentParser(prog="benchmarks/emulator_speed.py",
                   description=__doc__.split("\n\n")[0]).parse_args(argv)
    from mlxq.emulator import compiler, source

    rows = []
    with tempfile.TemporaryDirectory() as cache:
        os.environ["MLXQ_EMULATOR_CACHE"] = cache  # cold cache: compile times are real
        t0 = time.perf_counter()
        compiler.runtime_object()
        rows.append(("compile fiber runtime (once per cache)", time.perf_counter() - t0, None))

        kernel = metal_kernel(name="bench_decode", input_names=["q", "k", "v", "scale"],
                              output_names=["out", "stats"], source=DECODE_SOURCE.replace("gridDimX", "4"))
        ins = [mx.zeros((32, 128), mx.float16), mx.zeros((32, 4096, 128), mx.float16),
               mx.zeros((32, 4096, 128), mx.float16), mx.array(1.0)]
        specs = [source.InputSpec.of(x) for x in ins]
        t0 = time.perf_counter()
        source.traced_source(kernel.spec, [("D", 128), ("S", 4096)], specs, [mx.float32] * 2)
        rows.append(("trace MLX's generated source (decode kernel)", time.perf_counter() - t0, None))
        t0 = time.perf_counter()
        kernel.variant(ins, [mx.float32] * 2, [("D", 128), ("S", 4096)])
        rows.append(("compile decode kernel variant (trace + g++ + load)", time.perf_counter() - t0, None))

        decode = decode_case()
        best, med = timed(decode, repeat=3)
        rows.append(("decode attention H=32 S=4096 D=128: 131072 threads", best, med))

        small = small_case()
        t0 = time.perf_counter()
        small()
        rows.append(("small kernel first call (trace + compile + run)", time.perf_counter() - t0, None))
        best, med = timed(small, repeat=50)
        rows.append(("small launch (64 threads, simd_sum), cached variant", best, med))

        os.environ["MLXQ_EMULATOR_CHECK"] = "1"
        decode_checked = decode_case()
        best, med = timed(decode_checked, repeat=2)
        rows.append(("decode launch, checking mode (MLXQ_EMULATOR_CHECK=1)", best, med))
        del os.environ["MLXQ_EMULATOR_CHECK"]

    print(f"{'case':<58} {'best s':>9} {'median s':>9}")
    for name, best, med in rows:
        print(f"{name:<58} {best:>9.4f} {med if med is not None else float('nan'):>9.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
