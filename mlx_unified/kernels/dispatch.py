"""Chooses, per call, between a kernel's Metal implementation and its pure-MLX fallback.

Kernels run when MLX has Metal and `MLX_UNIFIED_KERNELS` is not `0`; CPU and CUDA backends use the
fallbacks: MLX's own fused ops where they compute the same thing (`norm_rope_fused`), else the
kernel's reference.  A kernel that fails to compile or launch logs one warning and falls back for
the rest of the process.  MLX builds and launches kernels lazily, at evaluation, so
the first call of each kernel variant is evaluated right away inside the guard: that is where a
compile error would surface.  Later calls of a proven variant stay lazy.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import mlx.core as mx

logger = logging.getLogger("mlx_unified.kernels")

# The factory a kernel is built with: `mx.fast.metal_kernel` or the emulator's drop-in.
KernelFactory = Callable[..., Any]

_failed: set[str] = set()
_proven: set[Hashable] = set()


def kernels_enabled() -> bool:
    return mx.metal.is_available() and os.environ.get("MLX_UNIFIED_KERNELS", "1") != "0"


def metal_factory() -> KernelFactory:
    return mx.fast.metal_kernel


def run(
    name: str,
    variant: Hashable,
    kernel_call: Callable[[], Sequence[mx.array] | mx.array],
    fallback_call: Callable[[], Any],
    supported: bool = True,
) -> Any:
    """`kernel_call()` when kernels are enabled, the kernel handles these shapes (`supported`) and
    `name` has not failed, else `fallback_call()`."""
    if not supported or name in _failed or not kernels_enabled():
        return fallback_call()
    key = (name, variant)
    try:
        result = kernel_call()
        if key not in _proven:
            mx.eval(result)
            _proven.add(key)
        return result
    except Exception as error:  # any compile or launch failure: the fallback is always correct
        _failed.add(name)
        logger.warning("kernel %s failed (%s); using its MLX fallback from now on", name, error)
        return fallback_call()


def reset_failures() -> None:
    """Forget failed and proven kernels (tests)."""
    _failed.clear()
    _proven.clear()
