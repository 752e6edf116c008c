"""How prefill work is cut: prompt tokens per forward pass, and queries per attention block.

Attention inside a pass runs a block of queries at a time (`attention.prefill_attention`), each over
only the keys it may see. MLX fuses prefill attention only for head dims up to 128 on Metal (and
materializes prefill scores on CUDA and the CPU), so for the 256- and 512-dim heads a block holds its
scores, [heads, block, keys], in float32 for the soft-max. A block also computes, then masks away, the
scores above its diagonal (and, on sliding layers, those before its first query's window): blocks are
sized so that this waste is at most 1/BLOCK_WASTE_DIVISOR of the scores needed. Global layers also
keep a block's scores within a bound that comes from the memory left beside the weights
(`budgets.prefill_score_bytes`); estimates that know no budget assume PREFILL_SCORE_BYTES.

Plain arithmetic, no MLX: the converter's memory estimate follows the same sizes.
"""

from __future__ import annotations

# Prompt tokens per prefill forward pass, at most: long passes keep a GPU's matrix units busy, and
# with attention by query blocks a long pass costs the CPU nothing either.
PREFILL_CHUNK = 2048
# Shorter passes when the memory beside the weights and the KV cache is tight (`footprint.prefill_sizes`).
MIN_PREFILL_CHUNK = 256
BLOCK_WASTE_DIVISOR = 8
GLOBAL_QUERY_BLOCK = 256
MIN_QUERY_BLOCK = 16
PREFILL_SCORE_BYTES = 512 << 20


def query_block(
    heads: int, num_keys: int, score_bytes: int = PREFILL_SCORE_BYTES, num_queries: int | None = None
) -> int:
    """Queries per global-layer attention block when `num_queries` new queries (default: those of the
    longest pass that ends at key `num_keys`) attend over `num_keys` keys, the last query's included:
    GLOBAL_QUERY_BLOCK, or fewer, at least MIN_QUERY_BLOCK, so that the scores a block masks away
    above its diagonal (block / 2 a query) stay within 1/BLOCK_WASTE_DIVISOR of those needed (on
    average num_keys - num_queries / 2 a query), and so that their float32 scores, heads x block x
    keys, fit `score_bytes`."""
    num_queries = min(PREFILL_CHUNK, num_keys) if num_queries is None else num_queries
    twice_needed = max(2 * num_keys - num_queries, 1)  # block / 2 <= needed / divisor
    low_waste = twice_needed // BLOCK_WASTE_DIVISOR
    fits = score_bytes // (4 * heads * max(num_keys, 1))
    return max(min(GLOBAL_QUERY_BLOCK, low_waste, fits), MIN_QUERY_BLOCK)


def global_blocks_together(heads: int, num_queries: int, num_keys: int, score_bytes: int) -> bool:
    """Whether a global layer's query blocks may be left to evaluate together (all their scores alive
    at once, at most every query's over every key): only when that is no more than one full block
    holds, GLOBAL_QUERY_BLOCK queries, and fits `score_bytes`. Else they are evaluated in turn."""
    return num_queries <= GLOBAL_QUERY_BLOCK and 4 * heads * num_queries * num_keys <= score_bytes


def sliding_query_block(window: int) -> int:
    """Queries per sliding-layer attention block: each reads block + window - 1 keys for the window
    its queries need, so the masked-away share is (block - 1) / window. Small windows (test models)
    still get blocks of several queries, up to MIN_QUERY_BLOCK."""
    return max(window // BLOCK_WASTE_DIVISOR, min(window, MIN_QUERY_BLOCK))


# Attending more keys than one block holds keeps up to this many blocks' worth alive at once (the
# running soft-max merges a block's scores into the output while the next block's are computed, as
# measured on MLX's CPU backend at 262K keys); blocks are sized so that all of them fit the bound.
QUANTIZED_ATTENTION_PEAK = 3


def quantized_key_bytes(rows: int, rotated_dims: int = 0) -> int:
    """Transient bytes of attending one key of a quantized cache from `rows` query rows (all heads):
    its float32 score and the exponential of it; on K=V layers, where keys are derived, also its
    `rotated_dims` rotated dims (about 8 float32 copies of them: dequantized, scaled, joined, rotated,
    and the rotation's tables, as measured on MLX's CPU backend). Keys are attended in blocks that keep
    this within a score bound (`kernels.quantized_attention.key_block`)."""
    return 8 * rows + 32 * rotated_dims

