"""Loading checkpoints: the released Hugging Face layout, mlx-vlm's and mlx-lm's (optionally quantized,
also text-only), and our earlier converted one; `checkpoint.hf_to_mlx_name` maps each to our names."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from tqdm import tqdm

from .checkpoint import (
    ModelLoadError,
    drop_absent_media,
    float_dtype,
    hf_to_mlx_name,
    module_quantization,
    resolve,
    shard_tensors,
    weight_files,
)
from .config import RANDOM_WEIGHTS_WARNING, load_config
from .model import Model

log = logging.getLogger(__name__)


def read_weights(path: Path, rename: Callable[[str], str | None] = hf_to_mlx_name) -> dict[str, mx.array]:
    """All tensors of a checkpoint under our names (lazily loaded by MLX), each shard's header checked
    first (`checkpoint.shard_tensors`: MLX then reads only offsets that lie inside the file, one tensor's
    bytes each); `rename` maps a stored name to ours, None to drop it."""
    weights: dict[str, mx.array] = {}
    for file in weight_files(path):
        shard_tensors(file)
        try:
            shard = mx.load(str(file))
        except (RuntimeError, ValueError, OSError) as e:
            raise ModelLoadError(f"{file}: unreadable or truncated safetensors ({e})") from e
        for name, value in shard.items():
            mapped = rename(name)
            if mapped is not None:
                weights[mapped] = value
    return weights


def _quantize(model: nn.Module, quantization: dict[str, Any], weights: dict[str, mx.array]) -> None:
    """Turn into quantized modules exactly those stored quantized (their `.scales` are present), with
    their per-module override (keyed by our module paths, see `checkpoint.module_quantization`) or the
    section's defaults."""
    defaults = {k: quantization[k] for k in ("group_size", "bits", "mode") if k in quantization}

    def predicate(path: str, module: nn.Module) -> bool | dict[str, Any]:
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        override = quantization.get(path)
        return {**defaults, **override} if isinstance(override, dict) else defaults

    try:
        nn.quantize(model, class_predicate=predicate)
    except ValueError as e:  # settings MLX cannot quantize with (bits, group size, mode)
        raise ModelLoadError(f"config.json quantization section: {e}") from e


def source_file(path: Path, name: str) -> Path | None:
    """The shard holding tensor `name` (our name), for error messages."""
    for file in weight_files(path):
        if any(hf_to_mlx_name(stored) == name for stored in shard_tensors(file)):
            return file
    return None


def check_shapes(model: nn.Module, weights: dict[str, mx.array], path: Path) -> None:
    """Every weight has its parameter's shape, else a ModelLoadError naming the tensor and its file."""
    for name, parameter in nn.utils.tree_flatten(model.parameters()):
        if weights[name].shape != parameter.shape:
            raise ModelLoadError(
                f"{source_file(path, name) or path}: tensor {name} has shape {tuple(weights[name].shape)}, "
                f"the model (config.json) expects {tuple(parameter.shape)}"
            )


def _read_in(model: Model, path: Path, progress: bool) -> None:
    """Read the (lazily loaded) weights into memory, layer by layer, with a progress bar if asked, and
    refuse NaN or infinite values (one reduction per floating tensor, evaluated with it): a model
    computing with them answers garbage."""
    named = dict(nn.utils.tree_flatten(model.parameters()))
    layers = range(len(model.language_model.layers))
    prefixes = ["language_model.embed_tokens.", *(f"language_model.layers.{i}." for i in layers), ""]
    groups: dict[str, list[str]] = {prefix: [] for prefix in prefixes}
    for name in named:
        groups[next(p for p in prefixes if name.startswith(p))].append(name)
    for names in tqdm(groups.values(), desc="Loading weights", unit="layer", disable=not progress, leave=False):
        finite = {n: mx.isfinite(named[n]).all() for n in names if mx.issubdtype(named[n].dtype, mx.floating)}
        mx.eval([named[n] for n in names], list(finite.values()))
        bad = next((n for n, ok in finite.items() if not ok.item()), None)
        if bad is not None:
            dtype = str(named[bad].dtype).removeprefix("mlx.core.")
            raise ModelLoadError(
                f"{source_file(path, bad) or path}: tensor {bad} holds NaN or infinite values (as {dtype}); "
                "the checkpoint is damaged"
            )


def install_weights(
    model: nn.Module,
    path: Path,
    weights: dict[str, mx.array],
    quantization: dict[str, Any] | None,
    dtype: str | None,
) -> None:
    """Load `weights` (our names) into `model`: the modules stored quantized become quantized (with the
    section's overrides, keyed by our module paths: see `checkpoint.module_quantization`), every
    parameter must be present and nothing else (else a ModelLoadError naming `path`), floating tensors
    are cast to dtype (default bfloat16)."""
    target = float_dtype(dtype or "bfloat16")
    if quantization:
        _quantize(model, quantization, weights)
    expected = {name for name, _ in nn.utils.tree_flatten(model.parameters())}
    missing = sorted(expected - weights.keys())
    unexpected = sorted(weights.keys() - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing weights: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected weights: {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")
        raise ModelLoadError(f"{path}: " + "; ".join(parts))
    check_shapes(model, weights, path)
    model.load_weights(
        [(k, v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v) for k, v in weights.items()]
    )


def load_model(path: str | Path, dtype: str | None = None, lazy: bool = False, progress: bool = False) -> Model:
    """Build the model from a local checkpoint folder. dtype: bfloat16 (default), float16 or float32;
    lazy: leave the weights unread until first use (and unchecked for NaN/inf); progress: a progress
    bar while reading them. ModelLoadError (naming the file, and the tensor) for a checkpoint that
    cannot be loaded as it is.

    A checkpoint without the vision or audio weights (a text-only conversion, such as mlx-lm's) loads
    as a text model that refuses those media."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"{path}: not a checkpoint folder")
    config = load_config(path)
    float_dtype(dtype or "bfloat16")  # a bad dtype is refused before any weight is read
    weights = read_weights(path)
    config = drop_absent_media(config, weights.keys())
    for part, kept in (("vision", config.vision), ("audio", config.audio)):
        if kept is None and config.raw.get(f"{part}_config"):
            log.info("%s: no %s weights stored: a text-only checkpoint", path, part)
    model = Model(config)
    install_weights(model, path, weights, module_quantization(config.quantization), dtype)
    if config.random_weights:
        log.warning("%s: %s", path, RANDOM_WEIGHTS_WARNING)
    if not lazy:
        _read_in(model, path, progress)
    model.eval()
    return model


def load(path_or_hub_id: str | Path, dtype: str | None = None, progress: bool = False) -> tuple[Model, Any]:
    """(model, processor) from a local folder or a hub id."""
    from .processing import Processor

    path = resolve(path_or_hub_id)
    return load_model(path, dtype=dtype, progress=progress), Processor.from_pretrained(path)

