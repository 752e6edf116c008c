"""Quantization recipes: which module gets which bits, and what that writes.

A recipe maps each quantizable module (every Linear and the token embedding, which the tied head
reuses) to MLX quantization parameters, or to `None` to keep it in float. The resulting per-module
choices are recorded in config.json's `quantization` section exactly as mlx-lm and mlx-vlm read it:
defaults at the top level, a dict for each module quantized differently, `false` for each module kept
in float.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import mlx.core as mx

from mlx_unified.errors import InputError
from mlx_unified.safetensors_format import OutputTensor, dtype_tag


class QuantizationError(InputError):
    """Quantization settings MLX cannot apply (bits, group size, mode or recipe)."""


@dataclass(frozen=True)
class QuantParams:
    bits: int
    group_size: int
    mode: str = "affine"

    def as_dict(self) -> dict[str, Any]:
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}


@dataclass(frozen=True)
class ModeLimits:
    default_bits: int
    default_group_size: int
    bits: tuple[int, ...]
    group_sizes: tuple[int, ...]


# What MLX's quantizer accepts in each mode (mlx-lm's defaults: affine 4 bits, group 64).
MODES: dict[str, ModeLimits] = {
    "affine": ModeLimits(4, 64, (2, 3, 4, 5, 6, 8), (32, 64, 128)),
    "mxfp4": ModeLimits(4, 32, (4,), (32,)),
    "nvfp4": ModeLimits(4, 16, (4,), (16,)),
    "mxfp8": ModeLimits(8, 32, (8,), (32,)),
}


@cache
def supported_modes() -> tuple[str, ...]:
    """The quantization modes the installed MLX can run (the floating-point ones are recent)."""
    probe = mx.zeros((1, 64), dtype=mx.bfloat16)
    modes = []
    for mode, limits in MODES.items():
        try:
            mx.eval(
                mx.quantize(probe, group_size=limits.default_group_size, bits=limits.default_bits, mode=mode)
            )
        except (ValueError, RuntimeError, TypeError):
            continue
        modes.append(mode)
    return tuple(modes)


def base_params(bits: int | None, group_size: int | None, mode: str = "affine") -> QuantParams:
    """Validated default parameters; missing bits or group size take the mode's defaults."""
    if mode not in MODES:
        raise QuantizationError(f"unknown quantization mode {mode!r} (choose from {', '.join(MODES)})")
    if mode not in supported_modes():
        raise QuantizationError(f"the installed MLX ({mx.__version__}) cannot quantize in mode {mode!r}")
    limits = MODES[mode]
    params = QuantParams(bits or limits.default_bits, group_size or limits.default_group_size, mode)
    if params.bits not in limits.bits:
        raise QuantizationError(f"{mode} quantization takes bits in {limits.bits}, not {params.bits}")
    if params.group_size not in limits.group_sizes:
        raise QuantizationError(
            f"{mode} quantization takes group size in {limits.group_sizes}, not {params.group_size}"
        )
    return params


_LAYER = re.compile(r"\.layers\.(\d+)\.")
_PROJECTORS = ("vision_embedder.", "embed_vision.", "embed_audio.")
_VISION = ("vision_embedder.", "embed_vision.")
# The group size of mlx-vlm's and mlx-lm's mixed recipes, whatever --q-group-size says.
PEER_MIXED_GROUP_SIZE = 64


