"""The audio projector's norm: RMSNorm without weight over each 640-sample frame, one pass.

One simdgroup per frame (640 samples = 20 per lane); the Linear(640 -> 3840) after it stays an
MLX matmul.
"""

from __future__ import annotations

from functools import cache

import mlx.core as mx

from mlx_unified.kernels import dispatch
from mlx_unified.kernels.dispatch import KernelFactory

SOURCE = """
constexpr int PER_LANE = (C + 31) / 32;
const uint lane = thread_index_in_simdgroup;
const int row = thread_position_in_grid.y;
const device T* src = frames + (size_t)row * C;
float v[PER_LANE];
float sum_sq = 0.0f;
for (int k = 0; k < PER_LANE; ++k) {
  const int i = lane + 32 * k;
  v[k] = i < C ? static_cast<float>(src[i]) : 0.0f;
  sum_sq += v[k] * v[k];
}
const float scale = metal::precise::rsqrt(simd_sum(sum_sq) / C + eps[0]);
for (int k = 0; k < PER_LANE; ++k) {
  const int i = lane + 32 * k;
  if (i < C) out[(size_t)row * C + i] = static_cast<T>(v[k] * scale);
}
"""


@cache
def _kernel(factory: KernelFactory):
    return factory(name="mlxu_audio_norm", input_names=["frames", "eps"], output_names=["out"], source=SOURCE)


def audio_norm_kernel(factory: KernelFactory, frames: mx.array, eps: float = 1e-6) -> mx.array:
    """The kernel path of `audio_norm`, built with `factory` (Metal or the emulator)."""
    samples = frames.shape[-1]
    rows = frames.size // samples
    per_group = next(n for n in (8, 4, 2, 1) if rows % n == 0)
    (out,) = _kernel(factory)(
        inputs=[frames, mx.array([eps], dtype=mx.float32)],
        template=[("T", frames.dtype), ("C", samples)],
        grid=(32, rows, 1),
        threadgroup=(32, per_group, 1),
        output_shapes=[frames.shape],
        output_dtypes=[frames.dtype],
    )
    return out


def audio_norm_reference(frames: mx.array, eps: float = 1e-6) -> mx.array:
    """Pure-MLX reference of `audio_norm`."""
    x = frames.astype(mx.float32)
    return (x * mx.rsqrt(mx.mean(x * x, axis=-1, keepdims=True) + eps)).astype(frames.dtype)


def audio_norm(frames: mx.array, eps: float = 1e-6) -> mx.array:
    """RMSNorm without weight over the last axis of `frames [..., 640]`, frames' dtype.
    Metal kernel when enabled, else the reference.
    """
    return dispatch.run(
        "audio_norm",
        (frames.dtype, frames.shape[-1]),
        lambda: audio_norm_kernel(dispatch.metal_factory(), frames, eps),
        lambda: audio_norm_reference(frames, eps),
    )
