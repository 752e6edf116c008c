"""Fused tail of the vision embedder, one pass over each patch row:
LayerNorm (patch_ln2) -> + factorized position embedding -> LayerNorm (pos_norm) -> RMSNorm (no weight).

The matrix products around it (patch_dense before, embedding_projection after) stay MLX matmuls.
Position `(x, y)` adds `pos_embedding[x, 0] + pos_embedding[y, 1]`; a negative coordinate (padding
patches sit at (-1, -1)) adds nothing.  Everything is float32 inside, rounded once at the end.
"""

from __future__ import annotations

from functools import cache

import mlx.core as mx

from mlx_unified.kernels import dispatch
from mlx_unified.kernels.dispatch import KernelFactory
from mlx_unified.kernels.metal_source import BLOCK_SUM_HEADER

THREADS = 256
LAYER_NORM_EPS = 1e-5

SOURCE = """
constexpr int PER_THREAD = (C + THREADS - 1) / THREADS;
threadgroup float scratch[THREADS / 32];
const uint tid = thread_index_in_threadgroup;
const uint lane = thread_index_in_simdgroup;
const uint sg = simdgroup_index_in_threadgroup;
const int row = threadgroup_position_in_grid.x;
const float ln_eps = eps[0];
const float rms_eps = eps[1];
const int px = positions[2 * row];
const int py = positions[2 * row + 1];
const int table_rows = pos_embedding_shape[0];

float v[PER_THREAD];
float sum = 0.0f;
for (int k = 0; k < PER_THREAD; ++k) {
  const int i = tid + THREADS * k;
  v[k] = i < C ? static_cast<float>(x[(size_t)row * C + i]) : 0.0f;
  sum += v[k];
}
float mean = block_sum<THREADS>(sum, scratch, lane, sg) / C;
float sq = 0.0f;
for (int k = 0; k < PER_THREAD; ++k) {
  const int i = tid + THREADS * k;
  const float d = i < C ? v[k] - mean : 0.0f;
  sq += d * d;
}
float scale = metal::precise::rsqrt(block_sum<THREADS>(sq, scratch, lane, sg) / C + ln_eps);
sum = 0.0f;
for (int k = 0; k < PER_THREAD; ++k) {
  const int i = tid + THREADS * k;
  if (i < C) {
    float y = (v[k] - mean) * scale * static_cast<float>(ln_weight[i]) + static_cast<float>(ln_bias[i]);
    if (px >= 0 && px < table_rows) y += static_cast<float>(pos_embedding[((size_t)px * 2) * C + i]);
    if (py >= 0 && py < table_rows) y += static_cast<float>(pos_embedding[((size_t)py * 2 + 1) * C + i]);
    v[k] = y;
    sum += y;
  }
}
mean = block_sum<THREADS>(sum, scratch, lane, sg) / C;
sq = 0.0f;
for (int k = 0; k < PER_THREAD; ++k) {
  const int i = tid + THREADS * k;
  const float d = i < C ? v[k] - mean : 0.0f;
  sq += d * d;
}
scale = metal::precise::rsqrt(block_sum<THREADS>(sq, scratch, lane, sg) / C + ln_eps);
sq = 0.0f;
for (int k = 0; k < PER_THREAD; ++k) {
  const int i = tid + THREADS * k;
  if (i < C) {
    v[k] = (v[k] - mean) * scale * static_cast<float>(pos_norm_weight[i]) + static_cast<float>(pos_norm_bias[i]);
    sq += v[k] * v[k];
  }
}
scale = metal::precise::rsqrt(block_sum<THREADS>(sq, scratch, lane, sg) / C + rms_eps);
for (int k = 0; k < PER_THREAD; ++k) {
  const int i = tid + THREADS * k;
  if (i < C) out[(size_t)row * C + i] = static_cast<T>(v[k] * scale);
}
"""

_INPUTS = ["x", "positions", "ln_weight", "ln_bias", "pos_embedding", "pos_norm_weight", "pos_norm_bias", "eps"]


@cache
def _kernel(factory: KernelFactory):
    return factory(
        name="mlxu_vision_tail", input_names=_INPUTS, output_names=["out"],
        source=SOURCE, header=BLOCK_SUM_HEADER,
    )


