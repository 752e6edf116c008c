"""RoPE frequency tables shared by the kernels and their references."""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx
import numpy as np

from mlx_unified.config import RopeSpec

DEFAULT_ROPE = RopeSpec(theta=10_000.0)
PROPORTIONAL_ROPE = RopeSpec(theta=1_000_000.0, rotated_dims=128)


def rotated_pairs(spec: RopeSpec, head_dim: int) -> int:
    rotated = head_dim if spec.rotated_dims is None else spec.rotated_dims
    if rotated % 2 or not 0 <= rotated <= head_dim:
        raise ValueError(f"rotated_dims {rotated} must be even and at most head_dim {head_dim}")
    return rotated // 2


@lru_cache(maxsize=32)
def inv_freq(spec: RopeSpec, head_dim: int) -> mx.array:
    """float32 `[head_dim // 2]`: theta^(-2i/D) for rotated pairs, 0 for the rest."""
    pairs = rotated_pairs(spec, head_dim)
    i = np.arange(head_dim // 2, dtype=np.float64)
    freq = np.where(i < pairs, spec.theta ** (-2.0 * i / head_dim), 0.0).astype(np.float32)
    return mx.array(freq)


@lru_cache(maxsize=32)
def rope_periods(spec: RopeSpec, head_dim: int) -> mx.array:
    """`mx.fast.rope`'s `freqs` (periods, 1 / inv_freq): infinite for the pairs that do not rotate."""
    with np.errstate(divide="ignore"):
        return mx.array(1.0 / np.array(inv_freq(spec, head_dim), dtype=np.float64), dtype=mx.float32)


def rope_fused(x: mx.array, offset: int, spec: RopeSpec) -> mx.array:
    """Rotate-half RoPE of `x [..., P, D]` at positions offset.., in x's dtype, with MLX's fused kernel
    (every backend has one). Its angles differ from `rope_reference`'s by float32 rounding: the outputs
    are a few 1e-5 apart (relative) at position 1000 and about 1e-3 at 32K, where float32 angles are
    that coarse anyway."""
    head_dim = x.shape[-1]
    return mx.fast.rope(
        x, head_dim, traditional=False, base=None, scale=1.0, offset=offset, freqs=rope_periods(spec, head_dim)
    )


def rope_reference(x: mx.array, positions: mx.array, spec: RopeSpec) -> mx.array:
    """float32 rotate-half RoPE of `x [..., P, D]` at `positions [P]` (int).

    Only the rotated pairs are computed: the others (zero frequency) pass through as they are, which
    is what a rotation by angle 0 gives, so the proportional RoPE (64 of 256 pairs) costs a quarter."""
    half, pairs = x.shape[-1] // 2, rotated_pairs(spec, x.shape[-1])
    angle = positions.astype(mx.float32)[:, None] * inv_freq(spec, x.shape[-1])[None, :pairs]
    cos, sin = mx.cos(angle), mx.sin(angle)
    x = x.astype(mx.float32)
    first, second = x[..., :pairs], x[..., half : half + pairs]
    rotated = [first * cos - second * sin, x[..., pairs:half], second * cos + first * sin, x[..., half + pairs :]]
    return mx.concatenate(rotated, axis=-1)