@dataclass(frozen=True)
class ModuleInfo:
    """What a recipe may look at to decide a module's bits."""

    path: str  # MLX module path, e.g. "language_model.layers.3.mlp.down_proj"
    layer: int | None  # decoder layer index, None outside the decoder
    num_layers: int
    is_global: bool  # a global (full attention) layer: its k_proj also produces the values

    @property
    def is_projector(self) -> bool:
        return self.path.startswith(_PROJECTORS)

    @property
    def is_vision(self) -> bool:
        """The vision projectors: mlx-vlm keeps every module whose path names vision in float."""
        return self.path.startswith(_VISION)

    @property
    def name(self) -> str:
        return self.path.rsplit(".", 1)[-1]

    @property
    def is_sensitive_layer(self) -> bool:
        """llama.cpp's Q4_K_M choice (also mlx-lm's and mlx-vlm's): first and last eighth, and every
        third between."""
        if self.layer is None:
            return False
        n = self.num_layers
        return self.layer < n // 8 or self.layer >= 7 * n // 8 or (self.layer - n // 8) % 3 == 2


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    choose: Callable[[ModuleInfo, QuantParams], QuantParams | None]
    fixed_bits: bool = False  # the recipe sets its own bits; --q-bits does not apply
    affine_only: bool = False
    group_size: int | None = None  # the recipe's own group size; --q-group-size does not apply


def _uniform(module: ModuleInfo, base: QuantParams) -> QuantParams | None:
    return None if module.is_vision else base


def _float_projectors(module: ModuleInfo, base: QuantParams) -> QuantParams | None:
    return None if module.is_projector else base


def _peer_mixed(low: int, high: int) -> Callable[[ModuleInfo, QuantParams], QuantParams | None]:
    """mlx-vlm's mixed recipe of these bits, module for module (`mixed_quant_predicate_builder` in its
    convert.py): vision in float, the embedding (also the tied head) and the sensitive layers' v_proj
    and down_proj at `high`, everything else, the audio projector included, at `low`, groups of 64."""

    def choose(module: ModuleInfo, base: QuantParams) -> QuantParams | None:
        if module.is_vision:
            return None
        more_bits = module.name == "embed_tokens" or (
            module.name in ("v_proj", "down_proj") and module.is_sensitive_layer
        )
        return QuantParams(high if more_bits else low, PEER_MIXED_GROUP_SIZE, "affine")

    return choose


def _attention_mixed(low: int, high: int) -> Callable[[ModuleInfo, QuantParams], QuantParams | None]:
    """Ours: the peers' choice, plus `high` bits for o_proj and the global layers' k_proj, and every
    projector in float."""

    def choose(module: ModuleInfo, base: QuantParams) -> QuantParams | None:
        if module.is_projector:
            return None  # tiny next to the decoder, and every image or audio token goes through them
        more_bits = (
            module.name in ("embed_tokens", "o_proj")
            or (module.name in ("v_proj", "down_proj") and module.is_sensitive_layer)
            # On K=V global layers k_proj produces the values too, and there are few of them.
            or (module.name == "k_proj" and module.is_global)
        )
        return QuantParams(high if more_bits else low, base.group_size, "affine")

    return choose


# The names mlx-vlm's convert gives its mixed recipes (mlx-lm's share four of them, with the
# embedding at the low bits: on this model its text-only conversion differs there).
PEER_MIXED = {"mixed_2_6": (2, 6), "mixed_3_4": (3, 4), "mixed_3_5": (3, 5), "mixed_3_6": (3, 6),
              "mixed_3_8": (3, 8), "mixed_4_6": (4, 6), "mixed_4_8": (4, 8)}  # fmt: skip
ATTENTION_MIXED = {"mixed_4_8_attn": (4, 8), "mixed_4_6_attn": (4, 6), "mixed_3_6_attn": (3, 6),
                   "mixed_3_4_attn": (3, 4)}  # fmt: skip

RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            "uniform",
            "every Linear and the embedding at --q-bits, the vision projectors in float (plain -q, as mlx-vlm)",
            _uniform,
        ),
        Recipe("float_projectors", "as uniform, with the audio projector in float too", _float_projectors),
        *(
            Recipe(
                name,
                f"mlx-vlm's {name}: embedding and sensitive v/down_proj at {high} bits, the rest at {low}, "
                "vision in float, groups of 64",
                _peer_mixed(low, high),
                fixed_bits=True,
                affine_only=True,
                group_size=PEER_MIXED_GROUP_SIZE,
            )
            for name, (low, high) in PEER_MIXED.items()
        ),
        *(
            Recipe(
                name,
                f"as mixed_{low}_{high}, with o_proj and the global k_proj at {high} bits too and every "
                "projector in float",
                _attention_mixed(low, high),
                fixed_bits=True,
                affine_only=True,
            )
            for name, (low, high) in ATTENTION_MIXED.items()
        ),
    )
}


