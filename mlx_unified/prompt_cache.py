"""Prefix cache: reuse the KV state of the longest prompt prefix already computed.

A sliding layer keeps a ring buffer of its last `window` positions, which cannot be rewound to an
earlier length. So states are stored as *snapshots taken exactly at a prefix length* (prefill ends a
chunk there), and a new prompt reuses the longest stored snapshot that is a prefix of it and shorter
than it (at least one new token must run to produce logits). The same rule serves global layers.

A prefix is named by everything that determines its KV state:
- the token ids;
- the soft tokens of the media inside it (placeholder ids are the same for every recording, so the
  projected embeddings at media positions are hashed);
- the attention variant: a key-span bias (audio emphasis) changes the state of every position after
  the span start, so a prefix reaching past it is named with the bias, one ending before it is not.

`PromptCache` keeps snapshots in memory (bounded in bytes, least recently used out) and, optionally,
persists some of them through a `DiskPrefixStore` (safetensors files keyed by model identity and
prefix name, checked on load, size-capped, oldest out).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache

from .cache import LayerCache, SharedKVCache, SlidingWindowCache
from .errors import InputError
from .kernels import SpanBias
from .memory import PREFIX_STORE_MAX_BYTES

log = logging.getLogger(__name__)

FORMAT_VERSION = "1"
DEFAULT_DISK_BYTES = 16 << 30
SUFFIX = ".safetensors"


def default_folder() -> Path:
    """Where persisted prefixes live: $MLX_UNIFIED_CACHE_DIR/prefixes, by default ~/.cache/mlx-unified."""
    return Path(os.environ.get("MLX_UNIFIED_CACHE_DIR", "~/.cache/mlx-unified")).expanduser() / "prefixes"


class PromptCacheError(InputError):
    """A persisted prefix does not belong to this model or these tokens, or is unreadable."""


@dataclass(frozen=True)
class LayerState:
    """One layer's cache at a prefix length: its kind, its arrays (copies) and its integer metadata."""

    kind: str  # "sliding" (window, offset), "shared" (offset,) or "kv" (offset,)
    arrays: tuple[mx.array, ...]
    meta: tuple[int, ...]


@dataclass
class PrefixState:
    """The whole model's cache after the first `length` tokens of a prompt."""

    name: str  # PrefixKeys.name(length): what the state depends on
    token_ids: np.ndarray  # int32 [length]
    layers: list[LayerState]

    @property
    def length(self) -> int:
        return len(self.token_ids)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for layer in self.layers for a in layer.arrays)


def _copy(a: mx.array) -> mx.array:
    # A new buffer: caches write into their arrays in place, a stored snapshot must not see that.
    return mx.array(np.asarray(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a)).view(a.dtype)


def snapshot_cache(cache: Sequence[LayerCache]) -> list[LayerState]:
    """Copies of every layer's state now (evaluated, independent of the live cache)."""
    layers = []
    for c in cache:
        if isinstance(c, SlidingWindowCache):
            n = c.size()
            arrays = () if c.keys is None else (c.keys[:, :, :n], c.values[:, :, :n])
            layers.append(LayerState("sliding", tuple(_copy(a) for a in arrays), (c.window, c.offset)))
        elif isinstance(c, SharedKVCache):
            arrays = () if c.values is None else (c.values[:, :, : c.offset],)
            layers.append(LayerState("shared", tuple(_copy(a) for a in arrays), (c.offset,)))
        elif isinstance(c, KVCache):
            arrays = () if c.keys is None else (c.keys[:, :, : c.offset], c.values[:, :, : c.offset])
            layers.append(LayerState("kv", tuple(_copy(a) for a in arrays), (c.offset,)))
        else:
            raise TypeError(f"cannot snapshot a {type(c).__name__}")
    mx.eval([layer.arrays for layer in layers])
    return layers


