"""KV caches for the two layer kinds, in float or quantized.

- `SlidingWindowCache`: a ring buffer of the last `window` positions for sliding layers (a few slots
  more for speculative decoding); a longer prompt never makes it grow past that.
- `SharedKVCache`: global K=V layers keep one tensor, the normalized shared projection
  `v = v_norm(k_proj(x))`. Keys are `rope(k_norm.weight * v)`, derived when attending, so the layer
  stores half of what a K-and-V cache would.
Global layers without K=V (other configs) use mlx-lm's `KVCache`.

Each has a quantized form (`QuantizedSlidingWindowCache`, `QuantizedSharedKVCache`, mlx-lm's
`QuantizedKVCache`) that stores what `mx.quantize` returns, the (packed, scales, biases) triple, in
place of each tensor; `to_quantized(group_size, bits)` converts a float cache, as in mlx-lm, and
`maybe_quantize` does it when `kv_quantization.KVQuantization` says (mlx-lm's `kv_bits`,
`kv_group_size`, `quantized_kv_start`). The ring and
the growing buffer are written once, for either storage: a buffer is an array or such a triple, and
the helpers below slice, write and grow every array of it alike along the positions axis.

All follow mlx-lm's cache contract: `state` is everything a cache holds (its arrays or triples, then
its offset and sizes) and `from_state(state)` rebuilds one; `snapshot` copies a model's caches through
it (the prefix cache keeps and restores snapshots). Beyond it, every kind answers the same methods, so
that no caller tests a cache's type:
- `store(keys, values, decoding)`: add new positions, return what attention reads (`StoredKV`);
- `saved_for_trim(n)` and `trim(n, saved)`: speculative decoding's exact rollback (a ring puts back the
  slots it overwrote; the other kinds save nothing);
- `reserve_for_drafts(n)`: room to verify n drafts and roll back (a ring's spare slots);
- `quantization` (None, or its `KVQuantization` settings), `dense(buffer)` (arrays, dequantized);
- `held_kv()`: the keys and values a drafter reads, in position order;
- `layout_kind` and `window`: what the prefix cache checks a restored prefix against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import mlx.core as mx
import numpy as np
from mlx.utils import tree_map
from mlx_lm.generate import maybe_quantize_kv_cache
from mlx_lm.models import cache as mlx_lm_cache
from mlx_lm.models.cache import _BaseCache

from .kv_quantization import KVQuantization, KVQuantizationError

GROWTH_STEP = 256

# A quantized tensor as `mx.quantize` returns it: packed uint32 values, then per-group scales and biases.
Quantized = tuple[mx.array, mx.array, mx.array]
Buffer = mx.array | Quantized


def _arrays(buffer: Buffer) -> Sequence[mx.array]:
    return buffer if isinstance(buffer, (tuple, list)) else (buffer,)


def _length(buffer: Buffer) -> int:
    """Positions (axis 2) a buffer holds."""
    return _arrays(buffer)[0].shape[2]


def _slots(buffer: Buffer, start: int, stop: int) -> Buffer:
    return tree_map(lambda a: a[:, :, start:stop], buffer)


def _take(buffer: Buffer, index: mx.array | slice) -> Buffer:
    """The slots `index` picks (a slice, or slot numbers in the order wanted)."""
    return tree_map(lambda a: a[:, :, index], buffer)


def _concat(first: Buffer, second: Buffer) -> Buffer:
    return tree_map(lambda a, b: mx.concatenate([a, b], axis=2), first, second)


def _assign(buffer: Buffer, start: int, new: Buffer) -> None:
    """Write `new` into slots start.. of `buffer`, in place."""
    for a, b in zip(_arrays(buffer), _arrays(new), strict=True):
        a[:, :, start : start + b.shape[2]] = b


def _grow(buffer: Buffer | None, like: Buffer, needed: int, limit: int | None = None) -> Buffer:
    """Return `buffer` with at least `needed` slots on axis 2 (rounded up to GROWTH_STEP, capped)."""
    have = 0 if buffer is None else _length(buffer)
    if have >= needed:
        return buffer
    size = -(-needed // GROWTH_STEP) * GROWTH_STEP
    if limit is not None:
        size = min(size, limit)

    def extra(a: mx.array) -> mx.array:
        B, H, _, D = a.shape
        return mx.zeros((B, H, size - have, D), dtype=a.dtype)

    added = tree_map(extra, like)
    return added if buffer is None else _concat(buffer, added)


def _nbytes(*buffers: Buffer | None) -> int:
    return sum(a.nbytes for b in buffers if b is not None for a in _arrays(b))


@dataclass(frozen=True)
class StoredKV:
    """What attention reads after a cache stored new positions (`store`).

    keys: None on K=V layers, whose keys are derived from `values`. `in_place`: the buffers are the
    cache's own, positions at their ring slot (or index) and `offset` positions written, for the decode
    kernels to read as they are; otherwise the keys and values the new queries may see, in position
    order from absolute position `key_start`. `quantization`: how the buffers are quantized, or None."""

    keys: Buffer | None
    values: Buffer
    key_start: int
    offset: int
    in_place: bool = False
    quantization: StorageQuantization | None = None


class StorageQuantization(NamedTuple):
    """How a quantized cache stores its tensors (as read from it: a restored prefix is checked against
    the run's `KVQuantization`, never validated on the way)."""

    bits: int
    group_size: int


class _Float:
    """Storage as arrays."""

    quantization: StorageQuantization | None = None

    def _stored(self, x: mx.array) -> Buffer:
        """New keys or values as the buffers hold them."""
        return x

    def dense(self, buffer: Buffer) -> mx.array:
        return buffer


class _Quantized:
    """Storage as `mx.quantize`d triples (`bits`, `group_size`)."""

    group_size: int
    bits: int

    @property
    def quantization(self) -> StorageQuantization:
        return StorageQuantization(self.bits, self.group_size)

    def _stored(self, x: mx.array) -> Quantized:
        return tuple(mx.quantize(x, group_size=self.group_size, bits=self.bits))

    def dense(self, buffer: Buffer) -> mx.array:
        """A buffer's arrays, dequantized (the drafter and observers read them so)."""
        return mx.dequantize(*buffer, group_size=self.group_size, bits=self.bits)


class SlidingWindowCache(_Float, _BaseCache):
    """Keys and values of the newest positions of a sliding layer, in a ring: absolute position p lives
    in slot p % capacity. Attention sees the last `window` of them; `capacity` (default: the window)
    may be larger, which speculative decoding needs: verifying n tokens writes n slots, and after
    `trim` drops the rejected ones the ring must still hold the window (and the drafter's one more
    position) before the next token, so it keeps window + n spare slots."""

    def __init__(self, window: int, capacity: int | None = None):
        capacity = window if capacity is None else capacity
        if capacity < window:
            raise ValueError(f"a ring of {capacity} slots cannot hold a window of {window} positions")
        self.window = window
        self.capacity = capacity
        self.keys: Buffer | None = None
        self.values: Buffer | None = None
        self.offset = 0

    layout_kind = "SlidingWindowCache"

    def store(self, keys: mx.array, values: mx.array, decoding: bool) -> StoredKV:
        """Add L new positions. The decode kernels read the ring in place when it keeps every key these
        queries see: one token, or the few of a speculative verification in a ring with spare slots."""
        if decoding and keys.shape[2] <= self.capacity - self.window + 1:
            self.append(keys, values)
            return StoredKV(self.keys, self.values, 0, self.offset, in_place=True, quantization=self.quantization)
        keys, values, start = self.update_and_fetch(keys, values)
        return StoredKV(keys, values, start, self.offset, quantization=self.quantization)

    def held_kv(self) -> tuple[mx.array, mx.array, int]:
        """The last window + 1 positions (or as many as the ring holds), dense, and the first's position."""
        start = self.offset - min(self.offset, self.window + 1, self.capacity)
        keys, values = self.positions(start, self.offset)
        return self.dense(keys), self.dense(values), start

    def reserve_for_drafts(self, drafts: int) -> None:
        """Keep window + drafts + 1 slots: verifying the drafts and rolling back loses no window key."""
        self.reserve(self.window + drafts + 1)

    def _ring_index(self, start: int, stop: int) -> mx.array | slice:
        """The slots of positions [start, stop) (stop - start <= capacity), in position order."""
        s = start % self.capacity
        if stop - start <= self.capacity - s:
            return slice(s, s + stop - start)
        return mx.concatenate([mx.arange(s, self.capacity), mx.arange(0, stop - start - self.capacity + s)])

    def positions(self, start: int, stop: int) -> tuple[Buffer, Buffer]:
        """Keys and values of positions [start, stop) in position order; the ring must still hold them."""
        if not (max(0, self.offset - self.capacity) <= start <= stop <= self.offset):
            raise ValueError(
                f"positions {start}..{stop - 1}: the ring holds {max(0, self.offset - self.capacity)}..{self.offset - 1}"
            )
        index = self._ring_index(start, stop)
        return _take(self.keys, index), _take(self.values, index)

    def _write(self, buffer: Buffer, new: Buffer, start: int) -> Buffer:
        """Write `new` (at most `capacity` positions) at absolute positions start.. (wrapping)."""
        n = _length(new)
        s = start % self.capacity
        first = min(n, self.capacity - s)
        _assign(buffer, s, _slots(new, 0, first))
        if first < n:
            _assign(buffer, 0, _slots(new, first, n))
        return buffer

    def append(self, keys: mx.array, values: mx.array) -> None:
        """Add L new positions; only the last `capacity` of them stay."""
        self._append(self._stored(keys), self._stored(values))

    def _append(self, keys: Buffer, values: Buffer) -> None:
        """`append` for keys and values already in stored form (`_stored`)."""
        L = _length(keys)
        kept = min(L, self.capacity)
        filled = min(self.offset + L, self.capacity)
        self.keys = _grow(self.keys, keys, filled, self.capacity)
        self.values = _grow(self.values, values, filled, self.capacity)
        self.keys = self._write(self.keys, _slots(keys, L - kept, L), self.offset + L - kept)
        self.values = self._write(self.values, _slots(values, L - kept, L), self.offset + L - kept)
        self.offset += L

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[Buffer, Buffer, int]:
        """Add L new positions; return the keys/values the new queries may see and the absolute
        position of the first returned key.

        Decoding one token with a ring of exactly the window returns the buffer as is: every stored
        position is inside the window of the new query, and attention does not depend on key order.
        """
        L = keys.shape[2]
        start = self.offset
        keys, values = self._stored(keys), self._stored(values)
        past = min(start, self.window - 1)
        if L == 1 and self.capacity == self.window:
            self._append(keys, values)
            n = self.size()
            return _slots(self.keys, 0, n), _slots(self.values, 0, n), self.offset - n
        if past + L <= self.capacity:  # the ring keeps every key these queries see: write, then read
            self._append(keys, values)
            return *self.positions(start - past, start + L), start - past
        # A long pass: its first queries see keys that its last ones push out of the ring.
        if past:
            old_keys, old_values = self.positions(start - past, start)
            seen_k, seen_v = _concat(old_keys, keys), _concat(old_values, values)
        else:
            seen_k, seen_v = keys, values
        self._append(keys, values)
        return seen_k, seen_v, start - past

    def saved_for_trim(self, length: int) -> RingSlots | None:
        """Copies of what the next `length` positions will overwrite (positions offset - capacity ..),
        for `trim` to put back; None when they overwrite nothing (the ring has not wrapped there)."""
        first = max(self.offset, self.capacity)
        if first >= self.offset + length:
            return None
        index = self._ring_index(first, self.offset + length)
        return RingSlots(first - self.capacity, _take(self.keys, index), _take(self.values, index))

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int, saved: RingSlots | None = None) -> int:
        """Drop the newest n positions. Their slots held older positions, which `saved` (from
        `saved_for_trim` before they were written) puts back, so the ring is bit for bit what it was
        before those n positions; without it those older positions are lost (only the last
        capacity - n positions remain)."""
        n = min(n, self.offset)
        self.offset -= n
        if saved is not None:
            # Positions offset - capacity .. of the dropped slots, from the saved ones starting at saved.start.
            begin = max(self.offset - self.capacity, saved.start)
            end = min(self.offset + n - self.capacity, saved.start + _length(saved.keys))
            if begin < end:
                rows = (begin - saved.start, end - saved.start)
                self.keys = self._write(self.keys, _slots(saved.keys, *rows), begin)
                self.values = self._write(self.values, _slots(saved.values, *rows), begin)
        return n

    def reserve(self, capacity: int) -> None:
        """Grow the ring to at least `capacity` slots, keeping the positions it holds."""
        if capacity <= self.capacity:
            return
        held = min(self.offset, self.capacity)
        if held and self.offset > self.capacity:  # wrapped: lay the held positions out for the new size
            keys, values = self.positions(self.offset - held, self.offset)
            self.keys, self.values = None, None
            self.capacity, self.offset = capacity, self.offset - held
            self._append(keys, values)
        else:
            self.capacity = capacity

    def size(self) -> int:
        return min(self.offset, self.capacity)

    def empty(self) -> bool:
        return self.keys is None

    def _filled(self) -> tuple[Buffer | None, Buffer | None]:
        """The ring buffer's filled slots, as `_write` left them."""
        if self.keys is None:
            return None, None
        n = self.size()
        return _slots(self.keys, 0, n), _slots(self.values, 0, n)

    def _restored(self) -> None:
        # A ring that wrapped is exactly its slots; one that did not lays positions out at their index,
        # as a ring of the window (or of more slots) would.
        held = 0 if self.keys is None else _length(self.keys)
        self.capacity = held if self.offset > held else max(self.window, held)

    @property
    def state(self) -> tuple[mx.array | None, mx.array | None, int, int]:
        """(keys, values, offset, window): the filled slots."""
        return (*self._filled(), self.offset, self.window)

    @state.setter
    def state(self, value: tuple[mx.array | None, mx.array | None, int, int]) -> None:
        self.keys, self.values, self.offset, self.window = value
        self._restored()

    @property
    def nbytes(self) -> int:
        return _nbytes(self.keys, self.values)

    def to_quantized(self, group_size: int = 64, bits: int = 4) -> QuantizedSlidingWindowCache:
        """This ring with its slots quantized (mlx-lm's `to_quantized`)."""
        quantized = QuantizedSlidingWindowCache(self.window, group_size, bits, capacity=self.capacity)
        if self.keys is not None:
            quantized.keys, quantized.values = quantized._stored(self.keys), quantized._stored(self.values)
        quantized.offset = self.offset
        return quantized


