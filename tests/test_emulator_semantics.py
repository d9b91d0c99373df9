"""Metal semantics of mlxq.emulator: each kernel is written so a wrong semantics gives a wrong answer."""

import math

import mlx.core as mx
import numpy as np
import pytest

from mlxq.emulator import UnsupportedFeatureError, metal_kernel


def run(source, inputs, out_shape, grid, threadgroup, out_dtype=mx.float32, template=None, header="",
        init_value=None, input_names=None, ensure_row_contiguous=True):
    names = input_names or [f"in{i}" for i in range(len(inputs))]
    kernel = metal_kernel(name="sem", input_names=names, output_names=["out"], source=source, header=header,
                          ensure_row_contiguous=ensure_row_contiguous)
    out = kernel(inputs=inputs, template=template, grid=grid, threadgroup=threadgroup,
                 output_shapes=[out_shape], output_dtypes=[out_dtype], init_value=init_value)[0]
    return np.array(out)


def test_attribute_parameters_on_a_non_uniform_3d_grid():
    grid, tg = (10, 3, 2), (4, 2, 2)
    attrs = [
        "thread_position_in_grid", "threadgroup_position_in_grid", "thread_position_in_threadgroup",
        "threads_per_threadgroup", "dispatch_threads_per_threadgroup", "threadgroups_per_grid",
        "threads_per_grid", "grid_size", "grid_origin",
    ]
    scalars = [
        "thread_index_in_threadgroup", "thread_index_in_simdgroup", "simdgroup_index_in_threadgroup",
        "simdgroups_per_threadgroup", "dispatch_simdgroups_per_threadgroup", "threads_per_simdgroup",
        "thread_execution_width", "quadgroup_index_in_threadgroup", "thread_index_in_quadgroup",
        "quadgroups_per_threadgroup", "dispatch_quadgroups_per_threadgroup",
    ]
    width = 3 * len(attrs) + len(scalars)
    lines = ["uint3 p = thread_position_in_grid;", f"uint o = ((p.z * 3 + p.y) * 10 + p.x) * {width};"]
    for i, a in enumerate(attrs):
        lines += [f"out[o + {3 * i}] = {a}.x; out[o + {3 * i + 1}] = {a}.y; out[o + {3 * i + 2}] = {a}.z;"]
    for j, s in enumerate(scalars):
        lines.append(f"out[o + {3 * len(attrs) + j}] = {s};")
    got = run("\n".join(lines), [mx.zeros((1,))], (2 * 3 * 10 * width,), grid, tg, out_dtype=mx.uint32)
    got = got.reshape(2, 3, 10, width)
    for z in range(2):
        for y in range(3):
            for x in range(10):
                g = (x // 4, y // 2, z // 2)
                size = tuple(min(tg[k], grid[k] - g[k] * tg[k]) for k in range(3))
                local = (x % 4, y % 2, z % 2)
                index = local[0] + size[0] * (local[1] + size[1] * local[2])
                n = size[0] * size[1] * size[2]
                want = [(x, y, z), g, local, size, tg, (3, 2, 1), grid, grid, (0, 0, 0)]
                want = [c for v in want for c in v] + [
                    index, index % 32, index // 32, math.ceil(n / 32), 1, 32, 32, index // 4, index % 4,
                    math.ceil(n / 4), 4]
                assert list(got[z, y, x]) == want, (x, y, z)


def test_threadgroup_is_clamped_to_the_grid_like_mlx():
    got = run("out[thread_position_in_grid.x] = threads_per_threadgroup.x * 100 + threadgroups_per_grid.x;",
              [mx.zeros((1,))], (5,), (5, 1, 1), (256, 1, 1), out_dtype=mx.uint32)
    assert list(got) == [501] * 5


REDUCE = """
    uint i = thread_position_in_grid.x;
    uint v = in0[i];
    float f = float(v) * 0.5f;
    uint base = i * 8;
    out[base + 0] = simd_sum(f);
    out[base + 1] = simd_max(f);
    out[base + 2] = simd_min(f);
    out[base + 3] = float(simd_and(v | 0x100u));
    out[base + 4] = float(simd_or(v));
    out[base + 5] = float(simd_xor(v));
    out[base + 6] = simd_product(v % 3 == 0 ? 1.0f : 1.5f);
    out[base + 7] = float(simd_sum(1u));
"""


@pytest.mark.parametrize("tg", [64, 40])  # 40: the second SIMD group has 8 lanes
def test_simd_reductions_cover_every_lane_including_partial_groups(tg):
    vals = (np.arange(tg) * 37 % 101).astype(np.uint32)
    got = run(REDUCE, [mx.array(vals)], (tg * 8,), (tg, 1, 1), (tg, 1, 1)).reshape(tg, 8)
    for start in range(0, tg, 32):
        v = vals[start:start + 32]
        f = v.astype(np.float32) * 0.5
        want = [f.sum(), f.max(), f.min(), np.bitwise_and.reduce(v | 0x100), np.bitwise_or.reduce(v),
                np.bitwise_xor.reduce(v), np.prod(np.where(v % 3 == 0, 1.0, 1.5)), len(v)]
        for lane in range(len(v)):
            np.testing.assert_allclose(got[start + lane], want, rtol=1e-5)


def test_simd_prefix_scans():
    src = """
        uint i = thread_position_in_grid.x;
        float x = in0[i];
        out[i * 4 + 0] = simd_prefix_inclusive_sum(x);
        out[i * 4 + 1] = simd_prefix_exclusive_sum(x);
        out[i * 4 + 2] = simd_prefix_inclusive_product(x);
        out[i * 4 + 3] = simd_prefix_exclusive_product(x);
    """
    x = (1.0 + (np.arange(48) % 5) * 0.1).astype(np.float32)
    got = run(src, [mx.array(x)], (48 * 4,), (48, 1, 1), (48, 1, 1)).reshape(48, 4)
    for start in (0, 32):
        seg = x[start:start + 32]
        inc, prod = np.cumsum(seg), np.cumprod(seg)
        np.testing.assert_allclose(got[start:start + len(seg), 0], inc, rtol=1e-5)
        np.testing.assert_allclose(got[start:start + len(seg), 1], inc - seg, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[start:start + len(seg), 2], prod, rtol=1e-5)
        np.testing.assert_allclose(got[start:start + len(seg), 3], prod / seg, rtol=1e-5)


def test_simd_shuffles_broadcasts_and_votes():
    src = """
        uint i = thread_position_in_grid.x;
        uint lane = thread_index_in_simdgroup;
        float x = in0[i];
        uint o = i * 10;
        out[o + 0] = simd_shuffle(x, (lane * 7) % 32);
        out[o + 1] = simd_shuffle_xor(x, 5);
        out[o + 2] = simd_shuffle_up(x, 3);
        out[o + 3] = simd_shuffle_down(x, 3);
        out[o + 4] = simd_broadcast(x, 9);
        out[o + 5] = lane >= 4 ? simd_broadcast_first(x) : -1.0f;
        out[o + 6] = simd_all(x > 0.0f) ? 1.0f : 0.0f;
        out[o + 7] = simd_any(x > 60.0f) ? 1.0f : 0.0f;
        out[o + 8] = simd_is_first() ? 1.0f : 0.0f;
        out[o + 9] = simd_shuffle_rotate_down(x, 1);
    """
    x = np.arange(1, 65, dtype=np.float32)
    got = run(src, [mx.array(x)], (640,), (64, 1, 1), (64, 1, 1)).reshape(64, 10)
    for i in range(64):
        lane, base = i % 32, i - i % 32
        want = [x[base + lane * 7 % 32], x[base + (lane ^ 5)], x[i] if lane < 3 else x[i - 3],
                x[i] if lane >= 29 else x[i + 3], x[base + 9], x[base + 4] if lane >= 4 else -1,
                1, float(x[base + 31] > 60), float(lane == 0), x[base + (lane + 1) % 32]]
        assert list(got[i]) == want, i


def test_simd_op_in_divergent_branch_uses_only_active_lanes():
    src = """
        uint lane = thread_index_in_simdgroup;
        float r = -1.0f;
        if (lane % 3 == 0) { r = simd_sum(float(lane)); }
        else { r = simd_max(float(lane)) + 1000.0f; }
        out[thread_position_in_grid.x] = r;
    """
    got = run(src, [mx.zeros((1,))], (32,), (32, 1, 1), (32, 1, 1))
    lanes = np.arange(32)
    want = np.where(lanes % 3 == 0, lanes[lanes % 3 == 0].sum(), lanes[lanes % 3 != 0].max() + 1000)
    np.testing.assert_array_equal(got, want)


def test_threadgroup_memory_and_barrier_are_per_group():
    src = """
        threadgroup float buf[64];
        uint t = thread_position_in_threadgroup.x;
        uint n = threads_per_threadgroup.x;
        buf[t] = in0[thread_position_in_grid.x];
        threadgroup_barrier(mem_flags::mem_threadgroup);
        out[thread_position_in_grid.x] = buf[n - 1 - t];   // reversed within the (possibly partial) group
    """
    x = np.arange(150, dtype=np.float32)
    got = run(src, [mx.array(x)], (150,), (150, 1, 1), (64, 1, 1))
    want = np.concatenate([x[0:64][::-1], x[64:128][::-1], x[128:150][::-1]])
    np.testing.assert_array_equal(got, want)


def test_threadgroup_scalar_and_2d_array_and_simdgroup_barrier():
    src = """
        threadgroup int total;
        threadgroup float tile[4][8];
        uint2 p = thread_position_in_threadgroup.xy;
        if (p.x == 0 && p.y == 0) total = 0;
        tile[p.y][p.x] = float(p.y * 8 + p.x);
        simdgroup_barrier(mem_flags::mem_threadgroup);
        threadgroup_barrier(mem_flags::mem_threadgroup);
        if (p.x == 0) { for (int k = 0; k < 8; ++k) tile[p.y][0] += k > 0 ? tile[p.y][k] : 0.0f; }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        out[p.y * 8 + p.x] = tile[p.y][0] + (total == 0 ? 0.5f : 100.0f);
    """
    got = run(src, [mx.zeros((1,))], (32,), (8, 4, 1), (8, 4, 1)).reshape(4, 8)
    rows = np.arange(32).reshape(4, 8).sum(1) + 0.5
    np.testing.assert_array_equal(got, np.repeat(rows[:, None], 8, 1))


def test_half_arithmetic_rounds_like_float16():
    src = """
        uint i = thread_position_in_grid.x;
        half a = in0[i], b = in1[i];
        half r = a * b + a;        // each operation rounds to half
        r = r / b - half(0.1f);
        out[i] = r;
    """
    rng = np.random.default_rng(0)
    a = rng.uniform(0.5, 2.0, 256).astype(np.float16)
    b = rng.uniform(0.5, 2.0, 256).astype(np.float16)
    got = run(src, [mx.array(a), mx.array(b)], (256,), (256, 1, 1), (64, 1, 1), out_dtype=mx.float16)
    want = (a * b + a) / b - np.float16(0.1)
    np.testing.assert_array_equal(got, want)
    # Computing in float then rounding once would differ for some elements: the test can tell.
    once = ((a.astype(np.float32) * b + a) / b - np.float32(np.float16(0.1))).astype(np.float16)
    assert (once != want).any()


def test_bfloat16_storage_and_conversion():
    src = "uint i = thread_position_in_grid.x; out[i] = bfloat16_t(float(in0[i]) * 3.0f);"
    x = mx.array([1.0, -2.5, 3.14159, 1e-3, 1000.5]).astype(mx.bfloat16)
    kernel = metal_kernel(name="bf", input_names=["in0"], output_names=["out"], source=src)
    got = kernel(inputs=[x], grid=(5, 1, 1), threadgroup=(32, 1, 1), output_shapes=[(5,)],
                 output_dtypes=[mx.bfloat16])[0]
    assert got.dtype == mx.bfloat16
    want = (x.astype(mx.float32) * 3).astype(mx.bfloat16)
    assert mx.array_equal(got, want).item()


def test_vectors_swizzles_and_sizes():
    src = """
        uint i = thread_position_in_grid.x;
        float4 v = float4(in0[4 * i], in0[4 * i + 1], in0[4 * i + 2], in0[4 * i + 3]);
        float3 zyx = v.zyx;
        float2 s = v.xy + v.wz;
        v.yw = float2(100.0f, 200.0f);
        half4 h = half4(v.bgra);
        uint2 u = uint2(3, 4);
        int3 q = int3(u, -5);
        uint o = i * 12;
        out[o + 0] = zyx.x; out[o + 1] = zyx.z; out[o + 2] = s.x; out[o + 3] = s.y;
        out[o + 4] = v.y; out[o + 5] = v.w; out[o + 6] = float(h.r); out[o + 7] = float(q.z * q.x);
        out[o + 8] = sizeof(float3); out[o + 9] = sizeof(half3); out[o + 10] = sizeof(packed_float3);
        out[o + 11] = dot(v.xyz, float3(1.0f)) + length(float2(3.0f, 4.0f));
    """
    x = np.arange(8, dtype=np.float32)
    got = run(src, [mx.array(x)], (24,), (2, 1, 1), (2, 1, 1)).reshape(2, 12)
    for i in range(2):
        a, b, c, d = x[4 * i: 4 * i + 4]
        assert list(got[i]) == [c, a, a + d, b + c, 100, 200, c, -15, 16, 8, 12, a + 100 + c + 5]


def test_templates_types_ints_and_bools():
    src = """
        uint i = thread_position_in_grid.x;
        T v = T(in0[i]);
        out[i] = float(FLIP ? -v : v) * N + float(sizeof(T));
    """
    x = mx.arange(4).astype(mx.float32)
    for T, N, flip, size in ((mx.float16, 3, True, 2), (mx.int32, -2, False, 4)):
        got = run(src, [x], (4,), (4, 1, 1), (4, 1, 1), template=[("T", T), ("N", N), ("FLIP", flip)])
        np.testing.assert_array_equal(got, np.arange(4) * (-1 if flip else 1) * N + size)


def test_scalar_and_small_inputs_in_constant_space():
    src = "uint i = thread_position_in_grid.x; out[i] = in0[i] * scale + offs[i % 3] + float(n);"
    x = mx.arange(10).astype(mx.float32)
    got = run(src, [x, 2.5, mx.array([1.0, 2.0, 3.0]), mx.array(7, dtype=mx.int32)], (10,), (10, 1, 1),
              (32, 1, 1), input_names=["in0", "scale", "offs", "n"])
    np.testing.assert_allclose(got, np.arange(10) * 2.5 + np.array([1, 2, 3])[np.arange(10) % 3] + 7)


def test_init_value_and_uninitialised_outputs():
    src = "uint i = thread_position_in_grid.x; if (i % 2 == 0) out[i] = 1.0f;"
    got = run(src, [mx.zeros((1,))], (8,), (8, 1, 1), (8, 1, 1), init_value=-3.0)
    np.testing.assert_array_equal(got, [1, -3] * 4)
    got = run(src, [mx.zeros((1,))], (8,), (8, 1, 1), (8, 1, 1))
    assert np.isnan(got[1::2]).all()  # never written: garbage, as on a GPU


def test_ensure_row_contiguous_copies_strided_inputs():
    src = "uint i = thread_position_in_grid.x; out[i] = in0[i];"
    a = mx.arange(12).reshape(3, 4).astype(mx.float32).T
    got = run(src, [a], (12,), (12, 1, 1), (32, 1, 1))
    np.testing.assert_array_equal(got, np.array(a).reshape(-1))


def test_metal_math_functions():
    src = """
        uint i = thread_position_in_grid.x;
        float x = in0[i];
        uint o = i * 16;
        out[o + 0] = metal::exp(x); out[o + 1] = exp2(x); out[o + 2] = metal::log(x); out[o + 3] = log2(x);
        out[o + 4] = metal::sqrt(x); out[o + 5] = rsqrt(x); out[o + 6] = metal::precise::tanh(x);
        out[o + 7] = pow(x, 1.5f); out[o + 8] = fma(x, 2.0f, 1.0f); out[o + 9] = clamp(x, 0.5f, 1.5f);
        out[o + 10] = select(1.0f, 2.0f, x > 1.0f); out[o + 11] = metal::abs(-x) + max(x, 1.0f) + min(x, 1.0f);
        out[o + 12] = as_type<float>(as_type<uint>(x) ^ 0x80000000u);
        out[o + 13] = metal::fast::exp(x) + float(half(x));
        out[o + 14] = float(metal::max(3, 7) - metal::min(3u, 7u)) + floor(x) + ceil(x);
        out[o + 15] = isnan(x / 0.0f - x / 0.0f) ? 1.0f : 0.0f;
    """
    x = np.array([0.25, 1.0, 2.75], np.float32)
    got = run(src, [mx.array(x)], (48,), (3, 1, 1), (3, 1, 1)).reshape(3, 16)
    want = np.stack([np.exp(x), np.exp2(x), np.log(x), np.log2(x), np.sqrt(x), 1 / np.sqrt(x), np.tanh(x),
                     x ** 1.5, x * 2 + 1, np.clip(x, 0.5, 1.5), np.where(x > 1, 2.0, 1.0),
                     x + np.maximum(x, 1) + np.minimum(x, 1), -x,
                     np.exp(x) + x.astype(np.float16).astype(np.float32), 4 + np.floor(x) + np.ceil(x),
                     np.ones_like(x)], axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_header_helpers_and_mlx_utils():
    header = "template <typename T> inline T twice(T v) { return v * T(2); }\n"
    src = """
        uint i = thread_position_in_grid.x;
        out[i] = twice(in0[i]) + ceildiv(7, 2) + (Limits<float>::max > 1e38f ? 1.0f : 0.0f);
    """
    got = run(src, [mx.arange(4).astype(mx.float32)], (4,), (4, 1, 1), (4, 1, 1), header=header)
    np.testing.assert_array_equal(got, np.arange(4) * 2 + 4 + 1)


def test_unsupported_features_raise_clearly():
    with pytest.raises(UnsupportedFeatureError, match="atomics"):
        metal_kernel(name="atom", input_names=["x"], output_names=["out"],
                     source="atomic_fetch_add_explicit(&out[0], 1, memory_order_relaxed);")
    with pytest.raises(UnsupportedFeatureError, match="simdgroup_matrix"):
        metal_kernel(name="mma", input_names=["x"], output_names=["out"], source="simdgroup_float8x8 m;")
    with pytest.raises(UnsupportedFeatureError, match="atomic outputs"):
        metal_kernel(name="ao", input_names=["x"], output_names=["out"], source="out[0] = 1;",
                     atomic_outputs=True)
    # Mentioned only in a comment: fine.
    metal_kernel(name="ok", input_names=["x"], output_names=["out"], source="// no atomic here\nout[0] = 1;")
