"""Each diagnostic of mlxq.emulator fires on a kernel with the bug and stays silent on its fixed twin."""

import mlx.core as mx
import numpy as np
import pytest

from mlxq.emulator import KernelCompileError, KernelRuntimeError, metal_kernel


def launch(name, source, n=64, tg=64, check=None, x=None):
    kernel = metal_kernel(name=name, input_names=["x"], output_names=["out"], source=source, check=check)
    x = mx.arange(n).astype(mx.float32) if x is None else x
    return np.array(kernel(inputs=[x], grid=(n, 1, 1), threadgroup=(tg, 1, 1), output_shapes=[(n,)],
                           output_dtypes=[mx.float32])[0])


DIVERGENT = """
    uint i = thread_position_in_grid.x;
    threadgroup float buf[64];
    buf[i] = x[i];
    if (i < 16) {
        threadgroup_barrier(mem_flags::mem_threadgroup);
    } else {
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    out[i] = buf[63 - i];
"""
DIVERGENT_FIXED = """
    uint i = thread_position_in_grid.x;
    threadgroup float buf[64];
    buf[i] = x[i];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[i] = buf[63 - i];
"""


def test_divergent_barrier_is_an_error_naming_the_kernel_and_lines():
    with pytest.raises(KernelRuntimeError, match=r"kernel 'divergent'.*divergent threadgroup_barrier.*"
                                                 r"body line 6.*body line 8"):
        launch("divergent", DIVERGENT)
    np.testing.assert_array_equal(launch("divergent_fixed", DIVERGENT_FIXED), np.arange(64)[::-1])


DEADLOCK = """
    uint i = thread_position_in_grid.x;
    threadgroup float buf[64];
    if (i >= 60) return;               // these threads never reach the barrier
    buf[i] = x[i];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[i] = buf[59 - i];
"""
DEADLOCK_FIXED = """
    uint i = thread_position_in_grid.x;
    threadgroup float buf[64];
    if (i < 60) buf[i] = x[i];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (i >= 60) return;
    out[i] = buf[59 - i];
"""


def test_barrier_after_early_return_is_a_deadlock():
    with pytest.raises(KernelRuntimeError, match=r"kernel 'deadlock'.*deadlock.*body line 6.*returned"):
        launch("deadlock", DEADLOCK)
    got = launch("deadlock_fixed", DEADLOCK_FIXED)
    np.testing.assert_array_equal(got[:60], np.arange(60)[::-1])


def test_barrier_in_loops_with_different_trip_counts_is_reported():
    src = """
        uint i = thread_position_in_grid.x;
        for (uint k = 0; k < (i < 32 ? 2u : 3u); ++k) {
            threadgroup_barrier(mem_flags::mem_threadgroup);
        }
        out[i] = x[i];
    """
    with pytest.raises(KernelRuntimeError, match="deadlock"):
        launch("loop_deadlock", src)
    np.testing.assert_array_equal(launch("loop_ok", src.replace("(i < 32 ? 2u : 3u)", "3u")), np.arange(64))


UNINITIALISED = """
    uint i = thread_position_in_threadgroup.x;
    uint g = thread_position_in_grid.x;
    threadgroup float buf[64];
    if (i < 32) buf[i] = x[g];          // the upper half is never written
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[g] = buf[63 - i];
"""


def test_unwritten_threadgroup_memory_reads_as_nan_in_every_group():
    got = launch("uninit", UNINITIALISED, n=128)  # two groups: the second must not see the first's data
    assert np.isnan(got[0:32]).all() and np.isnan(got[64:96]).all()
    np.testing.assert_array_equal(got[32:64], np.arange(32)[::-1])
    np.testing.assert_array_equal(got[96:128], np.arange(64, 96)[::-1])
    fixed = launch("uninit_fixed", UNINITIALISED.replace("if (i < 32) buf[i]", "buf[i]"))
    np.testing.assert_array_equal(fixed, np.arange(64)[::-1])


OUT_OF_BOUNDS_READ = """
    uint i = thread_position_in_grid.x;
    out[i] = x[i] + x[i + 1];           // the last thread reads one past the end
"""
OUT_OF_BOUNDS_WRITE = """
    uint i = thread_position_in_grid.x;
    const device float* row = x + i;
    device float* dst = out + 1;
    dst[i] = row[0];                    // the last thread writes one past the end
"""


def test_out_of_bounds_read_is_reported_in_checking_mode(monkeypatch):
    monkeypatch.setenv("MLXQ_EMULATOR_CHECK", "1")
    with pytest.raises(KernelRuntimeError, match=r"kernel 'oob_read'.*out-of-bounds access to buffer 'x'.*"
                                                 r"element 64.*64 elements.*thread 63"):
        launch("oob_read", OUT_OF_BOUNDS_READ)
    fixed = OUT_OF_BOUNDS_READ.replace("x[i + 1]", "x[min(i + 1, 63u)]")
    got = launch("oob_read_fixed", fixed)
    assert got[-1] == 126.0


def test_out_of_bounds_write_through_a_derived_pointer_is_reported():
    with pytest.raises(KernelRuntimeError, match=r"out-of-bounds access to buffer 'out'.*element 64"):
        launch("oob_write", OUT_OF_BOUNDS_WRITE, check=True)
    fixed = OUT_OF_BOUNDS_WRITE.replace("out + 1", "out")
    np.testing.assert_array_equal(launch("oob_write_fixed", fixed, check=True), np.arange(64))


def test_checking_mode_covers_small_constant_inputs():
    src = "uint i = thread_position_in_grid.x; out[i] = x[i];"  # x has 3 elements: constant space
    with pytest.raises(KernelRuntimeError, match="buffer 'x'"):
        launch("oob_const", src, n=4, tg=4, check=True, x=mx.zeros((3,)))
    launch("oob_const_ok", src.replace("x[i]", "x[i % 3]"), n=4, tg=4, check=True, x=mx.zeros((3,)))


def test_compile_error_shows_the_body_line():
    src = "uint i = thread_position_in_grid.x;\nfloat y = x[i];\nout[i] = y + not_declared;\n"
    with pytest.raises(KernelCompileError) as info:
        launch("broken", src)
    message = str(info.value)
    assert "kernel 'broken' does not compile" in message
    assert "body line 3: out[i] = y + not_declared;" in message
    assert "not_declared" in message
