"""KV caches for the two layer kinds.

- `SlidingWindowCache`: a ring buffer of the last `window` positions for sliding layers (a few slots
  more for speculative decoding); a longer prompt never makes it grow past that.
- `SharedKVCache`: global K=V layers keep one tensor, the normalized shared projection
  `v = v_norm(k_proj(x))`. Keys are `rope(k_norm.weight * v)`, derived when attending, so the layer
  stores half of what a K-and-V cache would.
Global layers without K=V (other configs) use mlx-lm's `KVCache`.

All three follow mlx-lm's cache contract: `state` is everything a cache holds (its arrays, then its
offset and sizes) and `from_state(state)` rebuilds one; `snapshot` copies a model's caches through it
(the prefix cache keeps and restores snapshots). All can `trim` their newest positions, which
speculative decoding does after verifying drafts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache, _BaseCache

GROWTH_STEP = 256


def _grow(buffer: mx.array | None, like: mx.array, needed: int, limit: int | None = None) -> mx.array:
    """Return `buffer` with at least `needed` slots on axis 2 (rounded up to GROWTH_STEP, capped)."""
    have = 0 if buffer is None else buffer.shape[2]
    if have >= needed:
        return buffer
    size = -(-needed // GROWTH_STEP) * GROWTH_STEP
    if limit is not None:
        size = min(size, limit)
    B, H, _, D = like.shape
    extra = mx.zeros((B, H, size - have, D), dtype=like.dtype)
    return extra if buffer is None else mx.concatenate([buffer, extra], axis=2)


class SlidingWindowCache(_BaseCache):
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
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def _slots(self, start: int, stop: int) -> mx.array | slice:
        """The slots of positions [start, stop) (stop - start <= capacity), in position order."""
        s = start % self.capacity
        if stop - start <= self.capacity - s:
            return slice(s, s + stop - start)
        return mx.concatenate([mx.arange(s, self.capacity), mx.arange(0, stop - start - self.capacity + s)])

    def positions(self, start: int, stop: int) -> tuple[mx.array, mx.array]:
        """Keys and values of positions [start, stop) in position order; the ring must still hold them."""
        if not (max(0, self.offset - self.capacity) <= start <= stop <= self.offset):
            raise ValueError(
                f"positions {start}..{stop - 1}: the ring holds {max(0, self.offset - self.capacity)}..{self.offset - 1}"
            )
        slots = self._slots(start, stop)
        return self.keys[:, :, slots], self.values[:, :, slots]

    def _write(self, buffer: mx.array, new: mx.array, start: int) -> mx.array:
        """Write `new` (at most `capacity` positions) at absolute positions start.. (wrapping)."""
        n = new.shape[2]
        s = start % self.capacity
        first = min(n, self.capacity - s)
        buffer[:, :, s : s + first] = new[:, :, :first]
        if first < n:
            buffer[:, :, : n - first] = new[:, :, first:]
        return buffer

    def append(self, keys: mx.array, values: mx.array) -> None:
        """Add L new positions; only the last `capacity` of them stay."""
        L = keys.shape[2]
        kept = min(L, self.capacity)
        filled = min(self.offset + L, self.capacity)
        self.keys = _grow(self.keys, keys, filled, self.capacity)
        self.values = _grow(self.values, values, filled, self.capacity)
        self.keys = self._write(self.keys, keys[:, :, L - kept :], self.offset + L - kept)
        self.values = self._write(self.values, values[:, :, L - kept :], self.offset + L - kept)
        self.offset += L

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array, int]:
        """Add L new positions; return the keys/values the new queries may see and the absolute
        position of the first returned key.

        Decoding one token with a ring of exactly the window returns the buffer as is: every stored
        position is inside the window of the new query, and attention does not depend on key order.
        """
        L = keys.shape[2]
        start = self.offset
        past = min(start, self.window - 1)
        if L == 1 and self.capacity == self.window:
            self.append(keys, values)
            n = self.size()
            return self.keys[:, :, :n], self.values[:, :, :n], self.offset - n
        if past + L <= self.capacity:  # the ring keeps every key these queries see: write, then read
            self.append(keys, values)
            return *self.positions(start - past, start + L), start - past
        # A long pass: its first queries see keys that its last ones push out of the ring.
        if past:
            old_keys, old_values = self.positions(start - past, start)
            seen_k, seen_v = mx.concatenate([old_keys, keys], axis=2), mx.concatenate([old_values, values], axis=2)
        else:
            seen_k, seen_v = keys, values
        self.append(keys, values)
        return seen_k, seen_v, start - past

    def saved_for_trim(self, length: int) -> RingSlots | None:
        """Copies of what the next `length` positions will overwrite (positions offset - capacity ..),
        for `trim` to put back; None when they overwrite nothing (the ring has not wrapped there)."""
        first = max(self.offset, self.capacity)
        if first >= self.offset + length:
            return None
        slots = self._slots(first, self.offset + length)
        return RingSlots(first - self.capacity, self.keys[:, :, slots], self.values[:, :, slots])

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
            end = min(self.offset + n - self.capacity, saved.start + saved.keys.shape[2])
            if begin < end:
                rows = slice(begin - saved.start, end - saved.start)
                self.keys = self._write(self.keys, saved.keys[:, :, rows], begin)
                self.values = self._write(self.values, saved.values[:, :, rows], begin)
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
            self.append(keys, values)
        else:
            self.capacity = capacity

    def size(self) -> int:
        return min(self.offset, self.capacity)

    def empty(self) -> bool:
        return self.keys is None

    @property
    def state(self) -> tuple[mx.array | None, mx.array | None, int, int]:
        """(keys, values, offset, window): the ring buffer's filled slots, as `_write` left them."""
        if self.keys is None:
            return None, None, self.offset, self.window
        n = self.size()
        return self.keys[:, :, :n], self.values[:, :, :n], self.offset, self.window

    @state.setter
    def state(self, value: tuple[mx.array | None, mx.array | None, int, int]) -> None:
        self.keys, self.values, self.offset, self.window = value
        # A ring that wrapped is exactly its slots; one that did not lays positions out at their index,
        # as a ring of the window (or of more slots) would.
        held = 0 if self.keys is None else self.keys.shape[2]
        self.capacity = held if self.offset > held else max(self.window, held)

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