def get_recipe(name: str, base: QuantParams) -> Recipe:
    if name not in RECIPES:
        raise QuantizationError(f"unknown recipe {name!r} (choose from {', '.join(RECIPES)})")
    recipe = RECIPES[name]
    if recipe.affine_only and base.mode != "affine":
        raise QuantizationError(f"recipe {name} mixes affine bit widths; it cannot use mode {base.mode!r}")
    return recipe


def is_quantizable(mlx_name: str, shape: tuple[int, ...]) -> bool:
    """Linear and Embedding weights: the only 2-D `.weight` tensors in the model."""
    return mlx_name.endswith(".weight") and len(shape) == 2


def module_info(mlx_name: str, layer_types: list[str]) -> ModuleInfo:
    path = mlx_name.removesuffix(".weight")
    match = _LAYER.search(path) if path.startswith("language_model.") else None
    layer = int(match.group(1)) if match else None
    is_global = layer is not None and layer_types[layer] == "full_attention"
    return ModuleInfo(path, layer, len(layer_types), is_global)


def choose_params(
    mlx_name: str, shape: tuple[int, ...], layer_types: list[str], recipe: Recipe, base: QuantParams
) -> tuple[QuantParams | None, str | None]:
    """The recipe's choice for one quantizable tensor, and why it stays float when it does: "recipe"
    (the recipe keeps it) or "width" (its input width is not a multiple of the chosen group size)."""
    params = recipe.choose(module_info(mlx_name, layer_types), base)
    if params is None:
        return None, "recipe"
    if shape[-1] % params.group_size:
        return None, "width"
    return params, None


def params_for(
    mlx_name: str, shape: tuple[int, ...], layer_types: list[str], recipe: Recipe, base: QuantParams
) -> QuantParams | None:
    """The recipe's choice for one tensor, `None` when it stays float (also when groups do not fit)."""
    if not is_quantizable(mlx_name, shape):
        return None
    return choose_params(mlx_name, shape, layer_types, recipe, base)[0]


def quantized_outputs(
    mlx_name: str, shape: tuple[int, ...], params: QuantParams | None, dtype: mx.Dtype
) -> list[OutputTensor]:
    """The tensors one source tensor becomes: itself cast to `dtype`, or MLX's packed triple."""
    if params is None:
        return [OutputTensor(mlx_name, dtype_tag(dtype), shape)]
    path = mlx_name.removesuffix(".weight")
    rows, cols = shape
    groups = cols // params.group_size
    # Affine scales and biases take the weight's dtype; the floating-point modes store 8-bit scales.
    scale_tag = dtype_tag(dtype) if params.mode == "affine" else "U8"
    outputs = [
        OutputTensor(f"{path}.weight", "U32", (rows, cols * params.bits // 32)),
        OutputTensor(f"{path}.scales", scale_tag, (rows, groups)),
    ]
    if params.mode == "affine":
        outputs.append(OutputTensor(f"{path}.biases", scale_tag, (rows, groups)))
    return outputs


def quantization_section(choices: dict[str, QuantParams | None], default: QuantParams) -> dict[str, Any]:
    """config.json's `quantization`: defaults, then per-module overrides (`false` = kept float).

    `choices` maps every quantizable module path to its parameters.
    """
    section: dict[str, Any] = default.as_dict()
    for path, params in sorted(choices.items()):
        if params is None:
            section[path] = False
        elif params != default:
            section[path] = params.as_dict()
    return section


def recipe_default(base: QuantParams, choices: dict[str, QuantParams | None]) -> QuantParams:
    """The top-level default: the most common choice, so the overrides stay few."""
    counts: dict[QuantParams, int] = {}
    for params in choices.values():
        if params is not None:
            counts[params] = counts.get(params, 0) + 1
    return max(counts, key=counts.__getitem__) if counts else base