def _check(x: mx.array, positions: mx.array, pos_embedding: mx.array) -> None:
    channels = x.shape[-1]
    if positions.shape != (*x.shape[:-1], 2):
        raise ValueError(f"positions must be {(*x.shape[:-1], 2)}, got {positions.shape}")
    if pos_embedding.ndim != 3 or pos_embedding.shape[1:] != (2, channels):
        raise ValueError(f"pos_embedding must be [rows, 2, {channels}]")


def vision_tail_kernel(
    factory: KernelFactory,
    x: mx.array,
    positions: mx.array,
    ln_weight: mx.array,
    ln_bias: mx.array,
    pos_embedding: mx.array,
    pos_norm_weight: mx.array,
    pos_norm_bias: mx.array,
    rms_eps: float = 1e-6,
) -> mx.array:
    """The kernel path of `vision_tail`, built with `factory` (Metal or the emulator)."""
    _check(x, positions, pos_embedding)
    channels = x.shape[-1]
    rows = x.size // channels
    eps = mx.array([LAYER_NORM_EPS, rms_eps], dtype=mx.float32)
    (out,) = _kernel(factory)(
        inputs=[x, positions.astype(mx.int32), ln_weight, ln_bias, pos_embedding, pos_norm_weight,
                pos_norm_bias, eps],
        template=[("T", x.dtype), ("C", channels), ("THREADS", THREADS)],
        grid=(THREADS * rows, 1, 1),
        threadgroup=(THREADS, 1, 1),
        output_shapes=[x.shape],
        output_dtypes=[x.dtype],
    )
    return out


def _layer_norm(x: mx.array, weight: mx.array, bias: mx.array) -> mx.array:
    mean = mx.mean(x, axis=-1, keepdims=True)
    var = mx.mean(mx.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * mx.rsqrt(var + LAYER_NORM_EPS) * weight.astype(mx.float32) + bias.astype(mx.float32)


def vision_tail_reference(
    x: mx.array,
    positions: mx.array,
    ln_weight: mx.array,
    ln_bias: mx.array,
    pos_embedding: mx.array,
    pos_norm_weight: mx.array,
    pos_norm_bias: mx.array,
    rms_eps: float = 1e-6,
) -> mx.array:
    """Pure-MLX reference of `vision_tail`."""
    _check(x, positions, pos_embedding)
    h = _layer_norm(x.astype(mx.float32), ln_weight, ln_bias)
    table = pos_embedding.astype(mx.float32)
    for axis in (0, 1):
        coord = positions[..., axis].astype(mx.int32)
        valid = (coord >= 0) & (coord < table.shape[0])
        lookup = table[mx.where(valid, coord, 0), axis]
        h = h + mx.where(valid[..., None], lookup, 0.0)
    h = _layer_norm(h, pos_norm_weight, pos_norm_bias)
    h = h * mx.rsqrt(mx.mean(h * h, axis=-1, keepdims=True) + rms_eps)
    return h.astype(x.dtype)


def vision_tail(
    x: mx.array,
    positions: mx.array,
    ln_weight: mx.array,
    ln_bias: mx.array,
    pos_embedding: mx.array,
    pos_norm_weight: mx.array,
    pos_norm_bias: mx.array,
    rms_eps: float = 1e-6,
) -> mx.array:
    """`x [..., C]` (patch_dense output), `positions [..., 2]` (x, y; negative = padding),
    `pos_embedding [rows, 2, C]` -> RMSNorm(LayerNorm(LayerNorm(x) + pos)) `[..., C]` in x's dtype
    (the LayerNorms' eps is nn.LayerNorm's, the RMSNorm's the vision config's). Metal kernel when
    enabled, else the reference.
    """
    args = (x, positions, ln_weight, ln_bias, pos_embedding, pos_norm_weight, pos_norm_bias, rms_eps)
    return dispatch.run(
        "vision_tail",
        (x.dtype, x.shape[-1], pos_embedding.dtype),
        lambda: vision_tail_kernel(dispatch.metal_factory(), *args),
        lambda: vision_tail_reference(*args),
    )
