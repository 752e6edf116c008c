"""What running a model takes in memory beside its weights, from its config alone: the KV cache at a
context length and the prefill pass's activations; and whether weights plus both fit a budget.

The converter's estimate (`convert.estimate`, the `--plan` table), the front ends' memory guard
(`model_source.check_memory`) and prefill's own sizing (`prefill_sizes`) all count with these. Plain
arithmetic, no MLX. The KV cache follows `cache.py`: sliding layers keep at most `sliding_window`
positions of K and V; global K=V layers keep one tensor (the values; keys are derived); a quantized
cache stores `bits` per element plus a scale and a bias per group. Activations follow the prefill's
pass and query-block sizes (`attention_blocks`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .attention_blocks import (
    MIN_PREFILL_CHUNK,
    PREFILL_CHUNK,
    PREFILL_SCORE_BYTES,
    global_blocks_together,
    quantized_key_bytes,
    query_block,
    sliding_query_block,
)
from .budgets import memory_budget_bytes, prefill_score_bytes
from .config import ModelConfig
from .kv_quantization import DEFAULT_KV_GROUP_SIZE, DEFAULT_QUANTIZED_KV_START

# The context a conversion must leave room for to be recommended (`--plan`) or picked by default.
DEFAULT_MIN_CONTEXT = 16384


def kv_bytes(
    config: ModelConfig, context_tokens: int, kv_bits: int | None = None, kv_group_size: int = DEFAULT_KV_GROUP_SIZE
) -> int:
    """KV cache bytes at `context_tokens` (batch 1, bf16, or `kv_bits`-bit quantized in groups of
    `kv_group_size` with bf16 scales and biases)."""
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


def activation_bytes(
    config: ModelConfig,
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
    its query block's keys in one block when they fit `score_bytes`, else a block at a time, the
    blocks a merge keeps alive within it (`kernels.quantized_attention.key_block`).
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
            attention = max(attention, min(per_key * context_tokens, score_bytes))
    return mlp + hidden + attention + 4 * text.vocab_size


@dataclass(frozen=True)
class PrefillSizes:
    """How prefill cuts its work: prompt tokens per pass, and the bound on an attention block's scores."""

    chunk: int
    score_bytes: int


def prefill_sizes(
    config: ModelConfig,
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


def run_bytes(
    config: ModelConfig,
    weights: int,
    context_tokens: int,
    budget_bytes: int,
    kv_bits: int | None = None,
    kv_group_size: int = DEFAULT_KV_GROUP_SIZE,
    quantized_kv_start: int = DEFAULT_QUANTIZED_KV_START,
) -> int:
    """Peak memory of a run that reaches `context_tokens`: weights, KV cache and prefill activations,
    with the prefill's passes and attention blocks sized for `budget_bytes` as they are at run time
    (`prefill_sizes`). With `kv_bits`, the cache stays float until it holds `quantized_kv_start`
    positions, as at run time: the float run up to there, then the quantized one, whichever needs more.
    So a quantized cache never reaches less context than a float one where the two hold the same."""

    def at(tokens: int, bits: int | None) -> int:
        sizes = prefill_sizes(config, weights, tokens, bits, kv_group_size, budget_bytes)
        activations = activation_bytes(config, tokens, sizes.chunk, sizes.score_bytes, bits)
        return weights + kv_bytes(config, tokens, bits, kv_group_size) + activations

    if kv_bits is None or context_tokens <= quantized_kv_start:
        return at(context_tokens, None)
    float_part = at(quantized_kv_start, None) if quantized_kv_start > 0 else 0
    return max(float_part, at(context_tokens, kv_bits))


def fits(
    config: ModelConfig,
    weights: int,
    context_tokens: int,
    budget_bytes: int,
    kv_bits: int | None = None,
    kv_group_size: int = DEFAULT_KV_GROUP_SIZE,
    quantized_kv_start: int = DEFAULT_QUANTIZED_KV_START,
) -> bool:
    needed = run_bytes(config, weights, context_tokens, budget_bytes, kv_bits, kv_group_size, quantized_kv_start)
    return needed <= budget_bytes
