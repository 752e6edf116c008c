"""KV caches for the two layer kinds.

- `SlidingWindowCache`: a ring buffer of exactly `window` positions for sliding layers; a longer prompt
  never makes it grow past the window.
- `SharedKVCache`: global K=V layers keep one tensor, the normalized shared projection
  `v = v_norm(k_proj(x))`. Keys are `rope(k_norm.weight * v)`, derived when attending, so the layer
  stores half of what a K-and-V cache would.
Global layers without K=V (other configs) use mlx-lm's `KVCache`.

All three follow mlx-lm's cache contract: `state` is everything a cache holds (its arrays, then its
offset and sizes) and `from_state(state)` rebuilds one; `snapshot` copies a model's caches through it
(the prefix cache keeps and restores snapshots, speculative decoding can roll back to one).
"""

from __future__ import annotations

from collections.abc import Sequence

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
    """Keys and values of the last `window` positions; the slot of absolute position p is p % window."""

    def __init__(self, window: int):
        self.window = window
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def _ordered(self, buffer: mx.array, start: int, end: int) -> mx.array:
        """Positions [start, end) in temporal order (end - start <= window)."""
        s, e = start % self.window, end % self.window
        if end - start == 0:
            return buffer[:, :, :0]
        if s < e or e == 0:
            return buffer[:, :, s : (e or self.window)]
        return mx.concatenate([buffer[:, :, s:], buffer[:, :, :e]], axis=2)

    def _write(self, buffer: mx.array, new: mx.array, start: int) -> mx.array:
        """Write `new` (at most `window` positions) at absolute positions start.. (wrapping)."""
        n = new.shape[2]
        s = start % self.window
        first = min(n, self.window - s)
        buffer[:, :, s : s + first] = new[:, :, :first]
        if first < n:
            buffer[:, :, : n - first] = new[:, :, first:]
        return buffer

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array, int]:
        """Add L new positions; return the keys/values the new queries may see and the absolute
        position of the first returned key.

        Decoding (L == 1) returns the buffer as is: every stored position is inside the window of the
        new query, and attention does not depend on key order.
        """
        L = keys.shape[2]
        start = self.offset
        if L == 1:
            needed = min(start + 1, self.window)
            self.keys = _grow(self.keys, keys, needed, self.window)
            self.values = _grow(self.values, values, needed, self.window)
            self.keys = self._write(self.keys, keys, start)
            self.values = self._write(self.values, values, start)
            self.offset += 1
            return self.keys[:, :, :needed], self.values[:, :, :needed], max(0, self.offset - self.window)
        past = min(start, self.window - 1)
        if past:
            seen_k = mx.concatenate([self._ordered(self.keys, start - past, start), keys], axis=2)
            seen_v = mx.concatenate([self._ordered(self.values, start - past, start), values], axis=2)
        else:
            seen_k, seen_v = keys, values
        kept = min(L, self.window)
        self.keys = _grow(self.keys, keys, min(start + L, self.window), self.window)
        self.values = _grow(self.values, values, min(start + L, self.window), self.window)
        self.keys = self._write(self.keys, keys[:, :, L - kept :], start + L - kept)
        self.values = self._write(self.values, values[:, :, L - kept :], start + L - kept)
        self.offset += L
        return seen_k, seen_v, start - past

    def size(self) -> int:
        return min(self.offset, self.window)

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

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


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
