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
  the span start, so a prefix reaching past it is named with the bias, one ending before it is not;
- the KV quantization: a prefix longer than its `quantized_kv_start` is named with its bits, group
  size and start (`KVQuantization.variant`); a shorter one was computed against the float cache, so
  it is the same state with or without quantization.

`PrefixCache` keeps snapshots in memory (bounded in bytes, least recently used out) and, optionally,
persists some of them through its `DiskPrefixStore`, the disk part of the cache (safetensors files
keyed by model identity and prefix name, checked on load, size-capped, oldest out). `plan_prefix`
decides, for one prompt, what to restore and where prefill takes snapshots.

Not to be confused with mlx-lm's `prompt_cache`, which is what this module calls a model's cache: the
list of per-layer caches (`Model.make_cache()`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from .budgets import PREFIX_CACHE_MAX_BYTES, prefix_cache_bytes
from .cache import LAYER_CACHES, LayerCache, quantized_as, same_layout, snapshot
from .checkpoint import model_identity
from .emphasis import SpanBias
from .errors import InputError
from .kv_quantization import KVQuantization
from .model import Model
from .prefill import SnapshotCallback
from .processing.chat import TURN_START

log = logging.getLogger(__name__)

# Version 3: each layer's cache is stored as its `state` (arrays, triples of arrays for quantized
# tensors, and scalars, offset included) under its class name; files of other versions are refused,
# and removed when met.
FORMAT_VERSION = "3"
DEFAULT_DISK_BYTES = 16 << 30
SUFFIX = ".safetensors"


def default_folder() -> Path:
    """Where persisted prefixes live: $MLX_UNIFIED_CACHE_DIR/prefixes, by default ~/.cache/mlx-unified."""
    return Path(os.environ.get("MLX_UNIFIED_CACHE_DIR", "~/.cache/mlx-unified")).expanduser() / "prefixes"


class PrefixCacheError(InputError):
    """A persisted prefix does not belong to this model or these tokens, or is unreadable."""


@dataclass
class PrefixState:
    """The whole model's cache after the first `length` tokens of a prompt (a `cache.snapshot`)."""

    name: str  # PrefixKeys.name(length): what the state depends on
    token_ids: np.ndarray  # int32 [length]
    layers: list[LayerCache]

    @property
    def length(self) -> int:
        return len(self.token_ids)

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)


class PrefixKeys:
    """Names of the prefixes of one prompt: what a prefix's KV state depends on, hashed.

    `media_positions`/`media_rows`: positions of the media soft tokens and their embeddings
    (float32 bytes); `key_bias`: the span bias the prompt runs with, or None; `kv_quantization`: the
    KV quantization it runs with, or None.
    """

    def __init__(
        self,
        token_ids: np.ndarray,
        *,
        model: str,
        media_positions: np.ndarray | None = None,
        media_rows: np.ndarray | None = None,
        key_bias: SpanBias | None = None,
        kv_quantization: KVQuantization | None = None,
    ) -> None:
        self.token_ids = np.asarray(token_ids, dtype=np.int32).reshape(-1)
        self.model = model
        self.media_positions = (
            np.zeros(0, np.int64) if media_positions is None else np.asarray(media_positions)
        )
        self.media_rows = media_rows
        self.key_bias = key_bias
        self.kv_quantization = kv_quantization
        self._names: dict[int, str] = {}

    def variant(self, length: int) -> str:
        """The attention variant and KV quantization the first `length` tokens were computed under."""
        bias, kv = self.key_bias, self.kv_quantization
        parts = []
        if bias is not None and length > bias.start:  # the span's keys are invisible to every position before it
            parts.append(f"span_bias[{bias.start},{bias.stop})={float(bias.value).hex()}")
        if kv is not None and kv.variant(length):
            parts.append(kv.variant(length))
        return "|".join(parts)

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


def save_prefix(path: str | Path, state: PrefixState, identity: str) -> Path:
    """Write a prefix state as safetensors (arrays + metadata), atomically: a temp file, then rename.

    Each layer is its cache's class name and `state`: arrays become tensors `layer.<i>.<j>`, a
    quantized tensor's (packed, scales, biases) tensors `layer.<i>.<j>.<k>`, the other entries
    (offset, window, group size, bits) stay in the metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"token_ids": mx.array(state.token_ids)}
    layers = []
    for i, layer in enumerate(state.layers):
        entries = []
        for j, item in enumerate(layer.state):
            if isinstance(item, mx.array):
                arrays[f"layer.{i}.{j}"] = item
                entries.append({"tensor": f"layer.{i}.{j}"})
            elif isinstance(item, (tuple, list)):
                arrays.update({f"layer.{i}.{j}.{k}": part for k, part in enumerate(item)})
                entries.append({"tensors": [f"layer.{i}.{j}.{k}" for k in range(len(item))]})
            else:
                entries.append(item)
        layers.append([type(layer).__name__, entries])
    metadata = {
        "format_version": FORMAT_VERSION,
        "model_identity": identity,
        "name": state.name,
        "length": str(state.length),
        "token_ids_sha256": hashlib.sha256(state.token_ids.astype(np.int32).tobytes()).hexdigest(),
        "layers": json.dumps(layers),
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
        raise PrefixCacheError(f"{path}: unreadable prefix cache file ({e})") from e
    if metadata.get("format_version") != FORMAT_VERSION:
        raise PrefixCacheError(
            f"{path}: prefix cache format {metadata.get('format_version')!r}, this version reads {FORMAT_VERSION!r}"
        )
    if metadata.get("model_identity") != identity:
        raise PrefixCacheError(f"{path}: prefix was computed by another model (identity differs); not used")
    stored = np.asarray(arrays["token_ids"]).astype(np.int32)
    if hashlib.sha256(stored.tobytes()).hexdigest() != metadata.get("token_ids_sha256") or len(stored) != int(
        metadata.get("length", -1)
    ):
        raise PrefixCacheError(f"{path}: token ids do not match their recorded hash; file is damaged")
    if token_ids is not None:
        wanted = np.asarray(token_ids, dtype=np.int32).reshape(-1)
        if len(wanted) < len(stored) or not np.array_equal(wanted[: len(stored)], stored):
            raise PrefixCacheError(
                f"{path}: the stored {len(stored)} token ids are not a prefix of this prompt"
            )
    layers = []
    for kind, entries in json.loads(metadata["layers"]):
        if kind not in LAYER_CACHES:
            raise PrefixCacheError(f"{path}: unknown layer cache {kind!r}")
        state = tuple(_entry(arrays, e) for e in entries)
        layers.append(LAYER_CACHES[kind].from_state(state))
    mx.eval([layer.state for layer in layers])
    return PrefixState(metadata["name"], stored, layers)


def _entry(arrays: dict[str, mx.array], entry: Any) -> Any:
    """One item of a stored layer state: a tensor, a quantized tensor's triple, or a scalar."""
    if isinstance(entry, dict) and "tensors" in entry:
        return tuple(arrays[name] for name in entry["tensors"])
    return arrays[entry["tensor"]] if isinstance(entry, dict) else entry


