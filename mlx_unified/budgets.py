"""Runtime memory budgets: what the device lets a model use, what its KV cache and prefill take, and
the shares of it that prefill attention and the in-memory prefix cache take beside the weights.

The KV cache and prefill figures follow `cache.py` and `attention_blocks`: sliding layers keep at most
`sliding_window` positions of K and V; global K=V layers keep one tensor (the values; keys are
derived); a quantized cache stores `bits` per element plus a scale and a bias per group. Prefill
sizes its passes and attention blocks from what the budget leaves beside the weights and the cache
(`prefill_sizes`), and the converter's `--plan` counts the same.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from .attention_blocks import (
    MIN_PREFILL_CHUNK,
    PREFILL_CHUNK,
    PREFILL_SCORE_BYTES,
    global_blocks_together,
    quantized_key_bytes,
    query_block,
    sliding_query_block,
)
from .kv_quantization import DEFAULT_KV_GROUP_SIZE

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


def kv_bytes(
    config: Any, context_tokens: int, kv_bits: int | None = None, kv_group_size: int = DEFAULT_KV_GROUP_SIZE
) -> int:
    """KV cache bytes at `context_tokens` (batch 1, bf16, or `kv_bits`-bit quantized in groups of
    `kv_group_size` with bf16 scales and biases). `config`: a `config.ModelConfig`."""
    text = config.text
    # Per cached element: the packed value plus its share of a group's scale and bias.
    element_bytes = 2.0 if kv_bits is None else kv_bits / 8 + 2 * 2 / kv_group_size
    elements = 0
    for i in range(text.num_hidden_layers):
        layer = text.layer(i)
        if layer.is_sliding:
            elements += 2 * layer.num_kv_heads * min(context_tokens, text.sliding_window) * layer.head_dim
        else:
            tensors = 1 if layer.k_eq_v else 2  # K=V layers cache only the values
            elements += tensors * layer.num_kv_heads * context_tokens * layer.head_dim
    return int(elements * element_bytes)


# A quantized global layer's attention over a long context peaks at up to this many score bounds (its
# key blocks, merged by a running soft-max: measured 2.7 at 262K keys and a 128 MiB bound on MLX's
# CPU backend).
QUANTIZED_ATTENTION_PEAK = 3


def activation_bytes(
    config: Any,
    context_tokens: int,
    chunk: int = PREFILL_CHUNK,
    score_bytes: int = PREFILL_SCORE_BYTES,
    kv_bits: int | None = None,
) -> int:
    """Peak transient memory of the prefill pass that reaches `context_tokens`, float32 (bf16 for
    derived keys), with a float cache or a `kv_bits` one.

    Counts the MLP intermediates (gate, up and their product) and a few hidden-state copies of one pass,
    the larger of a global layer's attention and a sliding layer's scores for the whole pass (its blocks,
    over block + window keys each, are left to evaluate together), and one row of logits. A global
    layer's attention, float cache: its scores (the whole pass's when `global_blocks_together`, else
    one query block's, see `query_block`: its blocks are then evaluated in turn) and, on K=V layers, the
    keys derived from the cached tensor (the scaled tensor and its rotation, bf16). Quantized cache:
    its query block's keys attended a block at a time within `score_bytes`, QUANTIZED_ATTENTION_PEAK
    of them at most.
    """
    text = config.text
    context_tokens = max(context_tokens, 1)
    tokens = min(chunk, context_tokens)
    mlp = 4 * 3 * tokens * text.intermediate_size
    hidden = 4 * 4 * tokens * text.hidden_size
    heads = text.num_attention_heads
    window = text.sliding_window
    global_queries = tokens
    if not global_blocks_together(heads, tokens, context_tokens, score_bytes):
        global_queries = query_block(heads, context_tokens, score_bytes, tokens)
    sliding = 4 * heads * tokens * (window + sliding_query_block(window))
    layers = [text.layer(i) for i in range(text.num_hidden_layers)]
    global_layer = next((layer for layer in layers if not layer.is_sliding), None)
    attention = sliding
    if global_layer is not None:
        rows = heads * global_queries
        if kv_bits is None:
            derived = 2 * 2 * context_tokens * global_layer.num_kv_heads * global_layer.head_dim
            attention = max(attention, 4 * rows * context_tokens + (derived if global_layer.k_eq_v else 0))
        else:
            rotated = (global_layer.rope.rotated_dims or global_layer.head_dim) if global_layer.k_eq_v else 0
            per_key = quantized_key_bytes(rows, rotated)
            attention = max(attention, QUANTIZED_ATTENTION_PEAK * min(per_key * context_tokens, score_bytes))
    return mlp + hidden + attention + 4 * text.vocab_size


@dataclass(frozen=True)
class PrefillSizes:
    """How prefill cuts its work: prompt tokens per pass, and the bound on an attention block's scores."""

    chunk: int
    score_bytes: int


def prefill_sizes(
    config: Any,
    weights_bytes: int,
    context_tokens: int,
    kv_bits: int | None = None,
    kv_group_size: int = DEFAULT_KV_GROUP_SIZE,
    budget_bytes: int | None = None,
) -> PrefillSizes:
    """Pass length and score bound for a prompt that fills `context_tokens`: the score bound from what
    the budget (default: this device's) leaves beside the weights and the KV cache of that context
    (`prefill_score_bytes`), and passes of PREFILL_CHUNK tokens, halved (down to MIN_PREFILL_CHUNK)
    while the weights, the cache and one pass's activations (`activation_bytes`) would not fit."""
    if budget_bytes is None:
        budget_bytes = memory_budget_bytes()[0]
    kv = kv_bytes(config, context_tokens, kv_bits, kv_group_size)
    score_bytes = prefill_score_bytes(weights_bytes, budget_bytes, kv)
    chunk = PREFILL_CHUNK
    while chunk > MIN_PREFILL_CHUNK and (
        weights_bytes + kv + activation_bytes(config, context_tokens, chunk, score_bytes, kv_bits) > budget_bytes
    ):
        chunk //= 2
    return PrefillSizes(chunk, score_bytes)

