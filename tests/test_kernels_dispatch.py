"""Dispatch: fallbacks off Metal, and one warning then the fallback when a kernel fails."""

import logging

import mlx.core as mx
import pytest

from mlx_unified.kernels import (
    DEFAULT_ROPE,
    PROPORTIONAL_ROPE,
    RopeSpec,
    dispatch,
    global_kv_attention,
    norm_rope,
)
from mlx_unified.kernels.attention_global import global_kv_attention_reference
from mlx_unified.kernels.cases import TOLERANCE, max_relative_error
from mlx_unified.kernels.norm_rope import norm_rope_fused, norm_rope_reference
from mlx_unified.kernels.rope_tables import rope_fused, rope_reference


def test_reference_without_metal(monkeypatch):
    monkeypatch.setattr(dispatch, "kernels_enabled", lambda: False)
    q, v, w = mx.random.normal((1, 4, 1, 64)), mx.random.normal((1, 1, 10, 64)), mx.ones((64,))
    rope = RopeSpec(1e6, 16)
    expected = global_kv_attention_reference(q, v, w, 10, rope=rope)
    assert mx.allclose(global_kv_attention(q, v, w, 10, rope=rope), expected)


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("MLX_UNIFIED_KERNELS", "0")
    assert not dispatch.kernels_enabled()


def test_failing_kernel_warns_once_and_falls_back(monkeypatch, caplog):
    dispatch.reset_failures()
    monkeypatch.setattr(dispatch, "kernels_enabled", lambda: True)
    calls = []

    def broken():
        calls.append(1)
        raise RuntimeError("Unable to build metal library")

    with caplog.at_level(logging.WARNING, logger="mlx_unified.kernels"):
        for _ in range(3):
            assert dispatch.run("probe", 0, broken, lambda: mx.array(7)).item() == 7
    assert len(calls) == 1
    assert sum("probe" in r.message for r in caplog.records) == 1
    dispatch.reset_failures()


def test_first_call_is_evaluated_inside_the_guard(monkeypatch):
    dispatch.reset_failures()
    monkeypatch.setattr(dispatch, "kernels_enabled", lambda: True)
    evaluated = []
    monkeypatch.setattr(dispatch.mx, "eval", lambda *a: evaluated.append(a))
    for _ in range(2):
        dispatch.run("probe2", ("f32",), lambda: mx.array(1), lambda: mx.array(2))
    assert len(evaluated) == 1
    dispatch.reset_failures()


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize(("rope", "head_dim"), [(DEFAULT_ROPE, 256), (PROPORTIONAL_ROPE, 512), (None, 512)])
def test_norm_rope_off_metal_is_mlx_fused_and_matches_the_reference(monkeypatch, rope, head_dim, dtype):
    monkeypatch.setattr(dispatch, "kernels_enabled", lambda: False)
    x = mx.random.normal((2, 5, 3, head_dim)).astype(dtype)
    w = (1.0 + 0.2 * mx.random.normal((head_dim,))).astype(dtype)
    got = norm_rope(x, w, 700, rope=rope)
    assert mx.array_equal(got, norm_rope_fused(x, w, 700, rope=rope))
    expected = norm_rope_reference(x, w, 700, rope=rope)
    assert got.shape == expected.shape == (2, 3, 5, head_dim) and got.dtype == dtype
    # float32: MLX's angles are position / period, the reference's position * inv_freq (2e-5 apart here)
    assert max_relative_error(got, expected) <= (5e-5 if dtype == mx.float32 else TOLERANCE[dtype])


def test_fused_rope_leaves_the_unrotated_dims_of_proportional_rope_alone():
    x = mx.random.normal((1, 1, 4, 512))
    got = rope_fused(x, 123, PROPORTIONAL_ROPE)
    assert mx.array_equal(got[..., 64:256], x[..., 64:256]) and mx.array_equal(got[..., 320:], x[..., 320:])
    assert max_relative_error(got, rope_reference(x, mx.arange(123, 127), PROPORTIONAL_ROPE)) <= 1e-5
