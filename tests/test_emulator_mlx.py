"""mlxq.emulator against MLX itself: the documented metal_kernel examples, and the source text."""

import mlx.core as mx
import numpy as np
import pytest

from mlxq.emulator import metal_kernel
from mlxq.emulator import source as msrc


def test_doc_example_elementwise_exp():
    source = """
        uint elem = thread_position_in_grid.x;
        T tmp = inp[elem];
        out[elem] = metal::exp(tmp);
    """
    kernel = metal_kernel(name="myexp", input_names=["inp"], output_names=["out"], source=source)
    a = mx.random.normal(shape=(4, 16)).astype(mx.float16)
    b = kernel(inputs=[a], template=[("T", mx.float32)], grid=(a.size, 1, 1), threadgroup=(256, 1, 1),
               output_shapes=[a.shape], output_dtypes=[a.dtype])[0]
    assert b.dtype == mx.float16 and b.shape == a.shape
    assert mx.allclose(b, mx.exp(a)).item()


def test_doc_example_strided_elem_to_loc_without_copy():
    source = """
        uint elem = thread_position_in_grid.x;
        // Utils from `mlx/backend/metal/kernels/utils.h` are automatically included
        uint loc = elem_to_loc(elem, inp_shape, inp_strides, inp_ndim);
        T tmp = inp[loc];
        // Output arrays are always row contiguous
        out[elem] = metal::exp(tmp);
    """
    kernel = metal_kernel(name="myexp_strided", input_names=["inp"], output_names=["out"], source=source,
                          ensure_row_contiguous=False)
    a = mx.random.normal(shape=(4, 16)).astype(mx.float16)
    a = a[::2]  # non-contiguous: the kernel must follow the strides
    b = kernel(inputs=[a], template=[("T", mx.float32)], grid=(a.size, 1, 1), threadgroup=(256, 1, 1),
               output_shapes=[a.shape], output_dtypes=[a.dtype])[0]
    assert mx.allclose(b, mx.exp(a)).item()
    # A transposed view too (strides not decreasing).
    t = mx.random.normal(shape=(5, 7)).T
    c = kernel(inputs=[t], template=[("T", mx.float32)], grid=(t.size, 1, 1), threadgroup=(32, 1, 1),
               output_shapes=[t.shape], output_dtypes=[t.dtype])[0]
    assert mx.allclose(c, mx.exp(t), atol=1e-5).item()


CASES = [
    # (header, body, inputs, template, output dtypes)
    ("", "out[0] = x[0];", [mx.zeros((10,))], None, [mx.float32]),
    ("// helper\ninline float twice(float v) { return 2 * v; }\n",
     """uint i = thread_position_in_grid.x; // simdgroup_index_in_threadgroup grid_size
        out[i] = x_shape[0] + x_strides[0] + x_ndim + s + c[0] + threads_per_threadgroup.x;""",
     [mx.zeros((4, 16), mx.float16), mx.array(1.0), mx.zeros((3,), mx.uint32)],
     [("T", mx.float32), ("N", 3), ("B", True)], [mx.float16, mx.bfloat16]),
    ("", "// dispatch_threads_per_threadgroup quadgroups_per_threadgroup thread_index_in_quadgroup\n"
         "out[0] = y_ndim;", [mx.zeros((2, 2, 2)), mx.zeros((9,), mx.int8)], [("B", False)], [mx.int32]),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_replica_source_matches_mlx_traced_source(case):
    header, body, inputs, template, out_dtypes = CASES[case]
    names = ["x", "s", "c"][: len(inputs)] if case != 2 else ["x", "y"]
    spec = msrc.KernelSpec(f"k{case}", tuple(names), tuple(f"out{i}" if i else "out" for i in range(len(out_dtypes))),
                           body, header)
    specs = [msrc.InputSpec.of(x) for x in inputs]
    traced = msrc.traced_source(spec, template, specs, out_dtypes)
    assert "[[kernel]] void custom_kernel_" in traced
    assert traced == msrc.replica_source(spec, template, specs, out_dtypes)


def test_emulator_runs_the_source_mlx_generates(monkeypatch):
    body = "uint i = thread_position_in_grid.x; out[i] = x[i] * N;"
    kernel = metal_kernel(name="runs_traced", input_names=["x"], output_names=["out"], source=body)
    x = mx.arange(8).astype(mx.float32)
    args = dict(inputs=[x], template=[("N", 3)], output_dtypes=[mx.float32])
    spec = kernel.spec
    traced = msrc.traced_source(spec, [("N", 3)], [msrc.InputSpec.of(x)], [mx.float32])
    assert kernel.variant(**args).source == traced

    # The text is cached per (kernel, template, dtypes, shape class): no new trace for new shapes.
    calls = []
    monkeypatch.setattr(msrc, "traced_source", lambda *a: calls.append(a) or traced)
    for n in (8, 16, 32):
        y = kernel(inputs=[mx.arange(n).astype(mx.float32)], template=[("N", 3)], grid=(n, 1, 1),
                   threadgroup=(32, 1, 1), output_shapes=[(n,)], output_dtypes=[mx.float32])[0]
        np.testing.assert_array_equal(np.array(y), np.arange(n) * 3)
    assert calls == []


def test_verbose_prints_mlx_source(capsys):
    kernel = metal_kernel(name="verbose_k", input_names=["x"], output_names=["out"],
                          source="out[thread_position_in_grid.x] = x[0];")
    kernel(inputs=[mx.zeros((8,))], grid=(1, 1, 1), threadgroup=(1, 1, 1), output_shapes=[(1,)],
           output_dtypes=[mx.float32], verbose=True)
    printed = capsys.readouterr().out
    assert "Generated source code for `verbose_k`:" in printed
    assert "const device float* x [[buffer(0)]]" in printed


def test_backend_emulate_builds_emulated_kernels():
    from mlxq import backend
    from mlxq.emulator import EmulatedKernel

    kernel = backend.metal_kernel(backend="emulate", name="via_backend", input_names=["x"],
                                  output_names=["out"], source="out[thread_position_in_grid.x] = 2 * x[0];")
    assert isinstance(kernel, EmulatedKernel)
    out = kernel(inputs=[mx.array([3.0])], grid=(2, 1, 1), threadgroup=(2, 1, 1), output_shapes=[(2,)],
                 output_dtypes=[mx.float32])[0]
    assert out.tolist() == [6.0, 6.0]
