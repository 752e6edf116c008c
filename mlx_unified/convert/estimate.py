"""How much memory a converted model needs, from its config alone (no weights), and the `--plan` table.

Weights are counted tensor by tensor with the same recipe logic the converter writes, so the estimate
is the bytes a conversion produces. The KV cache and the prefill activations are the runtime's count
(`mlx_unified.footprint`), which the front ends' memory guard uses too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from mlx_unified.checkpoint import tensor_shapes
from mlx_unified.config import ModelConfig
from mlx_unified.convert.recipes import (
    RECIPES,
    QuantParams,
    base_params,
    get_recipe,
    params_for,
    quantized_outputs,
    supported_modes,
)
from mlx_unified.drafter.config import DrafterConfig, drafter_tensor_shapes
from mlx_unified.footprint import activation_bytes, fits, kv_bytes


def weights_bytes(
    config: ModelConfig | DrafterConfig,
    params: QuantParams | None,
    recipe: str = "uniform",
    dtype: mx.Dtype = mx.bfloat16,
) -> int:
    """Bytes of tensor data a conversion of the model (or of its drafter) writes (`params=None`: no
    quantization)."""
    layer_types = config.text.layer_types
    shapes = drafter_tensor_shapes(config) if isinstance(config, DrafterConfig) else tensor_shapes(config)
    total = 0
    for name, shape in shapes.items():
        chosen = (
            None
            if params is None
            else params_for(name, shape, layer_types, get_recipe(recipe, params), params)
        )
        total += sum(t.nbytes for t in quantized_outputs(name, shape, chosen, dtype))
    return total


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
    activations = activation_bytes(config, context_tokens, kv_bits=kv_bits)
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


def longest_context(config: ModelConfig, budget_bytes: int, weights: int, kv_bits: int | None = None) -> int:
    """The most context tokens whose KV cache (bf16, or `kv_bits`-bit) and the activations of the
    prefill that reaches them (passes and attention blocks as `footprint.prefill_sizes` sizes them for
    that context) fit beside `weights` (0: nothing fits)."""
    low, high = 0, config.text.max_position_embeddings
    if not fits(config, weights, 1, budget_bytes, kv_bits):
        return 0
    while low < high:  # largest `tokens` that fits; memory grows with context
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(config, weights, mid, budget_bytes, kv_bits) else (low, mid - 1)
    return low


@dataclass(frozen=True)
class PlanRow:
    label: str
    recipe: str | None  # None: unquantized
    bits: int | None
    mode: str
    weights_bytes: int
    context_bf16_kv: int
    context_kv8: int  # with an 8-bit KV cache (`--kv-bits 8`, groups of 64)
    context_kv4: int  # with a 4-bit one

    @property
    def convert_flags(self) -> str:
        if self.recipe is None:
            return "--dtype bfloat16"
        if self.mode != "affine":
            return f"-q --q-mode {self.mode}"
        if RECIPES[self.recipe].fixed_bits:
            return f"-q --recipe {self.recipe}"
        return f"-q --q-bits {self.bits}" + ("" if self.recipe == "uniform" else f" --recipe {self.recipe}")


# Candidate conversions, best quality first (more bits per weight). The mixed recipes go by their
# names: mlx-vlm's (`mixed_4_6`, ...) and ours (`mixed_4_6_attn`, see recipes.py).
_CANDIDATES: list[tuple[str, str | None, int | None, str]] = [
    ("bf16", None, None, "affine"),
    ("8-bit", "uniform", 8, "affine"),
    ("mxfp8", "uniform", 8, "mxfp8"),
    ("6-bit", "uniform", 6, "affine"),
    ("5-bit", "uniform", 5, "affine"),
    ("mixed_4_8", "mixed_4_8", 4, "affine"),
    ("mixed_4_6_attn", "mixed_4_6_attn", 4, "affine"),
    ("mixed_4_6", "mixed_4_6", 4, "affine"),
    ("4-bit", "uniform", 4, "affine"),
    ("nvfp4", "uniform", 4, "nvfp4"),
    ("mxfp4", "uniform", 4, "mxfp4"),
    ("mixed_3_6", "mixed_3_6", 3, "affine"),
    ("mixed_3_4", "mixed_3_4", 3, "affine"),
]


def plan(config: ModelConfig, budget_bytes: int, drafter: DrafterConfig | None = None) -> list[PlanRow]:
    """Every candidate conversion the installed MLX supports, with the context each leaves room for with
    a bf16, an 8-bit and a 4-bit KV cache; with a drafter (speculative decoding), its weights converted
    alike count beside the model's."""
    rows = []
    modes = supported_modes()
    for label, recipe, bits, mode in _CANDIDATES:
        if mode not in modes:
            continue
        params = None if bits is None else base_params(bits, None, mode)
        weights = weights_bytes(config, params, recipe or "uniform")
        if drafter is not None:
            weights += weights_bytes(drafter, params, recipe or "uniform")
        rows.append(
            PlanRow(
                label,
                recipe,
                bits,
                mode,
                weights,
                *(longest_context(config, budget_bytes, weights, kv_bits) for kv_bits in (None, 8, 4)),
            )
        )
    return rows


def recommend(rows: list[PlanRow], min_context: int) -> PlanRow | None:
    """The highest-quality row that still leaves `min_context` tokens with a bf16 cache."""
    return next((row for row in rows if row.context_bf16_kv >= min_context), None)
