"""Rotary position embeddings: default (sliding layers) and proportional (global layers)."""

from __future__ import annotations

import math

import mlx.core as mx

from .config import RopeConfig


class Rope:
    """Rotate-half RoPE over the whole head_dim, as the reference applies it.

    `mx.fast.rope` takes periods (1 / inv_freq); a zero inverse frequency (the unrotated part of
    proportional RoPE) becomes an infinite period, which leaves that pair unchanged.
    """

    def __init__(self, rope: RopeConfig, head_dim: int):
        self.head_dim = head_dim
        inv_freq = rope.inv_freq(head_dim)
        self.inv_freq = mx.array(inv_freq, dtype=mx.float32)
        self.periods = mx.array([1.0 / f if f > 0 else math.inf for f in inv_freq], dtype=mx.float32)

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        """x: [B, heads, L, head_dim]; positions offset .. offset + L - 1."""
        return mx.fast.rope(
            x, self.head_dim, traditional=False, base=None, scale=1.0, offset=offset, freqs=self.periods
        )
