"""What a conversion writes: the source checkpoint checked tensor by tensor, and the output shards
planned (every tensor's outputs, with the recipe's quantization) before any byte is written."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx

from mlx_unified.budgets import GB
from mlx_unified.checkpoint import (
    FLOAT_DTYPES,
    ModelLoadError,
    float_dtype,
    hf_to_mlx_name,
    shard_tensors,
    tensor_shapes,
    weight_files,
)
from mlx_unified.config import ConfigError, ModelConfig
from mlx_unified.convert.recipes import (
    QuantizationError,
    QuantParams,
    base_params,
    get_recipe,
    is_quantizable,
    params_for,
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


def read_source(path: Path, *, quantized: bool) -> Source:
    """Open and check a checkpoint folder: config, every shard complete, exactly the expected tensors.

    `quantized`: expect one of our converted, quantized folders (for --dequantize) rather than a
    released-layout one.
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
    if quantized and not config.quantization:
        raise ConvertError(f"{path}: not a quantized checkpoint; nothing to dequantize")
    if not quantized and config.quantization:
        raise ConvertError(
            f"{path}: already quantized; convert from the released checkpoint, or use --dequantize"
        )

    try:
        tensors: dict[str, TensorInfo] = {}
        for file in weight_files(path):
            for name, info in sorted(shard_tensors(file).items(), key=lambda item: item[1].begin):
                mlx_name = hf_to_mlx_name(name)
                if mlx_name is None:
                    continue
                if info.dtype not in NUMPY_DTYPES:
                    raise ConvertError(f"{file}: tensor {name} has dtype {info.dtype}, which the converter does not read")
                tensors[mlx_name] = info
    except ModelLoadError as e:
        raise ConvertError(str(e)) from e
    except OSError as e:
        raise ConvertError(f"{path}: cannot read weights ({e})") from e
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


def _output_dtype(settings: Settings, config_dict: dict[str, Any]) -> str:
    """--dtype, else the source's own float dtype, else bfloat16 (the release's)."""
    name = settings.dtype or config_dict.get("dtype") or config_dict.get("torch_dtype")
    name = name or (config_dict.get("text_config") or {}).get("dtype")
    return name if name in FLOAT_DTYPES else "bfloat16"


def plan_conversion(source: Source, settings: Settings) -> tuple[Layout, dict[str, Any], str]:
    """Output shards, the config.json `quantization` section (empty when not quantizing) and the float
    dtype of the unquantized tensors."""
    dtype_name = _output_dtype(settings, source.config_dict)
    dtype = float_dtype(dtype_name)
    layer_types = source.config.text.layer_types
    base = recipe = None
    if settings.quantize:
        base = base_params(settings.bits, settings.group_size, settings.mode)
        recipe = get_recipe(settings.recipe, base)
        if recipe.fixed_bits and settings.bits is not None:
            raise QuantizationError(f"recipe {recipe.name} sets its own bits; drop --q-bits")
    jobs, choices = [], {}
    for name, info in source.tensors.items():
        quant = params_for(name, info.shape, layer_types, recipe, base) if recipe else None
        if recipe and is_quantizable(name, info.shape):
            choices[name.removesuffix(".weight")] = quant
        jobs.append(Job(info, quantized_outputs(name, info.shape, quant, dtype), quant))
    section = quantization_section(choices, recipe_default(base, choices)) if base else {}
    return Layout.pack(jobs), section, dtype_name


def plan_dequantization(source: Source, dtype: mx.Dtype) -> Layout:
    """Released-layout shards (`model.` prefix) holding every tensor in `dtype`."""
    section = source.config.quantization or {}
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
        quant = QuantParams(**override) if isinstance(override, dict) else default
        packed = [info, source.tensors[f"{path}.scales"]]
        if quant.mode == "affine":
            packed.append(source.tensors[f"{path}.biases"])
        jobs.append(Job(packed, output, quant))
    return Layout.pack(jobs)
