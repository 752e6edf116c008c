"""Decode attention for the sliding-window layers, straight over the rotating cache.

The cache is a ring buffer `keys, values [B, n_kv, capacity, D]` where absolute position p lives
in slot `p % capacity` and `offset` positions have been written.  A slot's position follows from
the newest one: `p = (offset - 1) - ((offset - 1 - slot) mod capacity)`, so the kernel decides
visibility per slot (written, causal, within `window`) with no mask tensor and no unrolling of
the ring; this stays right across wrap-around.  Same split-key layout as the global kernel, with
`attention_combine` as second pass.

Prefill keeps `mx.fast.scaled_dot_product_attention` with a window mask: many queries make it a
matrix-matrix problem that MLX's tiled kernel handles better than a per-row loop.
"""

from __future__ import annotations

from functools import cache

import mlx.core as mx

from mlx_unified.kernels import dispatch
from mlx_unified.kernels.attention_combine import PARTIALS_HEADER, split_key_attention, split_key_launch
from mlx_unified.kernels.dispatch import KernelFactory
from mlx_unified.kernels.metal_source import int_params

MAX_CHUNKS = 32

SOURCE = int_params("offset", "L", "chunk", "G", "n_kv", "window") + """
constexpr int DPL = D / 32;
const int capacity = keys_shape[2];
const int rows = G * L;
const int n_chunks = threadgroups_per_grid.x;
const int newest = offset - 1;

const uint lane = thread_index_in_simdgroup;
const uint sg = simdgroup_index_in_threadgroup;
const int c = threadgroup_position_in_grid.x;
const int h = threadgroup_position_in_grid.y;
const int b = threadgroup_position_in_grid.z;

float qr[ROWS][DPL];
float acc[ROWS][DPL];
float m[ROWS];
float l[ROWS];
int query_pos[ROWS];
for (int i = 0; i < ROWS; ++i) {
  const int r = sg * ROWS + i;
  const bool active = r < rows;
  const int g = active ? r / L : 0;
  const int ql = active ? r % L : 0;
  query_pos[i] = active ? offset - L + ql : -(1 << 30);
  const device T* qrow = queries + (((size_t)b * n_kv * G + h * G + g) * L + ql) * D;
  for (int k = 0; k < DPL; ++k) {
    qr[i][k] = active ? static_cast<float>(qrow[lane + 32 * k]) : 0.0f;
    acc[i][k] = 0.0f;
  }
  m[i] = -3.0e38f;  // finite: Metal's fast math may not honour infinities
  l[i] = 0.0f;
}
const size_t head = ((size_t)b * n_kv + h) * capacity * D;
const int slot_end = metal::min(metal::min(capacity, offset), (c + 1) * chunk);
for (int s = c * chunk; s < slot_end; ++s) {
  const int pos = newest - ((newest - s) % capacity);
  float key[DPL];
  float v[DPL];
  for (int k = 0; k < DPL; ++k) {
    key[k] = static_cast<float>(keys[head + (size_t)s * D + lane + 32 * k]);
    v[k] = static_cast<float>(values[head + (size_t)s * D + lane + 32 * k]);
  }
  for (int i = 0; i < ROWS; ++i) {
    float dot = 0.0f;
    for (int k = 0; k < DPL; ++k) dot += qr[i][k] * key[k];
    const float score = simd_sum(dot);
    if (pos <= query_pos[i] && pos > query_pos[i] - window) softmax_step<DPL>(score, v, m[i], l[i], acc[i]);
  }
}
for (int i = 0; i < ROWS; ++i) {
  const int r = sg * ROWS + i;
  if (r < rows) {
    const size_t at = (((size_t)b * n_kv + h) * n_chunks + c) * rows + r;
    write_partial<DPL, D>(part_acc, part_m, part_l, at, lane, acc[i], m[i], l[i]);
  }
}
"""


