"""What a checkpoint folder holds, for the loader and the converter alike: where it is (a local folder
or a hub download), its weight shards, the names and shapes of its tensors, its float dtypes.

Nothing here builds the model or imports MLX, so the converter and the command line use it freely.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Collection
from dataclasses import replace
from pathlib import Path
from typing import Any

from .config import ModelConfig
from .errors import InputError

HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"]
# The float dtypes a checkpoint is loaded or converted to, by MLX's names (as config.json spells them).
FLOAT_DTYPES = ("bfloat16", "float16", "float32")

# The decoder's place in our module tree, and in mlx-vlm's and mlx-lm's (see `hf_to_mlx_name`).
TEXT_PREFIX = "language_model."
PEER_TEXT_PREFIX = "language_model.model."
# The weights of each media part, by the prefixes of our names.
MEDIA_WEIGHTS = {"vision": ("vision_embedder.", "embed_vision."), "audio": ("embed_audio.",)}

# transformers' in-memory spellings of the vision weights -> the released (and our) names.
_RENAMES = [
    (re.compile(r"^embed_vision\.(patch_ln1|patch_dense|patch_ln2|pos_embedding|pos_norm)"), r"vision_embedder.\1"),
    (re.compile(r"^embed_vision\.multimodal_embedder\."), "embed_vision."),
    (re.compile(r"^embed_audio\.multimodal_embedder\."), "embed_audio."),
]


class ModelLoadError(InputError):
    """A checkpoint cannot be loaded: missing or unreadable files, missing or unexpected weights."""


def float_dtype(name: str) -> Any:
    """The MLX dtype of one of FLOAT_DTYPES."""
    import mlx.core as mx

    if name not in FLOAT_DTYPES:
        raise ModelLoadError(f"dtype {name!r}: expected one of {', '.join(FLOAT_DTYPES)}")
    return getattr(mx, name)


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


def stored_weight_bytes(path: Path) -> int | None:
    """The bytes of a checkpoint's weights without reading them: the index's `total_size` (also before
    the shards are downloaded), else the shards' file sizes; None when neither is there."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            total = json.loads(index.read_text()).get("metadata", {}).get("total_size")
        except (OSError, json.JSONDecodeError, AttributeError):
            total = None
        if isinstance(total, int) and total > 0:
            return total
    files = [f for f in path.glob("*.safetensors") if f.is_file()]
    return sum(f.stat().st_size for f in files) if files else None


def model_identity(checkpoint: str | Path) -> str:
    """A hash of a checkpoint's config.json and its weight files' names and sizes: what a saved
    prefix state must have been computed by."""
    folder = Path(checkpoint)
    config = folder / "config.json"
    if not config.is_file():
        raise ModelLoadError(f"{folder}: no config.json, cannot identify the model")
    digest = hashlib.sha256(config.read_bytes())
    for weights in sorted(folder.glob("*.safetensors")):
        digest.update(f"|{weights.name}:{weights.stat().st_size}".encode())
    return digest.hexdigest()


def hf_to_mlx_name(name: str) -> str | None:
    """Map one stored tensor (or module) name of any layout to our module path; None for tensors we do
    not keep. Layouts: the released one (`model.language_model.*`), mlx-vlm's and mlx-lm's
    (`language_model.model.*`: their text model wraps the decoder in a `model`), and our earlier
    converted one (`language_model.*`, the module tree itself)."""
    if name.startswith("lm_head.") or "rotary_emb" in name:
        return None  # the head is tied to the embeddings; rotary tables are recomputed
    name = name.removeprefix("model.")
    if name.startswith(PEER_TEXT_PREFIX):
        name = TEXT_PREFIX + name[len(PEER_TEXT_PREFIX) :]
    for pattern, replacement in _RENAMES:
        name = pattern.sub(replacement, name)
    return name


def peer_name(mlx_name: str) -> str:
    """The name mlx-vlm and mlx-lm store one of our tensors or modules under, which the converter writes
    (the projectors' names are the same in both)."""
    if mlx_name.startswith(TEXT_PREFIX):
        return PEER_TEXT_PREFIX + mlx_name[len(TEXT_PREFIX) :]
    return mlx_name


def module_quantization(
    section: dict[str, Any] | None, rename: Callable[[str], str | None] = hf_to_mlx_name
) -> dict[str, Any] | None:
    """A config's `quantization` section with its per-module entries keyed by our module paths, whichever
    layout wrote it (mlx-vlm and mlx-lm key them by their names, `language_model.model.<path>`):
    `rename` is the one that maps the checkpoint's tensor names (a drafter's own, say)."""
    if not section:
        return section
    normalized: dict[str, Any] = {}
    for key, value in section.items():
        module = rename(key) if isinstance(value, (dict, bool)) else key
        if module is not None:
            normalized[module] = value
    return normalized


def drop_absent_media(config: ModelConfig, names: Collection[str]) -> ModelConfig:
    """`config` without the media parts of which no weight is stored (`names`: ours): a text-only
    conversion (mlx-lm's drops the projectors, and keeps `audio_config`) loads as a text model, which
    refuses images and audio. A part with some of its weights stored is kept, so that the loader names
    the missing ones."""
    absent = {
        part: not any(name.startswith(prefixes) for name in names) for part, prefixes in MEDIA_WEIGHTS.items()
    }
    return replace(
        config,
        vision=None if absent["vision"] else config.vision,
        audio=None if absent["audio"] else config.audio,
    )


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
        for norm in ("input", "post_attention", "pre_feedforward", "post_feedforward"):
            shapes[f"{prefix}.{norm}_layernorm.weight"] = (hidden,)
        shapes[f"{prefix}.layer_scalar"] = (1,)
    shapes["language_model.norm.weight"] = (hidden,)
    if config.vision is not None:
        vision, embed = config.vision, config.vision.mm_embed_dim
        shapes["vision_embedder.patch_ln1.weight"] = (vision.patch_dim,)
        shapes["vision_embedder.patch_ln1.bias"] = (vision.patch_dim,)
        shapes["vision_embedder.patch_dense.weight"] = (embed, vision.patch_dim)
        shapes["vision_embedder.patch_dense.bias"] = (embed,)
        shapes["vision_embedder.patch_ln2.weight"] = (embed,)
        shapes["vision_embedder.patch_ln2.bias"] = (embed,)
        shapes["vision_embedder.pos_embedding"] = (vision.mm_posemb_size, 2, embed)
        shapes["vision_embedder.pos_norm.weight"] = (embed,)
        shapes["vision_embedder.pos_norm.bias"] = (embed,)
        shapes["embed_vision.embedding_projection.weight"] = (hidden, embed)
    if config.audio is not None:
        shapes["embed_audio.embedding_projection.weight"] = (hidden, config.audio.audio_embed_dim)
    return shapes
