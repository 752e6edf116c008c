"""How much memory a converted model needs, from its config alone (no weights).

Weights are counted tensor by tensor with the same recipe logic the converter writes, so the estimate
is the bytes a conversion produces. The KV cache follows `cache.py`: sliding layers keep at most
`sliding_window` positions of K and V; global K=V layers keep one tensor (the values; keys are derived).
"""

from __future__ import annotations

import math
import os
import platform
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from mlx_unified.config import ModelConfig
from mlx_unified.quant_recipes import (
    RECIPES,
    QuantParams,
    base_params,
    get_recipe,
    params_for,
    quantized_outputs,
    supported_modes,
)

GB = 10**9
GIB = 1 << 30
# Prompt tokens per prefill forward pass, at most. Long passes keep a GPU's matrix units busy (on an
# H100, 2048-token passes read a 2K prompt of the 12B 1.26x as fast as mlx-vlm, 512-token ones
# 0.96x); on the CPU, with attention by query blocks, 2048 and 512 run at the same speed.
PREFILL_CHUNK = 2048
# Attention inside a pass runs a block of queries at a time (`attention.Attention`), each over only
# the keys it may see. MLX fuses prefill attention only for head dims up to 128 on Metal (and
# materializes prefill scores on CUDA and the CPU), so for the 256- and 512-dim heads a block holds its
# scores, [heads, block, keys], in float32 for the soft-max. A block also computes, then masks away, the
# scores above its diagonal (and, on sliding layers, those before its first query's window): blocks are
# sized so that this waste is at most 1/BLOCK_WASTE_DIVISOR of the scores needed. Sliding layers take
# blocks of window / 8 queries (block + window - 1 keys each; half-window blocks computed 1.5x what
# they need); global layers blocks of up to GLOBAL_QUERY_BLOCK queries, fewer in short passes (a
# 256-token prompt in one block computes twice its causal triangle) and when their scores would not
# fit a bound that comes from the memory left beside the weights (`prefill_score_bytes`); estimates
# that know no budget assume PREFILL_SCORE_BYTES.
BLOCK_WASTE_DIVISOR = 8
GLOBAL_QUERY_BLOCK = 256
MIN_QUERY_BLOCK = 16
PREFILL_SCORE_BYTES = 512 << 20
PREFILL_SCORE_MIN_BYTES = GIB // 8
PREFILL_SCORE_MAX_BYTES = 4 * GIB
# Cache quantization groups (mlx-lm's QuantizedKVCache default).
KV_GROUP_SIZE = 64


def tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every weight of the model in our MLX layout (CONTRACT.md), with its shape."""
    text = config.text
    hidden = text.hidden_size
    shapes: dict[str, tuple[int, ...]] = {"language_model.embed_tokens.weight": (text.vocab_size, hidden)}
    for i in range(text.num_hidden_layers):
        layer = text.layer(i)
        prefix = f"language_model.layers.{i}"
        q_dim = text.num_attention_heads * layer.head_dim
        kv_dim = layer.num_kv_heads * layer.head_dim
        shapes[f"{prefix}.self_attn.q_proj.weight"] = (q_dim, hidden)
        shapes[f"{prefix}.self_attn.k_proj.weight"] = (kv_dim, hidden)
        if not layer.k_eq_v:
            shapes[f"{prefix}.self_attn.v_proj.weight"] = (kv_dim, hidden)
        shapes[f"{prefix}.self_attn.o_proj.weight"] = (hidden, q_dim)
        shapes[f"{prefix}.self_attn.q_norm.weight"] = (layer.head_dim,)
        shapes[f"{prefix}.self_attn.k_norm.weight"] = (layer.head_dim,)
        shapes[f"{prefix}.mlp.gate_proj.weight"] = (text.intermediate_size, hidden)
        shapes[f"{prefix}.mlp.up_proj.weight"] = (text.intermediate_size, hidden)
        shapes[f"{prefix}.mlp.down_proj.weight"] = (hidden, text.intermediate_size)
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm"):
            shapes[f"{prefix}.{norm}.weight"] = (hidden,)
        shapes[f"{prefix}.post_feedforward_layernorm.weight"] = (hidden,)
        shapes[f"{prefix}.layer_scalar"] = (1,)
    shapes["language_model.norm.weight"] = (hidden,)
    if config.vision is not None:
        vision, embed = config.vision, config.vision.mm_embed_dim
        shapes["vision_embedder.patch_ln1.weight"] = (vision.patch_dim,)
        shapes["vision_embedder.patch_ln1.bias"] = (vision.patch_dim,)
        shapes["vision_embedder.patch_dense.weight"] = (embed, vision.patch_dim)
        shapes["vision_embedder.patch_dense.bias"] = (embed,)
        for norm in ("patch_ln2", "pos_norm"):
            shapes[f"vision_embedder.{norm}.weight"] = (embed,)
            shapes[f"vision_embedder.{norm}.bias"] = (embed,)
        shapes["vision_embedder.pos_embedding"] = (vision.mm_posemb_size, 2, embed)
        shapes["embed_vision.embedding_projection.weight"] = (hidden, embed)
    if config.audio is not None:
        shapes["embed_audio.embedding_projection.weight"] = (hidden, config.audio.audio_embed_dim)
    return shapes


def weights_bytes(
    config: ModelConfig, params: QuantParams | None, recipe: str = "uniform", dtype: mx.Dtype = mx.bfloat16
) -> int:
    """Bytes of tensor data a conversion writes (`params=None`: no quantization)."""
    layer_types = config.text.layer_types
    total = 0
    for name, shape in tensor_shapes(config).items():
        chosen = (
            None
            if params is None
            else params_for(name, shape, layer_types, get_recipe(recipe, params), params)
        )
        total += sum(t.nbytes for t in quantized_outputs(name, shape, chosen, dtype))
    return total


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


def prefill_score_bytes(weights_bytes: int, budget_bytes: int | None = None) -> int:
    """Bound on one prefill attention block's scores: a quarter of what the memory budget leaves beside
    the weights, kept between 128 MiB and 4 GiB.

    For the 4-bit 12B (6.74 GB of weights) this is 1.18 GB on a 16 GiB Mac (global-layer blocks of 256
    queries up to a 32K context, 140 at 128K) and 0.46 GB on a 12 GiB Mac (219 at 32K, 54 at 128K);
    with 4 GiB, blocks stay at 256 queries up to the 256K context.
    """
    if budget_bytes is None:
        budget_bytes = memory_budget_bytes()[0]
    spare = max(budget_bytes - weights_bytes, 0) // 4
    return min(max(spare, PREFILL_SCORE_MIN_BYTES), PREFILL_SCORE_MAX_BYTES)


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


def estimate(
    config: ModelConfig,
    bits: int | None = 4,
    group_size: int = 64,
    context_tokens: int = 8192,
    kv_bits: int | None = None,
    *,
    recipe: str = "uniform",
    mode: str = "affine",
    dtype: mx.Dtype = mx.bfloat16,
) -> dict[str, Any]:
    """Memory to run the model with `context_tokens` of context.

    `bits=None` means unquantized weights in `dtype`. For recipes that fix their own bits
    (`mixed_*`), `bits` only selects that quantization is on.
    """
    params = None if bits is None else base_params(bits, group_size, mode)
    weights = weights_bytes(config, params, recipe, dtype)
    kv = kv_bytes(config, context_tokens, kv_bits)
    activations = activation_bytes(config, context_tokens)
    parameters = parameter_count(config)
    return {
        "weights_bytes": weights,
        "kv_bytes": kv,
        "activation_bytes": activations,
        "total_bytes": weights + kv + activations,
        "parameters": parameters,
        "bits_per_weight": 8 * weights / parameters,
        "context_tokens": context_tokens,
        "kv_bits": kv_bits,
        "recipe": recipe if bits is not None else "none",
    }


def parameter_count(config: ModelConfig) -> int:
    return sum(math.prod(shape) for shape in tensor_shapes(config).values())


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


# Bounds of the in-memory prefix store's default size.
PREFIX_STORE_MIN_BYTES = GIB // 4
PREFIX_STORE_MAX_BYTES = 4 * GIB


def prefix_store_bytes(weights_bytes: int, budget_bytes: int | None = None) -> int:
    """Default bound of the in-memory prefix store: half of what the memory budget leaves beside the
    weights, kept between 256 MiB and 4 GiB.

    A fixed 4 GiB would push a 12 or 16 GB Mac into swap. The 4-bit 12B (6.7 GB of weights) gets 2.4 GB
    on a 16 GiB Mac (11.45 GB budget) and 0.9 GB on a 12 GiB Mac (8.59 GB); one snapshot of a
    21K-token prompt is 0.51 GB (`kv_bytes(released_config(), 21000)`).
    """
    if budget_bytes is None:
        budget_bytes = memory_budget_bytes()[0]
    spare = max(budget_bytes - weights_bytes, 0) // 2
    return min(max(spare, PREFIX_STORE_MIN_BYTES), PREFIX_STORE_MAX_BYTES)


def longest_context(config: ModelConfig, budget_bytes: int, weights: int, kv_bits: int | None = None) -> int:
    """The most context tokens whose KV cache and activations fit beside `weights` (0: nothing fits)."""

    score_bytes = prefill_score_bytes(weights, budget_bytes)

    def fits(tokens: int) -> bool:
        activations = activation_bytes(config, tokens, score_bytes=score_bytes)
        return weights + kv_bytes(config, tokens, kv_bits) + activations <= budget_bytes

    low, high = 0, config.text.max_position_embeddings
    if not fits(1):
        return 0
    while low < high:  # largest `tokens` that fits; memory grows with context
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


@dataclass(frozen=True)
class PlanRow:
    label: str
    recipe: str | None  # None: unquantized
    bits: int | None
    mode: str
    weights_bytes: int
    context_bf16_kv: int

    @property
    def convert_flags(self) -> str:
        if self.recipe is None:
            return "--dtype bfloat16"
        if self.mode != "affine":
            return f"-q --q-mode {self.mode}"
        if RECIPES[self.recipe].fixed_bits:
            return f"-q --recipe {self.recipe}"
        return f"-q --q-bits {self.bits}" + ("" if self.recipe == "uniform" else f" --recipe {self.recipe}")


# Candidate conversions, best quality first (more bits per weight).
_CANDIDATES: list[tuple[str, str | None, int | None, str]] = [
    ("bf16", None, None, "affine"),
    ("8-bit", "uniform", 8, "affine"),
    ("mxfp8", "uniform", 8, "mxfp8"),
    ("6-bit", "uniform", 6, "affine"),
    ("mixed 4/8", "mixed_4_8", 4, "affine"),
    ("5-bit", "uniform", 5, "affine"),
    ("mixed 4/6", "mixed_4_6", 4, "affine"),
    ("4-bit", "uniform", 4, "affine"),
    ("nvfp4", "uniform", 4, "nvfp4"),
    ("mxfp4", "uniform", 4, "mxfp4"),
    ("mixed 3/6", "mixed_3_6", 3, "affine"),
    ("mixed 3/4", "mixed_3_4", 3, "affine"),
]


def plan(config: ModelConfig, budget_bytes: int) -> list[PlanRow]:
    """Every candidate conversion the installed MLX supports, with the context each leaves room for."""
    rows = []
    modes = supported_modes()
    for label, recipe, bits, mode in _CANDIDATES:
        if mode not in modes:
            continue
        params = None if bits is None else base_params(bits, None, mode)
        weights = weights_bytes(config, params, recipe or "uniform")
        rows.append(
            PlanRow(
                label,
                recipe,
                bits,
                mode,
                weights,
                longest_context(config, budget_bytes, weights),
            )
        )
    return rows


def recommend(rows: list[PlanRow], min_context: int) -> PlanRow | None:
    """The highest-quality row that still leaves `min_context` tokens with a bf16 cache."""
    return next((row for row in rows if row.context_bf16_kv >= min_context), None)


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