@cache
def _kernel(factory: KernelFactory):
    return factory(
        name="mlxu_sliding_window_attention",
        input_names=["queries", "keys", "values", "params"],
        output_names=["part_acc", "part_m", "part_l"],
        source=SOURCE,
        header=PARTIALS_HEADER,
    )


def _kernel_supports(head_dim: int) -> bool:
    return head_dim % 32 == 0


def _check(
    queries: mx.array, keys: mx.array, values: mx.array, offset: int, window: int, for_kernel: bool = False
) -> None:
    if queries.ndim != 4 or keys.shape != values.shape or keys.ndim != 4:
        raise ValueError("queries [B, H, L, D]; keys and values [B, n_kv, capacity, D] of one shape")
    head_dim = queries.shape[-1]
    if keys.shape[-1] != head_dim:
        raise ValueError(f"head_dim {head_dim} must be shared by keys")
    if for_kernel and not _kernel_supports(head_dim):
        raise ValueError(f"head_dim {head_dim} must be a multiple of 32")
    if queries.shape[1] % keys.shape[1]:
        raise ValueError("query heads must be a multiple of KV heads")
    if offset < queries.shape[2] or window < 1:
        raise ValueError(f"offset {offset} must cover the {queries.shape[2]} queries; window >= 1")


def sliding_window_attention_kernel(
    factory: KernelFactory,
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    offset: int,
    window: int,
) -> mx.array:
    """The kernel path of `sliding_window_attention`, built with `factory` (Metal or the emulator)."""
    _check(queries, keys, values, offset, window, for_kernel=True)
    n_heads, n_queries = queries.shape[1:3]
    n_kv, capacity = keys.shape[1], keys.shape[2]
    group = n_heads // n_kv
    launch = split_key_launch(group * n_queries, min(capacity, offset), MAX_CHUNKS)
    params = mx.array([offset, n_queries, launch.chunk, group, n_kv, window], dtype=mx.int32)
    return split_key_attention(factory, _kernel(factory), queries, n_kv, launch, [queries, keys, values, params])


def sliding_window_attention_reference(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    offset: int,
    window: int,
) -> mx.array:
    """Pure-MLX reference: float32 scores over all slots with an explicit visibility mask."""
    _check(queries, keys, values, offset, window)
    batch, n_heads, n_queries, head_dim = queries.shape
    n_kv, capacity = keys.shape[1], keys.shape[2]
    group = n_heads // n_kv
    slot = mx.arange(capacity)
    newest = offset - 1
    slot_pos = newest - mx.remainder(newest - slot, capacity)
    query_pos = mx.tile(mx.arange(offset - n_queries, offset), group)
    visible = (slot[None, :] < offset) & (slot_pos[None, :] <= query_pos[:, None]) & (
        slot_pos[None, :] > query_pos[:, None] - window
    )
    q = queries.astype(mx.float32).reshape(batch, n_kv, group * n_queries, head_dim)
    scores = q @ keys.astype(mx.float32).swapaxes(-1, -2)
    weights = mx.softmax(mx.where(visible, scores, -mx.inf), axis=-1)
    out = (weights @ values.astype(mx.float32)).reshape(batch, n_heads, n_queries, head_dim)
    return out.astype(queries.dtype)


def sliding_window_attention(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    offset: int,
    window: int,
) -> mx.array:
    """Attention of `queries [B, H, L, D]` (positions offset-L..offset-1) over the ring buffer
    `keys, values [B, n_kv, capacity, D]` (position p in slot p % capacity, `offset` positions
    written), each query seeing the `window` newest positions up to itself; scale 1.0.
    Returns `[B, H, L, D]` in the queries' dtype.  Metal kernel when enabled, else the reference.
    """
    return dispatch.run(
        "sliding_window_attention",
        (queries.dtype, queries.shape[-1], queries.shape[2], queries.shape[1] // keys.shape[1]),
        lambda: sliding_window_attention_kernel(dispatch.metal_factory(), queries, keys, values, offset, window),
        lambda: sliding_window_attention_reference(queries, keys, values, offset, window),
        supported=_kernel_supports(queries.shape[-1]),
    )
