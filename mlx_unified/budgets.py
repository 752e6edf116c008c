"""Runtime memory budgets: what the device lets a model use, and the shares of it that prefill
attention and the in-memory prefix cache take beside the weights."""

from __future__ import annotations

import os
import platform

import mlx.core as mx

GB = 10**9
GIB = 1 << 30
PREFILL_SCORE_MIN_BYTES = GIB // 8
PREFILL_SCORE_MAX_BYTES = 4 * GIB
PREFIX_CACHE_MIN_BYTES = GIB // 4
PREFIX_CACHE_MAX_BYTES = 4 * GIB


def gpu_budget_bytes(memory_bytes: int) -> int:
    """What macOS lets the GPU wire on a Mac with `memory_bytes` of RAM by default.

    macOS keeps the rest for itself: Metal's recommendedMaxWorkingSetSize is two thirds of RAM
    up to 32 GiB and three quarters above (a 16 GiB Mac reports 11,453,251,584 bytes).
    """
    return memory_bytes * 2 // 3 if memory_bytes <= 32 * GIB else memory_bytes * 3 // 4


def device_gpu_limit() -> int | None:
    """The real limit on an Apple Silicon Mac, from MLX's Metal device; None elsewhere."""
    if platform.system() != "Darwin" or not mx.metal.is_available():
        return None
    info = mx.device_info()
    limit = info.get("max_recommended_working_set_size")
    return int(limit) if limit else None


def memory_budget_bytes() -> tuple[int, str]:
    """What a model may use here, and how that figure was found: the GPU working-set limit on a Mac,
    the physical memory elsewhere."""
    limit = device_gpu_limit()
    if limit:
        return limit, "this Mac's GPU working-set limit"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's memory"


def _spare(weights_bytes: int, budget_bytes: int | None, share: int, low: int, high: int) -> int:
    """1/share of what the memory budget (default: this device's) leaves beside the weights, in [low, high]."""
    if budget_bytes is None:
        budget_bytes = memory_budget_bytes()[0]
    return min(max(max(budget_bytes - weights_bytes, 0) // share, low), high)


def prefill_score_bytes(weights_bytes: int, budget_bytes: int | None = None) -> int:
    """Bound on one prefill attention block's scores (`attention_blocks.query_block`): a quarter of what
    the memory budget leaves beside the weights, kept between 128 MiB and 4 GiB, so that a long context
    on a small Mac shrinks the global layers' query blocks instead of swapping."""
    return _spare(weights_bytes, budget_bytes, 4, PREFILL_SCORE_MIN_BYTES, PREFILL_SCORE_MAX_BYTES)


def prefix_cache_bytes(weights_bytes: int, budget_bytes: int | None = None) -> int:
    """Default bound of the in-memory prefix cache: half of what the memory budget leaves beside the
    weights, kept between 256 MiB and 4 GiB (a fixed 4 GiB would push a 12 or 16 GB Mac into swap;
    `tests/test_memory.py` checks that several long-system-prompt snapshots fit on a 16 GB Mac)."""
    return _spare(weights_bytes, budget_bytes, 2, PREFIX_CACHE_MIN_BYTES, PREFIX_CACHE_MAX_BYTES)