@dataclass
class RingSlots:
    """Keys and values of consecutive positions start.. copied out of a ring (`saved_for_trim`)."""

    start: int
    keys: Buffer
    values: Buffer


class QuantizedSlidingWindowCache(_Quantized, SlidingWindowCache):
    """`SlidingWindowCache` whose slots hold `mx.quantize`d keys and values (`bits`, `group_size`)."""

    def __init__(self, window: int, group_size: int = 64, bits: int = 8, capacity: int | None = None):
        super().__init__(window, capacity)
        self.group_size = group_size
        self.bits = bits

    @property
    def state(self) -> tuple[Quantized | None, Quantized | None, int, int, int, int]:
        """(keys, values, offset, window, group_size, bits): the filled slots, as triples."""
        return (*self._filled(), self.offset, self.window, self.group_size, self.bits)

    @state.setter
    def state(self, value: tuple[Quantized | None, Quantized | None, int, int, int, int]) -> None:
        self.keys, self.values, self.offset, self.window, self.group_size, self.bits = value
        self._restored()

    def to_quantized(self, group_size: int = 64, bits: int = 4) -> QuantizedSlidingWindowCache:
        return _already_quantized(self, group_size, bits)


class SharedKVCache(_Float, _BaseCache):
    """One cached tensor for K=V global layers: the normalized shared projection of every position."""

    def __init__(self):
        self.values: Buffer | None = None
        self.offset = 0

    layout_kind = "SharedKVCache"
    window = None

    def store(self, keys: None, values: mx.array, decoding: bool) -> StoredKV:
        """Add L new positions of the one tensor (K=V layers have no separate keys)."""
        held = self.update_and_fetch(values)
        if decoding:
            return StoredKV(None, self.values, 0, self.offset, in_place=True, quantization=self.quantization)
        return StoredKV(None, held, 0, self.offset, quantization=self.quantization)

    def held_kv(self) -> tuple[None, mx.array, int]:
        """Every cached position of the one tensor, dense (keys: derived by the layer)."""
        return None, self.dense(_slots(self.values, 0, self.offset)), 0

    def saved_for_trim(self, length: int) -> None:
        return None  # trimmed positions are only overwritten by later ones

    def reserve_for_drafts(self, drafts: int) -> None:
        """It grows as positions come: nothing to reserve."""

    def update_and_fetch(self, values: mx.array) -> Buffer:
        """Append L positions; return all cached positions [B, n_kv, offset, head_dim]."""
        L = values.shape[2]
        values = self._stored(values)
        self.values = _grow(self.values, values, self.offset + L)
        _assign(self.values, self.offset, values)
        self.offset += L
        return _slots(self.values, 0, self.offset)

    def size(self) -> int:
        return self.offset

    def empty(self) -> bool:
        return self.values is None

    def _filled(self) -> Buffer | None:
        return None if self.values is None else _slots(self.values, 0, self.offset)

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int, saved: None = None) -> int:
        """Drop the newest n positions (their slots are overwritten by the next ones)."""
        n = min(n, self.offset)
        self.offset -= n
        return n

    @property
    def state(self) -> tuple[mx.array | None, int]:
        """(values, offset): the cached positions."""
        return self._filled(), self.offset

    @state.setter
    def state(self, value: tuple[mx.array | None, int]) -> None:
        self.values, self.offset = value

    @property
    def nbytes(self) -> int:
        return _nbytes(self.values)

    def to_quantized(self, group_size: int = 64, bits: int = 4) -> QuantizedSharedKVCache:
        """This cache with its tensor quantized (mlx-lm's `to_quantized`)."""
        quantized = QuantizedSharedKVCache(group_size, bits)
        quantized.values = None if self.values is None else quantized._stored(self.values)
        quantized.offset = self.offset
        return quantized


