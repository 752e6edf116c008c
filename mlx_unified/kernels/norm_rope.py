"""Fused head norm + RoPE + head-major transpose, one pass over the projection output.

Covers q_norm + RoPE, k_norm + RoPE and v_norm (no weight, no RoPE) of both layer kinds, with the
default or the proportional RoPE at any position offset.  Input is the projection reshaped to
`[B, L, H, D]` (contiguous, as the matmul leaves it); output is `[B, H, L, D]`, the layout
attention and the caches use, so the transpose costs no extra pass either.

Numerics follow the reference model: RMSNorm in float32 (`x * rsqrt(mean(x^2) + eps) * weight`),
rounded to the input dtype, then RoPE in float32 and a final rounding.
"""

from __future__ import annotations

from functools import cache

import mlx.core as mx

from mlx_unified.kernels import dispatch
from mlx_unified.kernels.dispatch import KernelFactory
from mlx_unified.kernels.metal_source import ROTATE_PAIR_HEADER, int_params
from mlx_unified.kernels.rope_tables import (
    RopeSpec,
    inv_freq,
    rope_fused,
    rope_reference,
    rotated_pairs,
)

# One simdgroup per head row; lane t owns dims t, t + 32, ... so a RoPE pair is in one lane.
SOURCE = int_params("L", "H", "offset", "pairs") + """
constexpr int DPL = D / 32;
constexpr int HALF = DPL / 2;
const float eps = eps_value[0];
const uint lane = thread_index_in_simdgroup;
const int row = thread_position_in_grid.y;  // (b, l, h) row-major, as the input is laid out
const int h = row % H;
const int l = (row / H) % L;
const int b = row / (H * L);

const device T* src = x + (size_t)row * D;
float v[DPL];
float sum_sq = 0.0f;
for (int k = 0; k < DPL; ++k) {
  v[k] = static_cast<float>(src[lane + 32 * k]);
  sum_sq += v[k] * v[k];
}
const float scale = metal::precise::rsqrt(simd_sum(sum_sq) / D + eps);
for (int k = 0; k < DPL; ++k) {
  const float w = HAS_WEIGHT ? static_cast<float>(weight[lane + 32 * k]) : 1.0f;
  // Round the norm's output to T as the reference model does before its RoPE.
  v[k] = static_cast<float>(static_cast<T>(v[k] * scale * w));
}
if (ROPE) {
  const float position = (float)(offset + l);
  for (int k = 0; k < HALF; ++k) {
    if ((int)(lane + 32 * k) < pairs) rotate_pair<HALF>(v, k, position * freq[lane + 32 * k]);
  }
}
device T* dst = out + (((size_t)b * H + h) * L + l) * D;
for (int k = 0; k < DPL; ++k) dst[lane + 32 * k] = static_cast<T>(v[k]);
"""


@cache
def _kernel(factory: KernelFactory):
    return factory(
        name="mlxu_norm_rope",
        input_names=["x", "weight", "freq", "params", "eps_value"],
        output_names=["out"],
        source=SOURCE,
        header=ROTATE_PAIR_HEADER,
    )


def _kernel_supports(head_dim: int, rope: RopeSpec | None) -> bool:
    return head_dim % 32 == 0 and (rope is None or head_dim % 64 == 0)


def _check(x: mx.array, weight: mx.array | None, rope: RopeSpec | None, for_kernel: bool = False) -> None:
    if x.ndim != 4:
        raise ValueError(f"x must be [B, L, H, D], got {x.shape}")
    head_dim = x.shape[-1]
    if for_kernel and not _kernel_supports(head_dim, rope):
        raise ValueError(f"head_dim {head_dim} must be a multiple of 32 (64 with RoPE)")
    if weight is not None and weight.shape != (head_dim,):
        raise ValueError(f"weight must be [{head_dim}]")


def _rows_per_threadgroup(rows: int) -> int:
    return next(n for n in (8, 4, 2, 1) if rows % n == 0)


def norm_rope_kernel(
    factory: KernelFactory,
    x: mx.array,
    weight: mx.array | None,
    offset: int,
    *,
    rope: RopeSpec | None,
    eps: float = 1e-6,
) -> mx.array:
    """The kernel path of `norm_rope`, built with `factory` (Metal or the emulator)."""
    _check(x, weight, rope, for_kernel=True)
    batch, length, heads, head_dim = x.shape
    rows = batch * length * heads
    pairs = rotated_pairs(rope, head_dim) if rope is not None else 0
    freq = inv_freq(rope, head_dim) if rope is not None else mx.zeros((1,), dtype=mx.float32)
    params = mx.array([length, heads, offset, pairs], dtype=mx.int32)
    per_group = _rows_per_threadgroup(rows)
    (out,) = _kernel(factory)(
        inputs=[x, weight if weight is not None else mx.ones((1,), dtype=x.dtype), freq, params,
                mx.array([eps], dtype=mx.float32)],
        template=[("T", x.dtype), ("D", head_dim), ("HAS_WEIGHT", weight is not None),
                  ("ROPE", rope is not None)],
        grid=(32, rows, 1),
        threadgroup=(32, per_group, 1),
        output_shapes=[(batch, heads, length, head_dim)],
        output_dtypes=[x.dtype],
    )
    return out


def norm_rope_reference(
    x: mx.array,
    weight: mx.array | None,
    offset: int,
    *,
    rope: RopeSpec | None,
    eps: float = 1e-6,
) -> mx.array:
    """Pure-MLX reference of `norm_rope`."""
    _check(x, weight, rope)
    xf = x.astype(mx.float32)
    normed = xf * mx.rsqrt(mx.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if weight is not None:
        normed = normed * weight.astype(mx.float32)
    normed = normed.astype(x.dtype).transpose(0, 2, 1, 3)
    if rope is None:
        return normed
    positions = mx.arange(offset, offset + x.shape[1])
    return rope_reference(normed, positions, rope).astype(x.dtype)


def norm_rope_fused(
    x: mx.array,
    weight: mx.array | None,
    offset: int,
    *,
    rope: RopeSpec | None,
    eps: float = 1e-6,
) -> mx.array:
    """`norm_rope` off Metal: MLX's fused RMSNorm and RoPE, two kernels instead of the reference's dozen
    element-wise passes. Agrees with the reference to one rounding."""
    normed = mx.fast.rms_norm(x, None if weight is None else weight.astype(x.dtype), eps).transpose(0, 2, 1, 3)
    return normed if rope is None else rope_fused(normed, offset, rope)


def norm_rope(
    x: mx.array,
    weight: mx.array | None,
    offset: int,
    *,
    rope: RopeSpec | None,
    eps: float = 1e-6,
) -> mx.array:
    """RMSNorm over the head dim (weight used as is; `None`: no weight) then, if `rope` is given,
    rotate-half RoPE at positions `offset + l`; `x [B, L, H, D]` -> `[B, H, L, D]`, x's dtype.
    Metal kernel when enabled, else `norm_rope_fused`.
    """
    return dispatch.run(
        "norm_rope",
        (x.dtype, x.shape[-1], weight is not None, rope is not None),
        lambda: norm_rope_kernel(dispatch.metal_factory(), x, weight, offset, rope=rope, eps=eps),
        lambda: norm_rope_fused(x, weight, offset, rope=rope, eps=eps),
        supported=_kernel_supports(x.shape[-1], rope),
    )
