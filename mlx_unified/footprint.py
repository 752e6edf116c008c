"""What running a model takes in memory beside its weights, from its config alone: the KV cache at a
context length and the prefill pass's activations; and whether weights plus both fit a budget.

The converter's estimate (`convert.estimate`, the `--plan` table) and the front ends' memory guard
(`model_source.check_memory`) both count with these. Plain arithmetic, no MLX. The KV cache follows
`cache.py`: sliding layers keep at most `sliding_window` positions of K and V; global K=V layers keep
one tensor (the values; keys are derived). Activations follow the prefill's pass and query-block sizes
(`attention_blocks`).
"""

from __future__ import annotations

from .attention_blocks import (
    PREFILL_CHUNK,
    PREFILL_SCORE_BYTES,
    global_blocks_together,
    query_block,
    sliding_query_block,
)
from .budgets import prefill_score_bytes
from .config import ModelConfig

# The context a conversion must leave room for to be recommended (`--plan`) or picked by default.
DEFAULT_MIN_CONTEXT = 16384

# Cache quantization groups (mlx-lm's QuantizedKVCache default).
KV_GROUP_SIZE = 64


def kv_bytes(config: ModelConfig, context_tokens: int, kv_bits: int | None = None) -> int:
    """KV cache bytes at `context_tokens` (batch 1, bf16 or `kv_bits`-bit quantized with bf16 scales)."""
    text = config.text
    # Per cached element: the packed value plus its share of a group's scale and bias.
    element_bytes = 2.0 if kv_bits is None else kv_bits / 8 + 2 * 2 / KV_GROUP_SIZE
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
    config: ModelConfig, context_tokens: int, chunk: int = PREFILL_CHUNK, score_bytes: int = PREFILL_SCORE_BYTES
) -> int:
    """Peak transient memory of the prefill pass that reaches `context_tokens`, float32.

    Counts the MLP intermediates (gate, up and their product) and a few hidden-state copies of one pass,
    the larger of a global layer's scores (the whole pass's when `global_blocks_together`, else one query
    block's, see `query_block`: its blocks are then evaluated in turn) and a sliding layer's scores for
    the whole pass (its blocks, over block + window keys each, are left to evaluate together), and one
    row of logits.
    """
    text = config.text
    context_tokens = max(context_tokens, 1)
    tokens = min(chunk, context_tokens)
    mlp = 3 * tokens * text.intermediate_size
    hidden = 4 * tokens * text.hidden_size
    heads = text.num_attention_heads
    window = text.sliding_window
    global_queries = tokens
    if not global_blocks_together(heads, tokens, context_tokens, score_bytes):
        global_queries = query_block(heads, context_tokens, score_bytes, tokens)
    scores = heads * max(global_queries * context_tokens, tokens * (window + sliding_query_block(window)))
    return 4 * (mlp + hidden + scores + text.vocab_size)


def run_bytes(
    config: ModelConfig, weights: int, context_tokens: int, budget_bytes: int, kv_bits: int | None = None
) -> int:
    """Weights, KV cache and prefill activations at `context_tokens`, with the prefill's attention
    blocks sized for `budget_bytes` as they are at run time (`budgets.prefill_score_bytes`)."""
    score_bytes = prefill_score_bytes(weights, budget_bytes)
    activations = activation_bytes(config, context_tokens, score_bytes=score_bytes)
    return weights + kv_bytes(config, context_tokens, kv_bits) + activations


def fits(
    config: ModelConfig, weights: int, context_tokens: int, budget_bytes: int, kv_bits: int | None = None
) -> bool:
    return run_bytes(config, weights, context_tokens, budget_bytes, kv_bits) <= budget_bytes