class QuantizedSharedKVCache(_Quantized, SharedKVCache):
    """`SharedKVCache` holding the `mx.quantize`d tensor (`bits`, `group_size`)."""

    def __init__(self, group_size: int = 64, bits: int = 8):
        super().__init__()
        self.group_size = group_size
        self.bits = bits

    @property
    def state(self) -> tuple[Quantized | None, int, int, int]:
        """(values, offset, group_size, bits): the cached positions, as a triple."""
        return self._filled(), self.offset, self.group_size, self.bits

    @state.setter
    def state(self, value: tuple[Quantized | None, int, int, int]) -> None:
        self.values, self.offset, self.group_size, self.bits = value

    def to_quantized(self, group_size: int = 64, bits: int = 4) -> QuantizedSharedKVCache:
        return _already_quantized(self, group_size, bits)


def _already_quantized(cache: _Quantized, group_size: int, bits: int) -> _Quantized:
    # mlx-lm's `maybe_quantize_kv_cache` asks every cache with `to_quantized` again at each step.
    if (group_size, bits) != (cache.group_size, cache.bits):
        raise KVQuantizationError(
            "kv_bits",
            f"this cache is already quantized to {cache.bits} bits in groups of {cache.group_size}; "
            f"it cannot be requantized to {bits} bits in groups of {group_size}"
        )
    return cache