class DiskPrefixStore:
    """The disk part of a `PrefixCache`: prefix states of one model in a folder, one safetensors file per
    prefix name, size-capped (least recently used out: a file's modification time is refreshed when it
    is read)."""

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
        except PrefixCacheError as e:
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


class PrefixCache:
    """Snapshots of prompt prefixes in memory (bounded in bytes, least recently used out), with an
    optional disk store behind it. One PrefixCache serves one model."""

    def __init__(
        self,
        max_bytes: int = PREFIX_CACHE_MAX_BYTES,
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
        max_bytes: int = PREFIX_CACHE_MAX_BYTES,
        folder: str | Path | None = None,
        disk_bytes: int = DEFAULT_DISK_BYTES,
    ) -> PrefixCache:
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


# One default prefix cache per live model, dropped with the model (`weakref.finalize`): a model is an
# MLX module, a dict, so it cannot key a WeakKeyDictionary.
_DEFAULT_CACHES: dict[int, PrefixCache] = {}


def default_prefix_cache(model: Model) -> PrefixCache:
    """The in-memory prefix cache that `stream_generate` uses for `model` when given none: made on first
    use, sized to the memory left beside the weights (`budgets.prefix_cache_bytes`), kept while the
    model lives."""
    key = id(model)
    if key not in _DEFAULT_CACHES:
        _DEFAULT_CACHES[key] = PrefixCache(prefix_cache_bytes(model.nbytes))
        weakref.finalize(model, _DEFAULT_CACHES.pop, key, None)
    return _DEFAULT_CACHES[key]


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


@dataclass
class PrefixPlan:
    """How one prompt uses the prefix cache: the model's cache to start from (fresh, or a restored
    prefix of `reused` tokens), and where prefill takes snapshots (`on_snapshot` stores them)."""

    prompt_cache: list[LayerCache]
    snapshot_at: tuple[int, ...]
    on_snapshot: SnapshotCallback | None
    reused: int


def plan_prefix(
    model: Model,
    tokenizer: Any,
    prefix_cache: PrefixCache | None,
    input_ids: np.ndarray,
    embeddings: mx.array,
    key_bias: SpanBias | None,
    kv_quantization: KVQuantization | None = None,
) -> PrefixPlan:
    """Restore the longest stored prefix of this prompt, and take snapshots at the end of its system
    part (persisted: it repeats across requests and runs) and at its end (the next chat turn extends it).
    Without a prefix cache, or for a batch, a fresh cache and no snapshots. `kv_quantization`: the
    settings the prompt runs with; only prefixes computed with them are reused."""
    fresh = model.make_cache()
    if prefix_cache is None or input_ids.shape[0] != 1:
        return PrefixPlan(fresh, (), None, 0)
    ids = input_ids[0]
    media = np.nonzero(np.isin(ids, model.config.media_token_ids))[0]
    keys = PrefixKeys(
        ids,
        model=prefix_cache.identity or f"model-object-{id(model)}",
        media_positions=media,
        media_rows=media_rows(embeddings, media),
        key_bias=key_bias,
        kv_quantization=kv_quantization,
    )
    turn_start = tokenizer.convert_tokens_to_ids(TURN_START)
    user = tokenizer.encode("user", add_special_tokens=False)
    system_end = last_user_turn_start(ids, turn_start, user) if isinstance(turn_start, int) else None
    hit = prefix_cache.lookup(keys, disk_lengths=() if system_end is None else (system_end,))
    cache, reused = fresh, 0
    if hit is not None and same_layout(hit.layers, fresh) and quantized_as(hit.layers, kv_quantization):
        cache, reused = snapshot(hit.layers), hit.length
    boundaries = tuple(b for b in (system_end, len(ids)) if b is not None and b > reused)

    def on_snapshot(end: int, live: list[LayerCache]) -> None:
        state = PrefixState(keys.name(end), ids[:end].copy(), snapshot(live))
        prefix_cache.store(state, persist=end == system_end)

    return PrefixPlan(cache, boundaries, on_snapshot, reused)
