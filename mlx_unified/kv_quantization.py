"""KV-cache quantization settings: mlx-lm's `kv_bits`, `kv_group_size` and `quantized_kv_start` as one value.

Plain Python (no MLX), so the memory estimates can count a quantized cache. The values are checked by
`check_kv_quantization`, the rule `GenerationParams.validate` applies for every surface. The caches
themselves are in `cache.py` (`maybe_quantize`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ParameterError

# mlx-lm's KV-cache quantization: bits and group sizes its quantized cache takes, its defaults.
KV_BITS = (4, 8)
KV_GROUP_SIZES = (32, 64, 128)
DEFAULT_KV_GROUP_SIZE = 64
DEFAULT_QUANTIZED_KV_START = 5000


def check_kv_quantization(bits: Any, group_size: Any, start: Any) -> None:
    """mlx-lm's rule for `kv_bits`, `kv_group_size` and `quantized_kv_start`; ParameterError naming the
    one that breaks it."""
    for name, value, allowed in (("kv_bits", bits, KV_BITS), ("kv_group_size", group_size, KV_GROUP_SIZES)):
        if not _is_count(value) or value not in allowed:
            raise ParameterError(name, f"must be one of {', '.join(map(str, allowed))}, got {value!r}")
    if not _is_count(start):
        raise ParameterError("quantized_kv_start", f"must be an integer, got {start!r}")
    if start < 0:
        raise ParameterError("quantized_kv_start", f"must be >= 0, got {start}")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class KVQuantizationError(ParameterError):
    """KV-cache quantization settings this model or cache cannot take; `param` names the setting."""


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
        check_kv_quantization(self.bits, self.group_size, self.start)

    def check(self, head_dims: Sequence[int]) -> None:
        """Refuse a group size that does not divide every layer's head dim (what is quantized)."""
        bad = sorted({d for d in head_dims if d % self.group_size})
        if bad:
            raise KVQuantizationError(
                "kv_group_size",
                f"{self.group_size} does not divide this model's head dim {bad[0]}: "
                "each head's keys and values are quantized in whole groups",
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