class _GrowingKV:
    """mlx-lm's growing K-and-V caches (global layers without K=V, in other configs) with this module's
    contract."""

    layout_kind = "KVCache"
    window = None

    def store(self, keys: mx.array, values: mx.array, decoding: bool) -> StoredKV:
        keys, values = self.update_and_fetch(keys, values)
        return StoredKV(keys, values, self.offset - _length(keys), self.offset, quantization=self.quantization)

    def held_kv(self) -> tuple[mx.array, mx.array, int]:
        keys, values = (_slots(b, 0, self.offset) for b in (self.keys, self.values))
        return self.dense(keys), self.dense(values), 0

    def saved_for_trim(self, length: int) -> None:
        return None  # trimmed positions are only overwritten by later ones

    def trim(self, n: int, saved: None = None) -> int:
        return super().trim(n)

    def reserve_for_drafts(self, drafts: int) -> None:
        """It grows as positions come: nothing to reserve."""


class KVCache(_Float, _GrowingKV, mlx_lm_cache.KVCache):
    def to_quantized(self, group_size: int = 64, bits: int = 4) -> QuantizedKVCache:
        """This cache with its keys and values quantized (mlx-lm's `to_quantized`)."""
        quantized = QuantizedKVCache(group_size, bits)
        quantized.offset = self.offset
        if self.keys is not None:
            quantized.keys, quantized.values = quantized._stored(self.keys), quantized._stored(self.values)
        return quantized