def restore_cache(layers: Sequence[LayerState]) -> list[LayerCache]:
    """Fresh caches holding copies of a snapshot, so the stored snapshot stays untouched."""
    cache: list[LayerCache] = []
    copies = [tuple(_copy(a) for a in layer.arrays) for layer in layers]
    mx.eval(copies)
    for layer, arrays in zip(layers, copies, strict=True):
        if layer.kind == "sliding":
            c = SlidingWindowCache(layer.meta[0])
            if arrays:
                c.keys, c.values = arrays
            c.offset = layer.meta[1]
        elif layer.kind == "shared":
            c = SharedKVCache()
            if arrays:
                (c.values,) = arrays
            c.offset = layer.meta[0]
        elif layer.kind == "kv":
            c = KVCache()
            if arrays:
                c.keys, c.values = arrays
            c.offset = layer.meta[0]
        else:
            raise PromptCacheError(f"unknown layer state kind {layer.kind!r}")
        cache.append(c)
    return cache


def matches_model(layers: Sequence[LayerState], cache: Sequence[LayerCache]) -> bool:
    """Whether a snapshot has the layer kinds (and windows) of a fresh cache of the model."""
    kinds = {SlidingWindowCache: "sliding", SharedKVCache: "shared", KVCache: "kv"}
    if len(layers) != len(cache):
        return False
    for layer, c in zip(layers, cache, strict=True):
        if kinds.get(type(c)) != layer.kind:
            return False
        if layer.kind == "sliding" and layer.meta[0] != c.window:
            return False
    return True


class PrefixKeys:
    """Names of the prefixes of one prompt: what a prefix's KV state depends on, hashed.

    `media_positions`/`media_rows`: positions of the media soft tokens and their embeddings
    (float32 bytes); `key_bias`: the span bias the prompt runs with, or None.
    """

    def __init__(
        self,
        token_ids: np.ndarray,
        *,
        model: str,
        media_positions: np.ndarray | None = None,
        media_rows: np.ndarray | None = None,
        key_bias: SpanBias | None = None,
    ) -> None:
        self.token_ids = np.asarray(token_ids, dtype=np.int32).reshape(-1)
        self.model = model
        self.media_positions = (
            np.zeros(0, np.int64) if media_positions is None else np.asarray(media_positions)
        )
        self.media_rows = media_rows
        self.key_bias = key_bias
        self._names: dict[int, str] = {}

    def variant(self, length: int) -> str:
        """The attention variant the first `length` tokens were computed under."""
        bias = self.key_bias
        if bias is None or length <= bias.start:
            return ""  # the span's keys are invisible to every position before it
        return f"span_bias[{bias.start},{bias.stop})={float(bias.value).hex()}"

    def name(self, length: int) -> str:
        if length not in self._names:
            digest = hashlib.sha256()
            digest.update(f"{FORMAT_VERSION}|{self.model}|{self.variant(length)}|{length}|".encode())
            digest.update(self.token_ids[:length].tobytes())
            media = int(np.searchsorted(self.media_positions, length))
            if media:
                digest.update(np.ascontiguousarray(self.media_rows[:media]).tobytes())
            self._names[length] = digest.hexdigest()
        return self._names[length]


def model_identity(checkpoint: str | Path) -> str:
    """A hash of a checkpoint's config.json and its weight files' names and sizes."""
    folder = Path(checkpoint)
    config = folder / "config.json"
    if not config.is_file():
        raise PromptCacheError(f"{folder}: no config.json, cannot identify the model")
    digest = hashlib.sha256(config.read_bytes())
    for weights in sorted(folder.glob("*.safetensors")):
        digest.update(f"|{weights.name}:{weights.stat().st_size}".encode())
    return digest.hexdigest()


