"""Convert the released checkpoint to our MLX layout, optionally quantized, streaming tensor by tensor.

    python convert.py --hf-path google/gemma-4-12B-it --mlx-path gemma-4-12b-4bit -q
    python convert.py --hf-path SRC --mlx-path DST -q --recipe mixed_4_6
    python convert.py --hf-path DST --mlx-path back-to-bf16 --dequantize
    python convert.py --plan --memory 16GB

Flags follow mlx-lm's `convert`. Memory stays bounded by one block of rows (`BLOCK_BYTES`), whatever
the model size: each block is read from its source shard, cast and quantized, and written at its final
offset in an output shard whose header was laid out in advance. The output is built in a hidden
sibling folder and renamed into place only once complete.
"""

from __future__ import annotations

import argparse
import errno
import json
import shutil
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx

from mlx_unified.config import ConfigError, ModelConfig, load_config
from mlx_unified.errors import InputError
from mlx_unified.loading import ModelLoadError, hf_to_mlx_name, resolve, weight_files
from mlx_unified.memory import (
    GB,
    GIB,
    device_gpu_limit,
    gpu_budget_bytes,
    parameter_count,
    parse_size,
    plan,
    recommend,
    released_config,
    tensor_shapes,
)
from mlx_unified.quant_recipes import (
    MODES,
    RECIPES,
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
from mlx_unified.safetensors_stream import (
    OutputTensor,
    SafetensorsError,
    ShardWriter,
    TensorInfo,
    read_header,
    read_rows,
    row_blocks,
    to_bytes,
)

SUPPORTED_ARCHITECTURES = {"Gemma4UnifiedForConditionalGeneration"}
DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
# Output shards stay under 5 GB (decimal, with room for the header), like mlx-lm's and the hub's.
MAX_SHARD_BYTES = 5 * GB - (1 << 20)
# Files copied next to the weights: tokenizer, chat template, processor and generation settings.
COPIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "processor_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "generation_config.json",
)
# Free space kept beyond the output's size (file system overhead, copied files).
DISK_MARGIN_BYTES = 64 << 20


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


# --- reading the source -------------------------------------------------------------------------------


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
        files = weight_files(path)
        tensors: dict[str, TensorInfo] = {}
        for file in files:
            for name, info in sorted(read_header(file).items(), key=lambda item: item[1].begin):
                mlx_name = hf_to_mlx_name(name)
                if mlx_name is not None:
                    tensors[mlx_name] = info
    except (ModelLoadError, SafetensorsError) as e:
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


# --- planning ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    quantize: bool = False
    bits: int | None = None
    group_size: int | None = None
    mode: str = "affine"
    recipe: str = "uniform"
    dtype: str | None = None


def _output_dtype(settings: Settings, config_dict: dict[str, Any]) -> mx.Dtype:
    """--dtype, else the source's own float dtype, else bfloat16 (the release's)."""
    name = settings.dtype or config_dict.get("dtype") or config_dict.get("torch_dtype")
    name = name or (config_dict.get("text_config") or {}).get("dtype")
    return DTYPES.get(name, mx.bfloat16)


def plan_conversion(source: Source, settings: Settings) -> tuple[Layout, dict[str, Any], mx.Dtype]:
    """Output shards and the config.json `quantization` section (empty when not quantizing)."""
    dtype = _output_dtype(settings, source.config_dict)
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
    return Layout.pack(jobs), section, dtype


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
        output = [OutputTensor(f"model.{name}", _tag(dtype), expected[name])]
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


def _tag(dtype: mx.Dtype) -> str:
    return {mx.bfloat16: "BF16", mx.float16: "F16", mx.float32: "F32"}[dtype]


# --- writing -------------------------------------------------------------------------------------------


def _convert_job(job: Job, writer: ShardWriter, dtype: mx.Dtype) -> None:
    """Cast (and quantize) one tensor block by block; each output gets its share of every block."""
    assert isinstance(job.source, TensorInfo)
    for start, stop in row_blocks(job.source):
        block = read_rows(job.source, start, stop)
        if mx.issubdtype(block.dtype, mx.floating):
            block = block.astype(dtype)
        q = job.quant
        parts = (
            [block]
            if q is None
            else list(mx.quantize(block, group_size=q.group_size, bits=q.bits, mode=q.mode))
        )
        mx.eval(parts)
        for output, part in zip(job.outputs, parts, strict=True):
            row_bytes = output.nbytes // output.shape[0] if output.shape else output.nbytes
            writer.write(output.name, start * row_bytes, to_bytes(part))


