"""Dispatch: references off Metal, and one warning then the reference when a kernel fails."""

import logging

import mlx.core as mx

from mlx_unified.kernels import RopeSpec, dispatch, global_kv_attention
from mlx_unified.kernels.attention_global import global_kv_attention_reference


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
