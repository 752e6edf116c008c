"""KV-cache quantization settings: mlx-lm's `kv_bits`, `kv_group_size` and `quantized_kv_start`, checked.

Plain Python (no MLX), so the front ends can refuse bad values before loading anything and the memory
estimates can count a quantized cache. The caches themselves are in `cache.py` (`maybe_quantize`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .errors import InputError

KV_BITS = (4, 8)
KV_GROUP_SIZES = (32, 64, 128)
DEFAULT_KV_GROUP_SIZE = 64
DEFAULT_QUANTIZED_KV_START = 5000  # mlx-lm's default


class KVQuantizationError(InputError):
    """Bad KV-cache quantization settings (kv_bits, kv_group_size, quantized_kv_start)."""


@dataclass(frozen=True)
class KVQuantization:
    """mlx-lm's `kv_bits`, `kv_group_size` and `quantized_kv_start`: every layer's cache is quantized
    (affine, `bits`, groups of `group_size` along the head dim) once `start` positions are in it.

    The switch is a position, not a moment: prefill ends a pass at `start` (`prefill.prefill`), so
    positions before `start` are computed against the float cache and every later one against the
    quantized cache, however the prompt is cut into passes or restored from the prefix cache."""

    bits: int
    group_size: int = DEFAULT_KV_GROUP_SIZE
    start: int = DEFAULT_QUANTIZED_KV_START

    def __post_init__(self) -> None:
        if self.bits not in KV_BITS:
            raise KVQuantizationError(f"kv_bits must be one of {', '.join(map(str, KV_BITS))}, got {self.bits}")
        if self.group_size not in KV_GROUP_SIZES:
            raise KVQuantizationError(
                f"kv_group_size must be one of {', '.join(map(str, KV_GROUP_SIZES))}, got {self.group_size}"
            )
        if self.start < 0:
            raise KVQuantizationError(f"quantized_kv_start must be 0 or more, got {self.start}")

    def check(self, head_dims: Sequence[int]) -> None:
        """Refuse a group size that does not divide every layer's head dim (what is quantized)."""
        bad = sorted({d for d in head_dims if d % self.group_size})
        if bad:
            raise KVQuantizationError(
                f"kv_group_size {self.group_size} does not divide this model's head dim {bad[0]}: "
                "each head's keys and values are quantized in whole groups"
            )

    def variant(self, length: int) -> str:
        """What the state of a prompt's first `length` positions depends on beyond its tokens: nothing
        up to `start` (those are the float cache's), these settings after it."""
        return "" if length <= self.start else f"kv{self.bits}/g{self.group_size}/from{self.start}"


def kv_quantization(
    kv_bits: int | None, kv_group_size: int = DEFAULT_KV_GROUP_SIZE, quantized_kv_start: int = DEFAULT_QUANTIZED_KV_START
) -> KVQuantization | None:
    """mlx-lm's three arguments as one setting; None (a float cache) when kv_bits is None."""
    return None if kv_bits is None else KVQuantization(kv_bits, kv_group_size, quantized_kv_start)