@dataclass
class RingSlots:
    """Keys and values of consecutive positions start.. copied out of a ring (`saved_for_trim`)."""

    start: int
    keys: mx.array
    values: mx.array


class SharedKVCache(_BaseCache):
    """One cached tensor for K=V global layers: the normalized shared projection of every position."""

    def __init__(self):
        self.values: mx.array | None = None
        self.offset = 0

    def update_and_fetch(self, values: mx.array) -> mx.array:
        """Append L positions; return all cached positions [B, n_kv, offset, head_dim]."""
        L = values.shape[2]
        self.values = _grow(self.values, values, self.offset + L)
        self.values[:, :, self.offset : self.offset + L] = values
        self.offset += L
        return self.values[:, :, : self.offset]

    def size(self) -> int:
        return self.offset

    def empty(self) -> bool:
        return self.values is None

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        """Drop the newest n positions (their slots are overwritten by the next ones)."""
        n = min(n, self.offset)
        self.offset -= n
        return n

    @property
    def state(self) -> tuple[mx.array | None, int]:
        """(values, offset): the cached positions."""
        return (None if self.values is None else self.values[:, :, : self.offset]), self.offset

    @state.setter
    def state(self, value: tuple[mx.array | None, int]) -> None:
        self.values, self.offset = value

    @property
    def nbytes(self) -> int:
        return 0 if self.values is None else self.values.nbytes


LayerCache = SlidingWindowCache | SharedKVCache | KVCache
LAYER_CACHES: dict[str, type] = {c.__name__: c for c in (SlidingWindowCache, SharedKVCache, KVCache)}


def _copy(a: mx.array) -> mx.array:
    # A new buffer: caches write into their arrays in place, and a slice shares its source's buffer.
    return mx.array(np.asarray(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a)).view(a.dtype)


def snapshot(cache: Sequence[LayerCache]) -> list[LayerCache]:
    """Copies of every layer's cache as it is now, evaluated, that share no buffer with it: to keep a
    state while the live cache moves on, or to resume from a kept one and leave it untouched."""
    copies = [
        type(c).from_state(tuple(_copy(x) if isinstance(x, mx.array) else x for x in c.state)) for c in cache
    ]
    mx.eval([c.state for c in copies])
    return copies


def same_layout(cache: Sequence[LayerCache], other: Sequence[LayerCache]) -> bool:
    """Whether two models' caches have the same kinds of layer caches (and sliding windows)."""
    return len(cache) == len(other) and all(
        type(a) is type(b) and getattr(a, "window", None) == getattr(b, "window", None)
        for a, b in zip(cache, other, strict=True)
    )