def _dequantize_job(job: Job, writer: ShardWriter, dtype: mx.Dtype) -> None:
    (output,) = job.outputs
    if job.quant is None:
        _convert_job(job, writer, dtype)
        return
    assert isinstance(job.source, list)
    packed, *rest = job.source
    q = job.quant
    row_bytes = output.nbytes // output.shape[0]
    for start, stop in row_blocks(packed):
        weight, scales, *biases = (read_rows(t, start, stop) for t in (packed, *rest))
        block = mx.dequantize(
            weight, scales, biases[0] if biases else None, group_size=q.group_size, bits=q.bits, mode=q.mode
        ).astype(dtype)
        mx.eval(block)
        writer.write(output.name, start * row_bytes, to_bytes(block))


def _write_shards(layout: Layout, folder: Path, dtype: mx.Dtype, dequantize: bool) -> dict[str, Any]:
    """Write every shard into `folder`; returns the safetensors index."""
    count = len(layout.shards)
    weight_map: dict[str, str] = {}
    run = _dequantize_job if dequantize else _convert_job
    for number, jobs in enumerate(layout.shards, start=1):
        file_name = "model.safetensors" if count == 1 else f"model-{number:05d}-of-{count:05d}.safetensors"
        outputs = [t for job in jobs for t in job.outputs]
        writer = ShardWriter(folder / file_name, outputs, {"format": "pt" if dequantize else "mlx"})
        try:
            for i, job in enumerate(jobs, start=1):
                run(job, writer, dtype)
                _progress(f"shard {number}/{count}: {i}/{len(jobs)} tensors")
        except BaseException:
            writer.abort()
            raise
        writer.close()
        weight_map.update(dict.fromkeys((t.name for t in outputs), file_name))
    _progress("", end="\n")
    return {"metadata": {"total_size": layout.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}


def _progress(text: str, end: str = "") -> None:
    if sys.stderr.isatty():
        print(f"\r{text:<60}", end=end, file=sys.stderr, flush=True)


def _check_disk(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed + DISK_MARGIN_BYTES:
        raise ConvertError(
            f"not enough free disk in {folder}: the output needs {needed / GB:.2f} GB, {free / GB:.2f} GB free"
        )


@contextmanager
def _staging(destination: Path) -> Iterator[Path]:
    """A hidden sibling folder that replaces `destination` only if the body completes.

    On any failure or interruption the staging folder is removed and `destination` is untouched.
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = destination.parent / f".{destination.name}.partial"
    if staging.exists():
        shutil.rmtree(staging)  # left by a run that was killed outright; never a loadable model
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    previous = destination.parent / f".{destination.name}.previous"
    if destination.exists():
        destination.rename(previous)
    staging.rename(destination)
    if previous.exists():
        shutil.rmtree(previous) if previous.is_dir() else previous.unlink()


def _copy_side_files(source: Path, folder: Path) -> None:
    for name in COPIED_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, folder / name)


def convert(
    hf_path: str | Path,
    mlx_path: str | Path,
    quantize: bool = False,
    q_bits: int | None = None,
    q_group_size: int | None = None,
    q_mode: str = "affine",
    recipe: str | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    dequantize: bool = False,
) -> Path:
    """Convert (or with `dequantize`, restore the released bf16 layout); returns the output folder.

    Raises ConvertError or QuantizationError with a one-line reason; nothing is left at `mlx_path`
    unless the whole output was written.
    """
    destination = Path(mlx_path).expanduser().resolve()
    if destination.exists() and not overwrite:
        raise ConvertError(f"{destination} already exists (pass --overwrite to replace it)")
    if dequantize and (quantize or recipe):
        raise ConvertError("--dequantize cannot be combined with -q/--recipe")
    try:
        source_path = resolve(hf_path)
    except ModelLoadError as e:
        raise ConvertError(str(e)) from e
    if source_path.resolve() == destination:
        raise ConvertError("--mlx-path must differ from --hf-path")
    source = read_source(source_path, quantized=dequantize)
    if dequantize:
        out_dtype = DTYPES[dtype or "bfloat16"]
        layout, section = plan_dequantization(source, out_dtype), {}
    else:
        settings = Settings(
            quantize or recipe is not None, q_bits, q_group_size, q_mode, recipe or "uniform", dtype
        )
        layout, section, out_dtype = plan_conversion(source, settings)
    existing = next(p for p in destination.parents if p.exists())
    _check_disk(existing, layout.total_bytes)

    config = {k: v for k, v in source.config_dict.items() if k not in ("quantization", "quantization_config")}
    config["dtype"] = {mx.bfloat16: "bfloat16", mx.float16: "float16", mx.float32: "float32"}[out_dtype]
    if section:
        config["quantization"] = section
        config["quantization_config"] = section  # the key transformers-style readers look for
    with _staging(destination) as staging:
        try:
            index = _write_shards(layout, staging, out_dtype, dequantize)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise ConvertError(f"disk full while writing {destination}; nothing was written there") from e
            raise ConvertError(f"cannot write {destination}: {e}") from e
        (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        _copy_side_files(source.path, staging)
    return destination


# --- the memory plan -----------------------------------------------------------------------------------


def print_plan(config: ModelConfig, memory: str | None, min_context: int) -> None:
    """A table of candidate conversions against what the GPU may use on this (or the given) Mac."""
    real_limit = None if memory else device_gpu_limit()
    if real_limit is not None:
        budget, where = real_limit, "this Mac's GPU limit (from MLX)"
    else:
        ram = parse_size(memory or "16GB")
        budget = gpu_budget_bytes(ram)
        where = f"a {ram / GIB:g} GB Mac{'' if memory else ' (pass --memory for another size)'}: macOS default GPU limit"
    print(f"GPU memory budget: {budget / GB:.2f} GB, {where}")
    header = (
        f"{'conversion':<12} {'weights GB':>10} {'bits/w':>7} {'max context':>12}  flags"
    )
    print(header)
    print("-" * len(header))
    parameters = parameter_count(config)
    rows = plan(config, budget)
    for row in rows:
        print(
            f"{row.label:<12} {row.weights_bytes / GB:>10.2f} {8 * row.weights_bytes / parameters:>7.2f} "
            f"{_tokens(row.context_bf16_kv):>12}  {row.convert_flags}"
        )
    best = recommend(rows, min_context)
    if best is None:
        print(f"\nNothing leaves {min_context} tokens of context in {budget / GB:.2f} GB.")
    else:
        print(
            f"\nRecommended: {best.label} (the most bits that leave at least {min_context} tokens):\n"
            f"  python convert.py --hf-path google/gemma-4-12B-it --mlx-path gemma-4-12b-mlx {best.convert_flags}"
        )
    print(
        "Context counts the bf16 KV cache (sliding layers capped at the window, one tensor on K=V layers) "
        "and one prefill chunk's activations."
    )


def _tokens(n: int) -> str:
    return "does not fit" if n == 0 else f"{n:,}"


# --- command line --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convert.py",
        description="Convert Gemma 4 12B unified to MLX (optionally quantized), or plan which conversion fits.",
    )
    parser.add_argument("--hf-path", "--model", help="local folder or hub id, e.g. google/gemma-4-12B-it")
    parser.add_argument("--mlx-path", default="mlx_model", help="output folder (default: mlx_model)")
    parser.add_argument("-q", "--quantize", action="store_true", help="quantize the weights")
    parser.add_argument("--q-bits", type=int, choices=(2, 3, 4, 5, 6, 8), help="bits per weight (default 4)")
    parser.add_argument("--q-group-size", type=int, choices=(16, 32, 64, 128), help="group size (default 64)")
    parser.add_argument("--q-mode", default="affine", choices=tuple(MODES), help="quantization mode")
    parser.add_argument(
        "--recipe",
        "--quant-predicate",
        choices=tuple(RECIPES),
        help="; ".join(f"{r.name}: {r.description}" for r in RECIPES.values()),
    )
    parser.add_argument(
        "--dtype", choices=tuple(DTYPES), help="dtype of unquantized tensors (default: source's)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --mlx-path")
    parser.add_argument(
        "-d",
        "--dequantize",
        action="store_true",
        help="turn a quantized folder back into the released bf16 layout",
    )
    parser.add_argument("--plan", action="store_true", help="print which conversion fits a Mac's memory")
    parser.add_argument(
        "--memory", help="the Mac's memory for --plan, e.g. 16GB (default: this Mac's, or 16GB)"
    )
    parser.add_argument(
        "--min-context", type=int, default=16384, help="context the --plan recommendation must leave (tokens)"
    )
    return parser


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.plan:
            config = load_config(args.hf_path) if args.hf_path else released_config()
            print_plan(config, args.memory, args.min_context)
            return 0
        if not args.hf_path:
            raise ConvertError("--hf-path is required (a local folder or a hub id)")
        signal.signal(signal.SIGTERM, _raise_interrupt)  # clean up on `kill` as on Ctrl-C
        out = convert(
            args.hf_path,
            args.mlx_path,
            quantize=args.quantize,
            q_bits=args.q_bits,
            q_group_size=args.q_group_size,
            q_mode=args.q_mode,
            recipe=args.recipe,
            dtype=args.dtype,
            overwrite=args.overwrite,
            dequantize=args.dequantize,
        )
    except KeyboardInterrupt:
        print(f"error: interrupted; nothing was written to {args.mlx_path}", file=sys.stderr)
        return 130
    except (ConvertError, QuantizationError, ModelLoadError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