def save_prefix(path: str | Path, state: PrefixState, identity: str) -> Path:
    """Write a prefix state as safetensors (arrays + metadata), atomically: a temp file, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"token_ids": mx.array(state.token_ids)}
    for i, layer in enumerate(state.layers):
        for j, a in enumerate(layer.arrays):
            arrays[f"layer.{i}.{j}"] = a
    metadata = {
        "format_version": FORMAT_VERSION,
        "model_identity": identity,
        "name": state.name,
        "length": str(state.length),
        "token_ids_sha256": hashlib.sha256(state.token_ids.astype(np.int32).tobytes()).hexdigest(),
        "layers": json.dumps([[layer.kind, len(layer.arrays), list(layer.meta)] for layer in state.layers]),
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".partial-", suffix=SUFFIX)
    os.close(fd)
    try:
        mx.save_safetensors(tmp, arrays, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_prefix(
    path: str | Path, identity: str, token_ids: Sequence[int] | np.ndarray | None = None
) -> PrefixState:
    """Read a prefix state written by `save_prefix`; refuse one of another model or other tokens.

    `token_ids`: the prompt it is meant for; the stored ids must be a prefix of it.
    """
    path = Path(path)
    try:
        arrays, metadata = mx.load(str(path), return_metadata=True)
    except (OSError, RuntimeError, ValueError) as e:
        raise PromptCacheError(f"{path}: unreadable prefix cache file ({e})") from e
    if metadata.get("format_version") != FORMAT_VERSION:
        raise PromptCacheError(
            f"{path}: prefix cache format {metadata.get('format_version')!r}, this version reads {FORMAT_VERSION!r}"
        )
    if metadata.get("model_identity") != identity:
        raise PromptCacheError(f"{path}: prefix was computed by another model (identity differs); not used")
    stored = np.asarray(arrays["token_ids"]).astype(np.int32)
    if hashlib.sha256(stored.tobytes()).hexdigest() != metadata.get("token_ids_sha256") or len(stored) != int(
        metadata.get("length", -1)
    ):
        raise PromptCacheError(f"{path}: token ids do not match their recorded hash; file is damaged")
    if token_ids is not None:
        wanted = np.asarray(token_ids, dtype=np.int32).reshape(-1)
        if len(wanted) < len(stored) or not np.array_equal(wanted[: len(stored)], stored):
            raise PromptCacheError(
                f"{path}: the stored {len(stored)} token ids are not a prefix of this prompt"
            )
    layers = []
    for i, (kind, count, meta) in enumerate(json.loads(metadata["layers"])):
        layers.append(LayerState(kind, tuple(arrays[f"layer.{i}.{j}"] for j in range(count)), tuple(meta)))
    mx.eval([layer.arrays for layer in layers])
    return PrefixState(metadata["name"], stored, layers)


class DiskPrefixStore:
    """Prefix states of one model in a folder, one safetensors file per prefix name, size-capped
    (least recently used out: a file's modification time is refreshed when it is read)."""

    def __init__(self, folder: str | Path, identity: str, max_bytes: int = DEFAULT_DISK_BYTES) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.folder = Path(folder)
        self.identity = identity
        self.max_bytes = max_bytes

    @classmethod
    def for_checkpoint(
        cls, checkpoint: str | Path, folder: str | Path | None = None, max_bytes: int = DEFAULT_DISK_BYTES
    ) -> DiskPrefixStore:
        return cls(folder or default_folder(), model_identity(checkpoint), max_bytes)

    def path(self, name: str) -> Path:
        return self.folder / f"{hashlib.sha256(f'{self.identity}|{name}'.encode()).hexdigest()}{SUFFIX}"

    def get(self, name: str, token_ids: np.ndarray) -> PrefixState | None:
        path = self.path(name)
        if not path.is_file():
            return None
        try:
            state = load_prefix(path, self.identity, token_ids)
        except PromptCacheError as e:
            log.warning("%s; removing it", e)
            path.unlink(missing_ok=True)
            return None
        if state.name != name:
            log.warning("%s: holds prefix %s, expected %s; removing it", path, state.name, name)
            path.unlink(missing_ok=True)
            return None
        os.utime(path)
        return state

    def put(self, state: PrefixState) -> None:
        if state.nbytes > self.max_bytes:
            log.info(
                "prefix of %d tokens (%d bytes) exceeds the disk cap; not persisted",
                state.length,
                state.nbytes,
            )
            return
        save_prefix(self.path(state.name), state, self.identity)
        self._evict()

    def _evict(self) -> None:
        files = sorted(
            (p for p in self.folder.glob(f"*{SUFFIX}") if not p.name.startswith(".")),
            key=lambda p: p.stat().st_mtime,
        )
        total = sum(p.stat().st_size for p in files)
        for oldest in files:
            if total <= self.max_bytes:
                break
            total -= oldest.stat().st_size
            oldest.unlink(missing_ok=True)


class PromptCache:
    """Snapshots of prompt prefixes in memory (bounded in bytes, least recently used out), with an
    optional disk store behind it. One PromptCache serves one model."""

    def __init__(
        self,
        max_bytes: int = PREFIX_STORE_MAX_BYTES,
        disk: DiskPrefixStore | None = None,
        identity: str | None = None,
    ) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.max_bytes = max_bytes
        self.disk = disk
        self.identity = identity or (disk.identity if disk else None)
        self._entries: OrderedDict[str, PrefixState] = OrderedDict()

    @classmethod
    def for_checkpoint(
        cls,
        checkpoint: str | Path,
        *,
        max_bytes: int = PREFIX_STORE_MAX_BYTES,
        folder: str | Path | None = None,
        disk_bytes: int = DEFAULT_DISK_BYTES,
    ) -> PromptCache:
        """An in-memory cache persisting system-prompt prefixes under `folder` (default: `default_folder()`),
        shared by processes."""
        return cls(max_bytes, DiskPrefixStore.for_checkpoint(checkpoint, folder, disk_bytes))

    @property
    def nbytes(self) -> int:
        return sum(state.nbytes for state in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def lookup(self, keys: PrefixKeys, disk_lengths: Sequence[int] = ()) -> PrefixState | None:
        """The longest stored prefix of the prompt shorter than it: from memory, or from disk at one of
        `disk_lengths` (only those names are probed there) when that is longer."""
        total = len(keys.token_ids)
        best = None
        for name, state in self._entries.items():
            if (
                state.length < total
                and (best is None or state.length > best.length)
                and keys.name(state.length) == name
            ):
                best = state
        if self.disk is not None:
            for length in sorted(set(disk_lengths), reverse=True):
                if not 0 < length < total or (best is not None and length <= best.length):
                    continue
                state = self.disk.get(keys.name(length), keys.token_ids)
                if state is not None:
                    self._remember(state)
                    best = state
                    break
        if best is not None:
            self._entries.move_to_end(best.name)
        return best

    def store(self, state: PrefixState, persist: bool = False) -> None:
        """Keep a snapshot (evicting the least recently used past the byte bound); with `persist`
        and a disk store, write it there too."""
        self._remember(state)
        if persist and self.disk is not None:
            self.disk.put(state)

    def _remember(self, state: PrefixState) -> None:
        if state.nbytes > self.max_bytes:
            return
        self._entries[state.name] = state
        self._entries.move_to_end(state.name)
        total = self.nbytes
        while total > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            total -= evicted.nbytes


def last_user_turn_start(token_ids: np.ndarray, turn_start_id: int, user_ids: Sequence[int]) -> int | None:
    """Position of the last `<|turn>user` in a prompt: everything before it (system prompt, earlier
    turns) is the part that repeats across requests."""
    ids = np.asarray(token_ids).reshape(-1)
    user = list(user_ids)
    for position in np.nonzero(ids == turn_start_id)[0][::-1]:
        if list(ids[position + 1 : position + 1 + len(user)]) == user:
            return int(position)
    return None


def media_rows(h: mx.array, positions: np.ndarray) -> np.ndarray:
    """Embeddings [B=1, L, hidden] at media positions, as float32 rows (for naming prefixes)."""
    if len(positions) == 0:
        return np.zeros((0, h.shape[-1]), np.float32)
    return np.asarray(h[0][mx.array(positions.astype(np.int32))].astype(mx.float32))
