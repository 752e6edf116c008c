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

and the model that computes it: its identity (`checkpoint.model_identity`: config.json and the weights'
content hash, for a disk cache; the model object, for a cache in memory only), the compute dtype, and
the MLX and mlx-unified versions.

`PrefixCache` keeps snapshots in memory (bounded in bytes, least recently used out) and, optionally,
persists some of them through its `DiskPrefixStore`, the disk part of the cache (safetensors files
keyed by model identity and prefix name, size-capped, oldest out). A stored file is trusted for
nothing: its header is checked like any safetensors file, a sha256 over its arrays and metadata is
checked on load, and every layer's arrays must have the shapes and dtype of the model's caches; a file
failing any check is removed and the prompt runs in full. A cache is an optimisation: when its folder
cannot be used (not a folder, read-only, full), it warns once and the answer comes without it.
`plan_prefix` decides, for one prompt, what to restore and where prefill takes snapshots.

Not to be confused with mlx-lm's `prompt_cache`, which is what this module calls a model's cache: the
list of per-layer caches (`Model.make_cache()`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
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
from .cache import LAYER_CACHES, LayerCache, snapshot
from .checkpoint import ModelLoadError, model_identity
from .emphasis import SpanBias
from .errors import InputError
from .kv_quantization import KVQuantization
from .model import Model
from .prefill import SnapshotCallback
from .processing.chat import TURN_START
from .safetensors_format import (
    OutputTensor,
    SafetensorsError,
    ShardWriter,
    dtype_tag,
    read_array,
    read_header,
    to_array,
    to_buffer,
)

log = logging.getLogger(__name__)

# Version 3: each layer's cache is stored as its `state` (arrays, triples of arrays for quantized
# tensors, and scalars, offset included) under its class name, with a sha256 over the arrays and the
# metadata; earlier files are refused, and removed when met.
FORMAT_VERSION = "3"
DEFAULT_DISK_BYTES = 16 << 30
SUFFIX = ".safetensors"
CHECKSUM_KEY = "sha256"


def default_folder() -> Path:
    """Where persisted prefixes live: $MLX_UNIFIED_CACHE_DIR/prefixes, by default ~/.cache/mlx-unified."""
    return Path(os.environ.get("MLX_UNIFIED_CACHE_DIR") or "~/.cache/mlx-unified").expanduser() / "prefixes"


def warn_unusable(folder: Path, error: Exception, context: str = "") -> None:
    """The one warning of a disk cache that stops being used."""
    reason = error.strerror if isinstance(error, OSError) and error.strerror else error
    log.warning("%sprefix cache folder %s is unusable (%s); continuing without the disk cache", context, folder, reason)


def _package_version() -> str:
    try:
        return importlib.metadata.version("mlx-unified")
    except importlib.metadata.PackageNotFoundError:
        return "source"


def state_scope(model: Model, identity: str | None) -> str:
    """What computed a prefix's KV state besides its tokens: the model (`identity`, or this model
    object), its compute dtype and the libraries' versions. Part of every prefix name."""
    who = identity or f"model-object-{id(model)}"
    return f"{who}|{model.dtype}|mlx {mx.__version__}|mlx-unified {_package_version()}"


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


def _checksum(metadata: dict[str, str], arrays: dict[str, tuple[str, tuple[int, ...], Any]]) -> str:
    """sha256 over the metadata (all but the checksum) and every array's name, dtype, shape and bytes."""
    digest = hashlib.sha256(json.dumps({k: v for k, v in metadata.items() if k != CHECKSUM_KEY}, sort_keys=True).encode())
    for name in sorted(arrays):
        tag, shape, data = arrays[name]
        digest.update(json.dumps([name, tag, list(shape)]).encode())
        digest.update(data)
    return digest.hexdigest()


def save_prefix(path: str | Path, state: PrefixState, identity: str) -> Path:
    """Write a prefix state as safetensors (arrays + metadata + their checksum), atomically: a temporary
    file, then a rename. OSError when the folder cannot take it.

    Each layer is its cache's class name and `state`: arrays become tensors `layer.<i>.<j>`, a
    quantized tensor's (packed, scales, biases) tensors `layer.<i>.<j>.<k>`, the other entries
    (offset, window, group size, bits) stay in the metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"token_ids": mx.array(state.token_ids.astype(np.int32))}
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
        "layers": json.dumps(layers),
    }
    contents = {name: (dtype_tag(a.dtype), tuple(a.shape), to_buffer(a)) for name, a in arrays.items()}
    metadata[CHECKSUM_KEY] = _checksum(metadata, contents)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".partial-", suffix=SUFFIX)
    os.close(fd)
    try:
        writer = ShardWriter(
            Path(tmp), [OutputTensor(n, tag, shape) for n, (tag, shape, _) in contents.items()], metadata
        )
        try:
            for name, (_, _, data) in contents.items():
                writer.write(name, 0, data)
        except BaseException:
            writer.abort()
            raise
        writer.close(durable=False)  # a torn file after a power cut fails its checksum
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


@dataclass(frozen=True)
class LayerLayout:
    kind: str  # the cache's `layout_kind`: its float kind's class name
    kv_heads: int
    head_dim: int
    window: int | None  # sliding layers


@dataclass(frozen=True)
class CacheLayout:
    """What a model's caches hold: every layer's kind, heads and head size, the dtype, and the KV
    quantization the run uses; a restored prefix must match it exactly, or attention would read past
    its arrays, mix dtypes, or read a cache quantized otherwise than this run's."""

    layers: tuple[LayerLayout, ...]
    dtype: mx.Dtype
    kv_quantization: KVQuantization | None = None

    @classmethod
    def of(cls, model: Model, caches: Sequence[LayerCache], kv_quantization: KVQuantization | None = None) -> CacheLayout:
        """The layout of `model`, whose fresh caches are `caches`, run with `kv_quantization`."""
        layers = []
        for i, cache in enumerate(caches):
            shape = model.config.text.layer(i)
            layers.append(LayerLayout(cache.layout_kind, shape.num_kv_heads, shape.head_dim, cache.window))
        return cls(tuple(layers), model.dtype, kv_quantization)

    def mismatch(self, layers: Sequence[LayerCache], length: int) -> str | None:
        """Why `layers` (a restored prefix of `length` tokens) do not fit this layout; None when they do."""
        if len(layers) != len(self.layers):
            return f"{len(layers)} layers, the model has {len(self.layers)}"
        for i, (spec, cache) in enumerate(zip(self.layers, layers, strict=True)):
            if cache.layout_kind != spec.kind or cache.window != spec.window:
                return f"layer {i} is a {type(cache).__name__}, the model's is a {spec.kind}"
            if type(cache.offset) is not int or cache.offset != length:
                return f"layer {i} holds {cache.offset!r} positions, the prefix has {length}"
            reason = self._quantization_mismatch(cache, length)
            if reason is not None:
                return f"layer {i} {reason}"
            rows = cache.size()
            for item in cache.state:
                reason = self._array_mismatch(spec, cache, item, rows)
                if reason is not None:
                    return f"layer {i} holds {reason}"
        return None

    def _quantization_mismatch(self, cache: LayerCache, length: int) -> str | None:
        # The run quantizes every layer once it holds `start` positions (`cache.maybe_quantize`): a
        # longer prefix must be quantized as it is, a shorter one must not be; at `start` exactly both are
        # the same positions (the run quantizes a float one before reading it).
        kv, held = self.kv_quantization, cache.quantization
        if held is not None:
            if kv is None or (held.bits, held.group_size) != (kv.bits, kv.group_size) or length < kv.start:
                wanted = "a float KV cache" if kv is None else f"{kv.bits} bits in groups of {kv.group_size} from {kv.start}"
                return f"is quantized to {held.bits} bits in groups of {held.group_size}; this run's is {wanted}"
        elif kv is not None and length > kv.start:
            return f"is not quantized; this run quantizes to {kv.bits} bits from position {kv.start}"
        return None

    def _array_mismatch(self, spec: LayerLayout, cache: LayerCache, item: Any, rows: int) -> str | None:
        """Why one entry of a layer's state is not the array (or quantized triple) the model's cache
        holds; None when it is (or is not an array)."""
        if isinstance(item, mx.array):
            expected = [(spec.head_dim, self.dtype)]
            arrays = [item]
        elif isinstance(item, (tuple, list)) and cache.quantization is not None:
            held = cache.quantization
            groups = spec.head_dim // held.group_size
            expected = [(spec.head_dim * held.bits // 32, mx.uint32), (groups, self.dtype), (groups, self.dtype)]
            arrays = list(item)
            if len(arrays) != 3 or not all(isinstance(a, mx.array) for a in arrays):
                return f"a quantized tensor of {len(arrays)} parts, not (packed, scales, biases)"
        else:
            return None
        growable = spec.kind == "KVCache"  # mlx-lm's cache keeps its grown buffer
        for array, (last, dtype) in zip(arrays, expected, strict=True):
            shape = tuple(array.shape)
            if (
                len(shape) != 4
                or shape[0] != 1
                or shape[1] != spec.kv_heads
                or shape[3] != last
                or array.dtype != dtype
                or not (shape[2] >= rows if growable else shape[2] == rows)
            ):
                return (
                    f"an array {shape} of {array.dtype}, the model's cache holds "
                    f"(1, {spec.kv_heads}, {rows}, {last}) of {dtype}"
                )
        return None


def load_prefix(
    path: str | Path,
    identity: str,
    token_ids: Sequence[int] | np.ndarray | None = None,
    layout: CacheLayout | None = None,
) -> PrefixState:
    """Read a prefix state written by `save_prefix`; refuse (PrefixCacheError) a damaged file, or one of
    another model or other tokens. OSError when the file cannot be read.

    `token_ids`: the prompt it is meant for; the stored ids must be a prefix of it. `layout`: the
    caches of the model it is meant for; every layer must match it.
    """
    path = Path(path)
    try:
        tensors, metadata = read_header(path)
        if metadata.get("format_version") != FORMAT_VERSION:
            raise PrefixCacheError(
                f"{path}: prefix cache format {metadata.get('format_version')!r}, this version reads {FORMAT_VERSION!r}"
            )
        if metadata.get("model_identity") != identity:
            raise PrefixCacheError(f"{path}: prefix was computed by another model (identity differs); not used")
        raw = {name: read_array(info) for name, info in tensors.items()}
    except SafetensorsError as e:
        raise PrefixCacheError(f"{path}: unreadable prefix cache file ({e})") from e
    contents = {name: (info.dtype, info.shape, raw[name]) for name, info in tensors.items()}
    if metadata.get(CHECKSUM_KEY) != _checksum(metadata, contents):
        raise PrefixCacheError(f"{path}: its arrays or metadata do not match their checksum; the file is damaged")
    try:
        return _decode_prefix(path, metadata, tensors, raw, token_ids, layout)
    except PrefixCacheError:
        raise
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise PrefixCacheError(f"{path}: malformed prefix cache file ({type(e).__name__}: {e})") from e


def _decode_prefix(
    path: Path,
    metadata: dict[str, str],
    tensors: dict[str, Any],
    raw: dict[str, np.ndarray],
    token_ids: Sequence[int] | np.ndarray | None,
    layout: CacheLayout | None,
) -> PrefixState:
    stored = raw["token_ids"]
    if tensors["token_ids"].dtype != "I32" or stored.ndim != 1 or len(stored) != int(metadata["length"]):
        raise PrefixCacheError(f"{path}: token ids do not match the recorded length; the file is damaged")
    if token_ids is not None:
        wanted = np.asarray(token_ids, dtype=np.int32).reshape(-1)
        if len(wanted) < len(stored) or not np.array_equal(wanted[: len(stored)], stored):
            raise PrefixCacheError(f"{path}: the stored {len(stored)} token ids are not a prefix of this prompt")
    layers = []
    for kind, entries in json.loads(metadata["layers"]):
        if kind not in LAYER_CACHES:
            raise PrefixCacheError(f"{path}: unknown layer cache {kind!r}")
        state = tuple(_entry(tensors, raw, e) for e in entries)
        layers.append(LAYER_CACHES[kind].from_state(state))
    if layout is not None:
        reason = layout.mismatch(layers, len(stored))
        if reason is not None:
            raise PrefixCacheError(f"{path}: does not fit this model's caches ({reason})")
    mx.eval([layer.state for layer in layers])
    return PrefixState(metadata["name"], stored.copy(), layers)


def _entry(tensors: dict[str, Any], raw: dict[str, np.ndarray], entry: Any) -> Any:
    """One item of a stored layer state: a tensor, a quantized tensor's triple, or a scalar."""
    if not isinstance(entry, dict):
        return entry
    if "tensors" in entry:
        return tuple(to_array(raw[name], tensors[name].dtype) for name in entry["tensors"])
    return to_array(raw[entry["tensor"]], tensors[entry["tensor"]].dtype)


class DiskPrefixStore:
    """The disk part of a `PrefixCache`: prefix states of one model in a folder, one safetensors file per
    prefix name, size-capped (least recently used out: a file's modification time is refreshed when it
    is read).

    Any I/O error makes the store unusable for the rest of its life, after one warning: lookups then
    find nothing and nothing is written; the answers are the same."""

    def __init__(self, folder: str | Path, identity: str, max_bytes: int = DEFAULT_DISK_BYTES) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.folder = Path(folder)
        self.identity = identity
        self.max_bytes = max_bytes
        self.usable = True

    @classmethod
    def for_checkpoint(
        cls, checkpoint: str | Path, folder: str | Path | None = None, max_bytes: int = DEFAULT_DISK_BYTES
    ) -> DiskPrefixStore:
        """A store for the model of `checkpoint` in `folder` (default: `default_folder()`), which is
        created and checked for writing; the checkpoint's identity is computed there once
        (`checkpoint.model_identity`, records in `<folder>/identities`). OSError when the folder
        cannot be used."""
        folder = Path(folder or default_folder())
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".probe-")
        os.close(fd)
        os.unlink(probe)
        return cls(folder, model_identity(checkpoint, folder / "identities"), max_bytes)

    def path(self, name: str) -> Path:
        return self.folder / f"{hashlib.sha256(f'{self.identity}|{name}'.encode()).hexdigest()}{SUFFIX}"

    def _unusable(self, error: OSError, context: str = "") -> None:
        self.usable = False
        warn_unusable(self.folder, error, context)

    def get(self, name: str, token_ids: np.ndarray, layout: CacheLayout | None = None) -> PrefixState | None:
        """The stored state of prefix `name` for this prompt (`token_ids`) and model (`layout`), or None
        (a damaged or foreign file is removed, with a warning)."""
        if not self.usable:
            return None
        path = self.path(name)
        try:
            if not path.is_file():
                return None
            try:
                state = load_prefix(path, self.identity, token_ids, layout)
                if state.name != name:
                    raise PrefixCacheError(f"{path}: holds prefix {state.name}, expected {name}")
            except PrefixCacheError as e:
                self._discard(path, str(e))
                return None
            os.utime(path)
        except FileNotFoundError:
            return None  # evicted by another process meanwhile
        except OSError as e:
            self._unusable(e)
            return None
        return state

    def _discard(self, path: Path, reason: str) -> None:
        try:
            path.unlink(missing_ok=True)
        except OSError as e:
            self._unusable(e, context=f"{reason}; it cannot be removed: ")
            return
        log.warning("%s; removed it", reason)

    def put(self, state: PrefixState) -> None:
        if not self.usable:
            return
        if state.nbytes > self.max_bytes:
            log.info(
                "prefix of %d tokens (%d bytes) exceeds the disk cap; not persisted",
                state.length,
                state.nbytes,
            )
            return
        try:
            save_prefix(self.path(state.name), state, self.identity)
            self._evict()
        except OSError as e:
            self._unusable(e)

    def _evict(self) -> None:
        files = []
        for path in self.folder.glob(f"*{SUFFIX}"):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue  # removed by another process meanwhile
            if not path.name.startswith("."):
                files.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in files)
        for _, size, oldest in sorted(files):
            if total <= self.max_bytes:
                break
            total -= size
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
        shared by processes. When that folder cannot be used (not a folder, read-only, full) or the
        checkpoint cannot be identified, the cache lives in memory only, after one warning."""
        try:
            disk = DiskPrefixStore.for_checkpoint(checkpoint, folder, disk_bytes)
        except (OSError, ModelLoadError) as e:
            warn_unusable(Path(folder or default_folder()), e)
            disk = None
        return cls(max_bytes, disk)

    @property
    def nbytes(self) -> int:
        return sum(state.nbytes for state in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def lookup(
        self, keys: PrefixKeys, disk_lengths: Sequence[int] = (), layout: CacheLayout | None = None
    ) -> PrefixState | None:
        """The longest stored prefix of the prompt shorter than it: from memory, or from disk at one of
        `disk_lengths` (only those names are probed there, each file checked against `layout`) when
        that is longer."""
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
                state = self.disk.get(keys.name(length), keys.token_ids, layout)
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
        model=state_scope(model, prefix_cache.identity),
        media_positions=media,
        media_rows=media_rows(embeddings, media),
        key_bias=key_bias,
        kv_quantization=kv_quantization,
    )
    turn_start = tokenizer.convert_tokens_to_ids(TURN_START)
    user = tokenizer.encode("user", add_special_tokens=False)
    system_end = last_user_turn_start(ids, turn_start, user) if isinstance(turn_start, int) else None
    layout = CacheLayout.of(model, fresh, kv_quantization)
    hit = prefix_cache.lookup(keys, disk_lengths=() if system_end is None else (system_end,), layout=layout)
    cache, reused = fresh, 0
    if hit is not None and layout.mismatch(hit.layers, hit.length) is None:
        cache, reused = snapshot(hit.layers), hit.length
    boundaries = tuple(b for b in (system_end, len(ids)) if b is not None and b > reused)

    def on_snapshot(end: int, live: list[LayerCache]) -> None:
        state = PrefixState(keys.name(end), ids[:end].copy(), snapshot(live))
        prefix_cache.store(state, persist=end == system_end)

    return PrefixPlan(cache, boundaries, on_snapshot, reused)
