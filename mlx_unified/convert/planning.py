"""What a conversion writes: the source checkpoint checked tensor by tensor, and the output shards
planned (every tensor's outputs, with the recipe's quantization) before any byte is written."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx

from mlx_unified.budgets import GB
from mlx_unified.checkpoint import (
    FLOAT_DTYPES,
    ModelLoadError,
    drop_absent_media,
    float_dtype,
    hf_to_mlx_name,
    module_quantization,
    peer_name,
    shard_tensors,
    tensor_shapes,
    weight_files,
)
from mlx_unified.config import ConfigError, ModelConfig
from mlx_unified.convert.recipes import (
    MODES,
    QuantizationError,
    QuantParams,
    base_params,
    choose_params,
    get_recipe,
    is_quantizable,
    quantization_section,
    quantized_outputs,
    recipe_default,
)
from mlx_unified.errors import InputError
from mlx_unified.safetensors_format import NUMPY_DTYPES, OutputTensor, TensorInfo, dtype_tag

SUPPORTED_ARCHITECTURES = {"Gemma4UnifiedForConditionalGeneration"}
# Output shards stay under 5 GB (decimal, with room for the header), like mlx-lm's and the hub's.
MAX_SHARD_BYTES = 5 * GB - (1 << 20)


class ConvertError(InputError):
    """A conversion cannot be done; the message says why in one line."""


@dataclass
class Source:
    path: Path
    config_dict: dict[str, Any]
    config: ModelConfig
    tensors: dict[str, TensorInfo]  # by our MLX name, in read order (shard by shard, by offset)


@dataclass
class Job:
    """One source tensor and the output tensors it becomes."""

    source: TensorInfo | list[TensorInfo]  # packed weight, scales[, biases] when dequantizing
    outputs: list[OutputTensor]
    quant: QuantParams | None  # quantize to (converting) or from (dequantizing)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.outputs)


@dataclass
class Layout:
    shards: list[list[Job]] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(job.nbytes for shard in self.shards for job in shard)

    @classmethod
    def pack(cls, jobs: list[Job]) -> Layout:
        """Consecutive jobs into shards of at most MAX_SHARD_BYTES (a larger tensor gets its own)."""
        layout, size = cls(), 0
        for job in jobs:
            if not layout.shards or size + job.nbytes > MAX_SHARD_BYTES:
                layout.shards.append([])
                size = 0
            layout.shards[-1].append(job)
            size += job.nbytes
        return layout


def read_source(path: Path, *, dequantize: bool) -> Source:
    """Open and check a checkpoint folder: config, every shard complete, exactly the expected tensors
    (a media part may be absent as a whole: a text-only conversion).

    To convert, the source is unquantized, in any layout. To `dequantize`, it is a converted folder
    (ours, mlx-vlm's or mlx-lm's, quantized or not), which goes back to the released layout.
    """
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ConvertError(f"{path}: no config.json (not a checkpoint folder, or an incomplete download)")
    try:
        config_dict = json.loads(config_file.read_text())
        config = ModelConfig.from_dict(config_dict)
    except json.JSONDecodeError as e:
        raise ConvertError(f"{config_file}: unreadable ({e})") from e
    except ConfigError as e:
        raise ConvertError(f"{path}: {e}") from e
    architectures = set(config_dict.get("architectures") or SUPPORTED_ARCHITECTURES)
    if not architectures & SUPPORTED_ARCHITECTURES:
        raise ConvertError(
            f"{path}: architecture {', '.join(sorted(architectures))} is not supported "
            f"(expected {', '.join(sorted(SUPPORTED_ARCHITECTURES))})"
        )
    quantized = bool(config.quantization)
    if not dequantize and quantized:
        raise ConvertError(
            f"{path}: already quantized; convert from the released checkpoint, or use --dequantize"
        )

    try:
        tensors: dict[str, TensorInfo] = {}
        released_layout = True
        for file in weight_files(path):
            for name, info in sorted(shard_tensors(file).items(), key=lambda item: item[1].begin):
                mlx_name = hf_to_mlx_name(name)
                if mlx_name is None:
                    continue
                if info.dtype not in NUMPY_DTYPES:
                    raise ConvertError(f"{file}: tensor {name} has dtype {info.dtype}, which the converter does not read")
                tensors[mlx_name] = info
                released_layout &= name.startswith("model.")
    except ModelLoadError as e:
        raise ConvertError(str(e)) from e
    except OSError as e:
        raise ConvertError(f"{path}: cannot read weights ({e})") from e
    if dequantize and not quantized and released_layout:
        raise ConvertError(
            f"{path}: not a quantized checkpoint, and in the released layout already; nothing to dequantize"
        )
    config = drop_absent_media(config, tensors.keys())
    _check_tensors(path, config, tensors, quantized)
    return Source(path, config_dict, config, tensors)


def _check_tensors(path: Path, config: ModelConfig, tensors: dict[str, TensorInfo], quantized: bool) -> None:
    expected = tensor_shapes(config)
    if quantized:
        # Packed modules hold `.weight` (uint32), `.scales` and maybe `.biases`; only names are checked here.
        present = {n for n in tensors if not n.endswith((".scales", ".biases"))}
    else:
        present = set(tensors)
    missing = sorted(expected.keys() - present)
    unexpected = sorted(present - expected.keys())
    if missing:
        raise ConvertError(
            f"{path}: {len(missing)} expected tensors are missing (partial checkpoint?), e.g. {', '.join(missing[:3])}"
        )
    if unexpected:
        raise ConvertError(
            f"{path}: unexpected tensors for a Gemma 4 unified model (another architecture?), "
            f"e.g. {', '.join(unexpected[:3])}"
        )
    if not quantized:
        wrong = [n for n, info in tensors.items() if info.shape != expected[n]]
        if wrong:
            n = wrong[0]
            raise ConvertError(f"{path}: {n} has shape {tensors[n].shape}, the config implies {expected[n]}")


@dataclass(frozen=True)
class Settings:
    quantize: bool = False
    bits: int | None = None
    group_size: int | None = None
    mode: str = "affine"
    recipe: str = "uniform"
    dtype: str | None = None


# safetensors dtype tags of the float dtypes, by MLX's names.
_FLOAT_TAGS = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def _output_dtype(dtype: str | None, source: Source) -> str:
    """--dtype, else the source's own float dtype (its tensors', which mlx-vlm's config.json does not
    always say: it keeps the source's `dtype` when it casts), else bfloat16 (the release's)."""
    if dtype:
        return dtype
    tags = [_FLOAT_TAGS[info.dtype] for info in source.tensors.values() if info.dtype in _FLOAT_TAGS]
    if tags:
        return max(FLOAT_DTYPES, key=tags.count)
    config_dict = source.config_dict
    name = config_dict.get("dtype") or config_dict.get("torch_dtype")
    name = name or (config_dict.get("text_config") or {}).get("dtype")
    return name if name in FLOAT_DTYPES else "bfloat16"


@dataclass
class QuantizationReport:
    """What a quantizing conversion does, for the one line the converter prints."""

    quantized: dict[QuantParams, int]  # modules quantized with each setting
    kept: dict[str, int]  # modules left in float, by reason ("recipe", "width")
    widths: set[int]  # input widths of the modules whose groups do not fit
    parameters: int
    output_bytes: int

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.output_bytes / self.parameters

    def summary(self) -> str:
        settings = ", ".join(
            f"{count} at {p.bits} bits" + ("" if p.mode == "affine" else f" {p.mode}") + f" (group {p.group_size})"
            for p, count in sorted(self.quantized.items(), key=lambda item: -item[1])
        )
        total = sum(self.quantized.values()) + sum(self.kept.values())
        float_parts = []
        if self.kept.get("recipe"):
            float_parts.append(f"{self.kept['recipe']} by the recipe")
        if self.kept.get("width"):
            float_parts.append(f"{self.kept['width']} whose input width is not a multiple of the group size")
        kept = f"; kept in float: {', '.join(float_parts)}" if float_parts else ""
        return (
            f"quantized {sum(self.quantized.values())} of {total} weight matrices: {settings}{kept}; "
            f"{self.bits_per_weight:.2f} bits per weight, {_size(self.output_bytes)}"
        )


def _size(nbytes: int) -> str:
    return f"{nbytes / GB:.2f} GB" if nbytes >= GB // 10 else f"{nbytes / 1e6:.1f} MB"


def plan_conversion(
    source: Source, settings: Settings
) -> tuple[Layout, dict[str, Any], str, QuantizationReport | None]:
    """Output shards in mlx-vlm's and mlx-lm's layout (`checkpoint.peer_name`), the config.json
    `quantization` section keyed by the same names (empty when not quantizing), the float dtype of the
    unquantized tensors, and what was quantized (None when not quantizing).

    Raises QuantizationError when -q would quantize nothing."""
    dtype_name = _output_dtype(settings.dtype, source)
    dtype = float_dtype(dtype_name)
    layer_types = source.config.text.layer_types
    base = recipe = None
    if settings.quantize:
        base = base_params(settings.bits, settings.group_size, settings.mode)
        recipe = get_recipe(settings.recipe, base)
        if recipe.fixed_bits and settings.bits is not None:
            raise QuantizationError(f"recipe {recipe.name} sets its own bits; drop --q-bits")
        if recipe.group_size and settings.group_size not in (None, recipe.group_size):
            raise QuantizationError(
                f"recipe {recipe.name} uses groups of {recipe.group_size}, as mlx-vlm's does; drop --q-group-size"
            )
    jobs, choices = [], {}
    quantized: dict[QuantParams, int] = {}
    kept: dict[str, int] = {}
    widths: set[int] = set()
    for name, info in source.tensors.items():
        quant = None
        if recipe and is_quantizable(name, info.shape):
            quant, reason = choose_params(name, info.shape, layer_types, recipe, base)
            choices[peer_name(name.removesuffix(".weight"))] = quant
            if quant is None:
                kept[reason] = kept.get(reason, 0) + 1
                if reason == "width":
                    widths.add(info.shape[-1])
            else:
                quantized[quant] = quantized.get(quant, 0) + 1
        jobs.append(Job(info, quantized_outputs(peer_name(name), info.shape, quant, dtype), quant))
    layout = Layout.pack(jobs)
    if base is None:
        return layout, {}, dtype_name, None
    if not quantized:
        raise QuantizationError(_nothing_to_quantize(source.path, base, widths))
    section = quantization_section(choices, recipe_default(base, choices))
    parameters = sum(math.prod(info.shape) for info in source.tensors.values())
    return layout, section, dtype_name, QuantizationReport(quantized, kept, widths, parameters, layout.total_bytes)


def _nothing_to_quantize(path: Path, base: QuantParams, widths: set[int]) -> str:
    message = f"{path}: -q would quantize nothing"
    if not widths:
        return f"{message}: the recipe keeps every module in float"
    message += (
        f": no weight matrix has an input width ({', '.join(map(str, sorted(widths)))}) that groups of "
        f"{base.group_size} divide"
    )
    fitting = [g for g in MODES[base.mode].group_sizes if any(w % g == 0 for w in widths)]
    return message + (f"; try --q-group-size {max(fitting)}" if fitting else f" in {base.mode} mode")


def plan_dequantization(source: Source, dtype: mx.Dtype) -> Layout:
    """Released-layout shards (`model.` prefix) holding every tensor in `dtype`, from a quantized folder
    of any layout (ours, mlx-vlm's, mlx-lm's)."""
    section = module_quantization(source.config.quantization) or {}
    default = QuantParams(
        section.get("bits", 4), section.get("group_size", 64), section.get("mode", "affine")
    )
    expected = tensor_shapes(source.config)
    jobs = []
    for name, info in source.tensors.items():
        if name.endswith((".scales", ".biases")):
            continue
        path = name.removesuffix(".weight")
        output = [OutputTensor(f"model.{name}", dtype_tag(dtype), expected[name])]
        if f"{path}.scales" not in source.tensors:
            jobs.append(Job(info, output, None))
            continue
        override = section.get(path)
        merged = {**default.as_dict(), **override} if isinstance(override, dict) else default.as_dict()
        quant = QuantParams(merged["bits"], merged["group_size"], merged["mode"])
        packed = [info, source.tensors[f"{path}.scales"]]
        if quant.mode == "affine":
            packed.append(source.tensors[f"{path}.biases"])
        jobs.append(Job(packed, output, quant))
    return Layout.pack(jobs)