class QuantizedKVCache(_Quantized, _GrowingKV, mlx_lm_cache.QuantizedKVCache):
    def to_quantized(self, group_size: int = 64, bits: int = 4) -> QuantizedKVCache:
        return _already_quantized(self, group_size, bits)


LayerCache = (
    SlidingWindowCache | SharedKVCache | KVCache | QuantizedSlidingWindowCache | QuantizedSharedKVCache
    | QuantizedKVCache
)
# Every kind by its class name: the prefix cache stores a layer's kind as that name.
LAYER_CACHES: dict[str, type] = {
    c.__name__: c
    for c in (
        SlidingWindowCache, SharedKVCache, KVCache, QuantizedSlidingWindowCache, QuantizedSharedKVCache,
        QuantizedKVCache,
    )
}  # fmt: skip


# -- when to quantize -------------------------------------------------------------------------------


def maybe_quantize(cache: list[LayerCache], kv: KVQuantization | None) -> None:
    """Quantize, in the list, every float layer cache that holds `kv.start` positions or more (mlx-lm's
    `maybe_quantize_kv_cache`); nothing without `kv`."""
    if kv is not None:
        maybe_quantize_kv_cache(cache, kv.start, kv.group_size, kv.bits)


# -- copies -----------------------------------------------------------------------------------------


def _copy(a: mx.array) -> mx.array:
    # A new buffer: caches write into their arrays in place, and a slice shares its source's buffer.
    return mx.array(np.asarray(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a)).view(a.dtype)


def snapshot(cache: Sequence[LayerCache]) -> list[LayerCache]:
    """Copies of every layer's cache as it is now, evaluated, that share no buffer with it: to keep a
    state while the live cache moves on, or to resume from a kept one and leave it untouched."""
    copies = [type(c).from_state(tree_map(lambda x: _copy(x) if isinstance(x, mx.array) else x, c.state)) for c in cache]
    mx.eval([c.state for c in copies])
    return copies
