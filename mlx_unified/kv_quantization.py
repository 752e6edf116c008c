"""KV-cache quantization settings: mlx-lm's `kv_bits`, `kv_group_size` and `quantized_kv_start` as one value.

Plain Python (no MLX), so the memory estimates can count a quantized cache. The values are checked by
`generation_params.check_kv_quantization`, the rule `GenerationParams.validate` applies for every
surface. The caches themselves are in `cache.py` (`maybe_quantize`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .generation_params import (
    DEFAULT_KV_GROUP_SIZE,
    DEFAULT_QUANTIZED_KV_START,
    ParameterError,
    check_kv_quantization,
)


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
