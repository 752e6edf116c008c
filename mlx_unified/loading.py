"""Loading checkpoints: the released Hugging Face layout or our converted (optionally quantized) one."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from tqdm import tqdm

from .config import ConfigError, ModelConfig, load_config
from .errors import InputError
from .model import Model

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"]

# transformers' in-memory spellings of the vision weights -> the released (and our) names.
_RENAMES = [
    (re.compile(r"^embed_vision\.(patch_ln1|patch_dense|patch_ln2|pos_embedding|pos_norm)"), r"vision_embedder.\1"),
    (re.compile(r"^embed_vision\.multimodal_embedder\."), "embed_vision."),
    (re.compile(r"^embed_audio\.multimodal_embedder\."), "embed_audio."),
]


class ModelLoadError(InputError):
    """A checkpoint cannot be loaded: missing or unreadable files, missing or unexpected weights."""


def hf_to_mlx_name(name: str) -> str | None:
    """Map one checkpoint tensor name to our module path; None for tensors we do not keep."""
    if name.startswith("lm_head.") or "rotary_emb" in name:
        return None  # the head is tied to the embeddings; rotary tables are recomputed
    if name.startswith("model."):
        name = name[len("model.") :]
    for pattern, replacement in _RENAMES:
        name = pattern.sub(replacement, name)
    return name


def weight_files(path: Path) -> list[Path]:
    """The safetensors shards of a checkpoint, from its index when there is one."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise ModelLoadError(f"{index}: unreadable index ({e})") from e
        files = [path / n for n in names]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise ModelLoadError(f"{path}: shards listed in the index are missing: {', '.join(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path}: no *.safetensors weights found")
    return files


def read_weights(path: Path, rename: Callable[[str], str | None] = hf_to_mlx_name) -> dict[str, mx.array]:
    """All tensors of a checkpoint under our names (lazily loaded by MLX); `rename` maps a stored name
    to ours, None to drop it."""
    weights: dict[str, mx.array] = {}
    for file in weight_files(path):
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
    """Turn into quantized modules exactly those stored quantized (their `.scales` are present)."""
    defaults = {k: quantization[k] for k in ("group_size", "bits", "mode") if k in quantization}

    def predicate(path: str, module: nn.Module) -> bool | dict[str, Any]:
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        override = quantization.get(path)
        return {**defaults, **override} if isinstance(override, dict) else defaults

    nn.quantize(model, class_predicate=predicate)


def _read_in(model: Model, progress: bool) -> None:
    """Read the (lazily loaded) weights into memory, layer by layer, with a progress bar if asked."""
    groups = [model.language_model.embed_tokens, *model.language_model.layers, model]
    for group in tqdm(groups, desc="Loading weights", unit="layer", disable=not progress, leave=False):
        mx.eval(group.parameters())


def check_dtype(dtype: str | None) -> None:
    if dtype is not None and dtype not in DTYPES:
        raise ModelLoadError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")


def install_weights(
    model: nn.Module,
    path: Path,
    weights: dict[str, mx.array],
    quantization: dict[str, Any] | None,
    dtype: str | None,
) -> None:
    """Load `weights` (our names) into `model`: the modules stored quantized become quantized, every
    parameter must be present and nothing else (else a ModelLoadError naming `path`), floating tensors
    are cast to dtype (default bfloat16)."""
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
    target = DTYPES[dtype or "bfloat16"]
    try:
        model.load_weights(
            [(k, v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v) for k, v in weights.items()]
        )
    except ValueError as e:  # a tensor of the wrong shape
        raise ModelLoadError(f"{path}: {e}") from e


def load_model(path: str | Path, dtype: str | None = None, lazy: bool = False, progress: bool = False) -> Model:
    """Build the model from a local checkpoint folder. dtype: bfloat16 (default), float16 or float32;
    lazy: leave the weights unread until first use; progress: a progress bar while reading them."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"{path}: not a checkpoint folder")
    config = load_config(path)
    check_dtype(dtype)
    model = Model(config)
    install_weights(model, path, read_weights(path), config.quantization, dtype)
    if config.raw.get("mlx_unified_random_weights"):
        log.warning("%s holds RANDOM weights (a test checkpoint): its output is meaningless text", path)
    if not lazy:
        _read_in(model, progress)
    model.eval()
    return model


def resolve(path_or_hub_id: str | Path) -> Path:
    """A local folder as is, or a hub id downloaded (or found in the local hub cache)."""
    local = Path(path_or_hub_id).expanduser()
    if local.exists():
        return local
    repo_id = str(path_or_hub_id)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise ModelLoadError(f"{repo_id}: no such folder, and not a hub id of the form owner/name")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise ModelLoadError(f"{repo_id}: not found on the hub, or access not granted ({type(e).__name__})") from e
    except LocalEntryNotFoundError as e:
        raise ModelLoadError(f"{repo_id}: not in the local cache and the hub cannot be reached (offline?)") from e
    except OSError as e:
        raise ModelLoadError(f"{repo_id}: download failed ({e})") from e


def load(path_or_hub_id: str | Path, dtype: str | None = None, progress: bool = False) -> tuple[Model, Any]:
    """(model, processor) from a local folder or a hub id."""
    from .processing import Processor

    path = resolve(path_or_hub_id)
    return load_model(path, dtype=dtype, progress=progress), Processor.from_pretrained(path)


__all__ = ["ConfigError", "ModelConfig", "ModelLoadError", "hf_to_mlx_name", "load", "load_model", "resolve"]
