"""Runtime memory budgets: what the device lets a model use, and the shares of it that prefill
attention and the in-memory prefix cache take beside the weights; wiring the model's memory on a Mac.

MLX is imported where the device is asked, so the front ends' memory check loads nothing heavy."""

from __future__ import annotations

import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import InputError

GB = 10**9
GIB = 1 << 30
PREFILL_SCORE_MIN_BYTES = GIB // 8
PREFILL_SCORE_MAX_BYTES = 4 * GIB
PREFIX_CACHE_MIN_BYTES = GIB // 4
PREFIX_CACHE_MAX_BYTES = 4 * GIB
# Overrides the budget found on this machine, e.g. "11.45GB" (read by `parse_size`).
BUDGET_VARIABLE = "MLX_UNIFIED_MEMORY_BUDGET"


def gpu_budget_bytes(memory_bytes: int) -> int:
    """What macOS lets the GPU wire on a Mac with `memory_bytes` of RAM by default.

    macOS keeps the rest for itself: Metal's recommendedMaxWorkingSetSize is two thirds of RAM
    up to 32 GiB and three quarters above (a 16 GiB Mac reports 11,453,251,584 bytes).
    """
    return memory_bytes * 2 // 3 if memory_bytes <= 32 * GIB else memory_bytes * 3 // 4


def device_gpu_limit() -> int | None:
    """The real limit on an Apple Silicon Mac, from MLX's Metal device; None elsewhere."""
    import mlx.core as mx

    if platform.system() != "Darwin" or not mx.metal.is_available():
        return None
    info = mx.device_info()
    limit = info.get("max_recommended_working_set_size")
    return int(limit) if limit else None


def memory_budget_bytes() -> tuple[int, str]:
    """What a model may use here, and how that figure was found: MLX_UNIFIED_MEMORY_BUDGET when set,
    else the GPU working-set limit on a Mac, the physical memory elsewhere."""
    override = os.environ.get(BUDGET_VARIABLE)
    if override:
        try:
            return parse_size(override), f"the budget {BUDGET_VARIABLE} sets"
        except ValueError as e:
            raise InputError(f"{BUDGET_VARIABLE}: {e}") from e
    limit = device_gpu_limit()
    if limit:
        return limit, "this Mac's GPU working-set limit"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's memory"


def _spare(weights_bytes: int, budget_bytes: int | None, share: int, low: int, high: int) -> int:
    """1/share of what the memory budget (default: this device's) leaves beside the weights, in [low, high]."""
    if budget_bytes is None:
        budget_bytes = memory_budget_bytes()[0]
    return min(max(max(budget_bytes - weights_bytes, 0) // share, low), high)


def prefill_score_bytes(weights_bytes: int, budget_bytes: int | None = None, kv_cache_bytes: int = 0) -> int:
    """Bound on one prefill attention block's scores (`attention_blocks.query_block`): a quarter of what
    the memory budget leaves beside the weights and the KV cache, kept between 128 MiB and 4 GiB, so
    that a long context on a small Mac shrinks the global layers' query blocks instead of swapping."""
    return _spare(weights_bytes + kv_cache_bytes, budget_bytes, 4, PREFILL_SCORE_MIN_BYTES, PREFILL_SCORE_MAX_BYTES)


def prefix_cache_bytes(weights_bytes: int, budget_bytes: int | None = None) -> int:
    """Default bound of the in-memory prefix cache: half of what the memory budget leaves beside the
    weights, kept between 256 MiB and 4 GiB (a fixed 4 GiB would push a 12 or 16 GB Mac into swap;
    `tests/test_memory.py` checks that several long-system-prompt snapshots fit on a 16 GB Mac)."""
    return _spare(weights_bytes, budget_bytes, 2, PREFIX_CACHE_MIN_BYTES, PREFIX_CACHE_MAX_BYTES)


@contextmanager
def wired_limit() -> Iterator[None]:
    """On a Mac, wire up to the GPU working-set limit while the body runs, and restore the previous
    limit after the device's queued work is done: as mlx-lm's and mlx-vlm's generation do, so that
    macOS does not page the weights out between decode steps. Elsewhere, nothing. (mlx-lm's own
    `wired_limit` prints its warnings on stdout, where our command line writes the reply.)"""
    import mlx.core as mx

    limit = device_gpu_limit()
    if limit is None:
        yield
        return
    previous = mx.set_wired_limit(limit)
    try:
        yield
    finally:
        mx.synchronize()
        mx.set_wired_limit(previous)


def parse_size(text: str) -> int:
    """A Mac's memory, '16GB', '16G', '16' or '512MB', -> bytes.

    Mac RAM sizes are binary: a "16 GB" Mac has 16 GiB.
    """
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    units = {"G": GIB, "M": 1 << 20, "T": 1 << 40}
    scale = units.get(value[-1:], GIB)
    number = value[:-1] if value[-1:] in units else value
    try:
        size = float(number) * scale
    except ValueError as e:
        raise ValueError(f"cannot read memory size {text!r} (expected e.g. 16GB)") from e
    if size <= 0:
        raise ValueError(f"memory size must be positive, got {text!r}")
    return int(size)
