"""What a checkpoint folder holds, for the loader and the converter alike: where it is (a local folder
or a hub download), its weight shards, the names and shapes of its tensors, its float dtypes.

Nothing here builds the model or imports MLX, so the converter and the command line use it freely.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Collection
from dataclasses import replace
from pathlib import Path
from typing import Any

from .config import ModelConfig, TextConfig
from .errors import InputError
from .safetensors_format import SafetensorsError, TensorInfo, read_header

HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"]
# The float dtypes a checkpoint is loaded or converted to, by MLX's names (as config.json spells them).
FLOAT_DTYPES = ("bfloat16", "float16", "float32")
HASH_CHUNK_BYTES = 16 << 20

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
    if not str(path_or_hub_id).strip():
        # Path("") is the current folder, which no caller means.
        raise ModelLoadError("the model is an empty name: give a checkpoint folder or a hub id (owner/name)")
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


def _allowed_roots(folder: Path) -> list[Path]:
    """Where a checkpoint's files may live: its folder, and for a hub snapshot
    (`.../snapshots/<revision>/`, whose files link to `../../blobs/<hash>`) its repository's blobs."""
    root = folder.resolve()
    roots = [root]
    if root.parent.name == "snapshots":
        roots.append(root.parent.parent / "blobs")
    return roots


def _contained(folder: Path, name: str, where: str) -> Path:
    """`folder / name`, refused (ModelLoadError) when it leads out of the checkpoint: an absolute path,
    a `..` step, or a symbolic link to a file elsewhere."""
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise ModelLoadError(f"{where}: {name!r} is not a file name inside {folder}")
    file = folder / relative
    target = file.resolve()
    if not any(target.is_relative_to(root) for root in _allowed_roots(folder)):
        raise ModelLoadError(f"{where}: {name} links to {target}, outside the checkpoint folder {folder}")
    return file


def weight_files(path: Path) -> list[Path]:
    """The safetensors shards of a checkpoint, from its index when there is one; every one of them
    inside the checkpoint folder (ModelLoadError otherwise)."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ModelLoadError(f"{index}: unreadable index ({type(e).__name__}: {e})") from e
        if not all(isinstance(n, str) for n in names):
            raise ModelLoadError(f"{index}: weight_map values must be file names")
        files = [_contained(path, n, str(index)) for n in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{path}: shards listed in the index are missing: {', '.join(missing)}")
        return files
    files = [_contained(path, f.name, str(path)) for f in sorted(path.glob("*.safetensors"))]
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


def shard_tensors(file: Path) -> dict[str, TensorInfo]:
    """The checked header of one weight shard (`safetensors_format.read_header`): ModelLoadError naming
    the file (and the tensor) when it is truncated or corrupt."""
    try:
        tensors, _ = read_header(file)
    except SafetensorsError as e:
        raise ModelLoadError(str(e)) from e
    except OSError as e:
        raise ModelLoadError(f"{file}: cannot read ({e.strerror or e})") from e
    return tensors


def model_identity(checkpoint: str | Path, records: Path | None = None) -> str:
    """What a saved prefix state must have been computed by: a hash of the checkpoint's config.json and
    of its weights' content (sha256 of each weight file).

    A file's hash is computed once and kept in `records` (a folder; JSON per checkpoint) with the file's
    size, inode, device and modification and change times; it is recomputed when any of them differ (a
    file overwritten in place, or replaced). A hub snapshot's files link to blobs named by their sha256,
    which stands for the hash until the blob changes. OSError when `records` cannot be written."""
    folder = Path(checkpoint).resolve()
    config = folder / "config.json"
    if not config.is_file():
        raise ModelLoadError(f"{folder}: no config.json, cannot identify the model")
    record_file = None if records is None else records / f"{hashlib.sha256(str(folder).encode()).hexdigest()}.json"
    known = _read_records(record_file)
    digest = hashlib.sha256(config.read_bytes())
    seen = {}
    for file in weight_files(folder):
        name = str(file.relative_to(folder))
        stat = file.stat()
        fingerprint = [stat.st_size, stat.st_ino, stat.st_dev, stat.st_mtime_ns, stat.st_ctime_ns]
        entry = known.get(name)
        if not (isinstance(entry, dict) and entry.get("stat") == fingerprint and isinstance(entry.get("sha256"), str)):
            entry = {"stat": fingerprint, "sha256": _content_hash(file, first_sight=name not in known)}
        seen[name] = entry
        digest.update(f"|{name}:{entry['sha256']}".encode())
    if record_file is not None and seen != known:
        _write_records(record_file, {"folder": str(folder), "files": seen})
    return digest.hexdigest()


def _content_hash(file: Path, first_sight: bool) -> str:
    target = file.resolve()
    if (
        first_sight
        and file.is_symlink()
        and target.parent.name == "blobs"
        and re.fullmatch(r"[0-9a-f]{64}", target.name)
    ):
        return target.name  # the hub names a weight blob by its sha256
    digest = hashlib.sha256()
    with open(target, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _read_records(file: Path | None) -> dict[str, Any]:
    if file is None:
        return {}
    try:
        files = json.loads(file.read_text()).get("files", {})
    except (OSError, ValueError, AttributeError):
        return {}  # none yet, or damaged: the hashes are computed again
    return files if isinstance(files, dict) else {}


def _write_records(file: Path, data: dict[str, Any]) -> None:
    """Atomically: a temporary file beside it, then a rename."""
    file.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=file.parent, prefix=".partial-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(temporary, file)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


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


def layer_mlp_and_norm_shapes(text: TextConfig, prefix: str) -> dict[str, tuple[int, ...]]:
    """A decoder layer's MLP, norms and layer scalar under `prefix` (the model's layers and its
    drafter's are alike there)."""
    hidden, inner = text.hidden_size, text.intermediate_size
    shapes = {
        f"{prefix}.mlp.gate_proj.weight": (inner, hidden),
        f"{prefix}.mlp.up_proj.weight": (inner, hidden),
        f"{prefix}.mlp.down_proj.weight": (hidden, inner),
    }
    for norm in ("input", "post_attention", "pre_feedforward", "post_feedforward"):
        shapes[f"{prefix}.{norm}_layernorm.weight"] = (hidden,)
    shapes[f"{prefix}.layer_scalar"] = (1,)
    return shapes


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
        shapes |= layer_mlp_and_norm_shapes(text, prefix)
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
