"""The emulator itself: MLX's wrapping, Metal semantics it implements, and what it refuses."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_unified.testing.metal_emulator import EmulatorError, metal_kernel
from mlx_unified.testing.metal_emulator.signature import (
    input_infos,
    kernel_name,
    used_attributes,
    write_kernel_source,
)


def test_signature_follows_mlx():
    source = "uint i = thread_position_in_grid.x; out[i] = a[i] * b + c[0] + a_shape[0];"
    inputs = [mx.zeros((10,)), mx.array(2.0), mx.zeros((3,), dtype=mx.int32)]
    name = kernel_name("k", [("T", mx.float16), ("N", 4), ("B", True)], inputs, [mx.bfloat16])
    assert name == "custom_kernel_k__float16_t_4_1_float_floats_int32_tc_bfloat16_t"
    text = write_kernel_source(
        name, "// header\n", source, input_infos(["a", "b", "c"], source), inputs, ["out"], [mx.bfloat16],
        [("T", mx.float16), ("N", 4), ("B", True)], used_attributes(source),
    )
    assert text.startswith("// header\ntemplate <typename T, int N, bool B>\n[[kernel]] void " + name + "(\n")
    assert "  const device float* a [[buffer(0)]],\n  const constant int* a_shape [[buffer(1)]],\n" in text
    assert "  const constant float& b [[buffer(2)]],\n  const constant int32_t* c [[buffer(3)]],\n" in text
    assert "  device bfloat16_t* out [[buffer(4)]],\n  uint3 thread_position_in_grid [[thread_position_in_grid]]) {\n" in text
    assert text.endswith(f"decltype({name}<float16_t, 4, 1>) {name}<float16_t, 4, 1>;\n")


def _run(source, n=64, group=32, dtype=mx.float32, header="", **kwargs):
    kernel = metal_kernel("probe", ["a"], ["out"], source, header=header)
    a = mx.arange(n).astype(dtype)
    return kernel(inputs=[a], grid=(n, 1, 1), threadgroup=(group, 1, 1), output_shapes=[(n,)],
                  output_dtypes=[dtype], template=[("T", dtype)], **kwargs)[0]


def test_simd_and_threadgroup_semantics():
    source = """
    uint i = thread_position_in_grid.x;
    uint lane = thread_index_in_simdgroup;
    threadgroup float partial[2];
    float s = simd_sum(float(a[i]));
    float mx_ = simd_max(float(a[i]));
    float nb = simd_shuffle_xor(float(a[i]), 1);
    float down = simd_shuffle_down(float(a[i]), 4);
    if (lane == 0) partial[simdgroup_index_in_threadgroup] = s;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[i] = T(partial[0] + partial[1] + 1000 * mx_ + 1e6 * nb + 1e8 * down);
    """
    out = np.array(_run(source, n=128, group=64))
    a = np.arange(128, dtype=np.float64)
    group_sum = np.repeat([a[:64].sum(), a[64:].sum()], 64)
    simd_max = np.repeat(a.reshape(-1, 32).max(1), 32)
    lane = np.arange(128) % 32
    down = np.where(lane + 4 < 32, a + 4, a)
    expected = group_sum + 1000 * simd_max + 1e6 * (a + np.where(lane % 2, -1, 1)) + 1e8 * down
    np.testing.assert_allclose(out, expected.astype(np.float32), rtol=1e-6)


def test_bfloat16_and_half_round_trip():
    for dtype in (mx.float16, mx.bfloat16):
        out = _run("uint i = thread_position_in_grid.x; out[i] = T(float(a[i]) * 0.5f);", dtype=dtype)
        assert mx.array_equal(out, (mx.arange(64) * 0.5).astype(dtype))


def test_unwritten_outputs_are_poisoned():
    out = _run("uint i = thread_position_in_grid.x; if (i % 2) out[i] = a[i];")
    assert mx.isnan(out[::2]).all().item() and not mx.isnan(out[1::2]).any().item()
    out = _run("uint i = thread_position_in_grid.x; if (i % 2) out[i] = a[i];", init_value=3.0)
    assert (out[::2] == 3).all().item()


def test_uninitialized_threadgroup_memory_reads_nan():
    out = _run("threadgroup float t[32]; out[thread_position_in_grid.x] = t[thread_index_in_simdgroup];")
    assert mx.isnan(out).all().item()


def test_divergent_simd_operation_is_refused():
    source = """
    uint i = thread_position_in_grid.x;
    float s = (i % 2) ? simd_sum(float(a[i])) : simd_max(float(a[i]));
    out[i] = T(s);
    """
    with pytest.raises(EmulatorError, match="divergent"):
        _run(source)


def test_early_return_lanes_leave_reductions():
    source = """
    uint i = thread_position_in_grid.x;
    if (i % 32 >= 8) { out[i] = T(0); return; }
    out[i] = T(simd_sum(float(a[i])));
    """
    out = np.array(_run(source))
    assert out[0] == sum(range(8)) and out[32] == sum(range(32, 40))


def test_unsupported_features_are_refused():
    with pytest.raises(NotImplementedError, match="atomics"):
        metal_kernel("x", ["a"], ["out"], "atomic_fetch_add_explicit(out, 1, memory_order_relaxed);")
    with pytest.raises(NotImplementedError, match="simdgroup matrices"):
        metal_kernel("x", ["a"], ["out"], "simdgroup_float8x8 m; simdgroup_load(m, a);")
    with pytest.raises(NotImplementedError, match="non-uniform"):
        _run("out[thread_position_in_grid.x] = a[thread_position_in_grid.x];", n=48, group=32)


def test_compile_errors_are_reported():
    with pytest.raises(EmulatorError, match="failed to compile"):
        _run("out[0] = a.xyz;")
