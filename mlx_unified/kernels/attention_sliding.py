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
from mlx_unified.kernels.metal_source import int_params, load_header, with_loads
from mlx_unified.kernels.quantized_attention import (
    Quantized,
    QuantizedKeys,
    dequantize,
    quantized_attention,
    quantized_shape,
)

MAX_CHUNKS = 32

_SOURCE = int_params("offset", "L", "chunk", "G", "n_kv", "window") + """
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
const size_t head = ((size_t)b * n_kv + h) * capacity;  // row of slot 0 of this KV head
const int slot_end = metal::min(metal::min(capacity, offset), (c + 1) * chunk);
for (int s = c * chunk; s < slot_end; ++s) {
  const int pos = newest - ((newest - s) % capacity);
  float key[DPL];
  float v[DPL];
  for (int k = 0; k < DPL; ++k) {
    key[k] = LOAD(keys, head + s, lane + 32 * k);
    v[k] = LOAD(values, head + s, lane + 32 * k);
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
def _kernel(factory: KernelFactory, quantized: bool = False):
    def stored(name: str) -> list[str]:
        return [name, f"{name}_scales", f"{name}_biases"] if quantized else [name]

    return factory(
        name="mlxu_sliding_window_attention" + ("_quantized" if quantized else ""),
        input_names=["queries", *stored("keys"), *stored("values"), "params"],
        output_names=["part_acc", "part_m", "part_l"],
        source=with_loads(_SOURCE, ("keys", "values"), quantized),
        header=PARTIALS_HEADER + load_header(quantized),
    )


def _kernel_supports(head_dim: int) -> bool:
    return head_dim % 32 == 0


def _check(
    queries: mx.array, keys_shape: tuple[int, ...], values_shape: tuple[int, ...], offset: int, window: int,
    for_kernel: bool = False,
) -> None:  # fmt: skip
    if queries.ndim != 4 or keys_shape != values_shape or len(keys_shape) != 4:
        raise ValueError("queries [B, H, L, D]; keys and values [B, n_kv, capacity, D] of one shape")
    head_dim = queries.shape[-1]
    if keys_shape[-1] != head_dim:
        raise ValueError(f"head_dim {head_dim} must be shared by keys")
    if for_kernel and not _kernel_supports(head_dim):
        raise ValueError(f"head_dim {head_dim} must be a multiple of 32")
    if queries.shape[1] % keys_shape[1]:
        raise ValueError("query heads must be a multiple of KV heads")
    if offset < queries.shape[2] or window < 1:
        raise ValueError(f"offset {offset} must cover the {queries.shape[2]} queries; window >= 1")


def _launch(
    factory: KernelFactory,
    queries: mx.array,
    stored: list[mx.array],
    offset: int,
    window: int,
    quantization: tuple[int, int] | None,
) -> mx.array:
    """Both kernels' launch: `stored` is keys then values, each a tensor, or its (packed, scales,
    biases) with `quantization` (group_size, bits)."""
    n_heads, n_queries = queries.shape[1:3]
    n_kv, capacity = stored[0].shape[1], stored[0].shape[2]
    group = n_heads // n_kv
    launch = split_key_launch(group * n_queries, min(capacity, offset), MAX_CHUNKS)
    params = mx.array([offset, n_queries, launch.chunk, group, n_kv, window], dtype=mx.int32)
    template = [] if quantization is None else [("BITS", quantization[1]), ("GROUP", quantization[0])]
    kernel = _kernel(factory, quantization is not None)
    return split_key_attention(factory, kernel, queries, n_kv, launch, [queries, *stored, params], template)


def sliding_window_attention_kernel(
    factory: KernelFactory,
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    offset: int,
    window: int,
) -> mx.array:
    """The kernel path of `sliding_window_attention`, built with `factory` (Metal or the emulator)."""
    _check(queries, keys.shape, values.shape, offset, window, for_kernel=True)
    return _launch(factory, queries, [keys, values], offset, window, None)


def ring_visible(offset: int, capacity: int, n_queries: int, window: int) -> mx.array:
    """bool [n_queries, capacity]: which ring slots the last `n_queries` of `offset` positions see
    (written, not after the query, within its window)."""
    slot = mx.arange(capacity)
    newest = offset - 1
    slot_pos = newest - mx.remainder(newest - slot, capacity)
    query_pos = mx.arange(offset - n_queries, offset)
    return (slot[None, :] < offset) & (slot_pos[None, :] <= query_pos[:, None]) & (
        slot_pos[None, :] > query_pos[:, None] - window
    )


def sliding_window_attention_reference(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    offset: int,
    window: int,
) -> mx.array:
    """Pure-MLX reference: float32 scores over all slots with an explicit visibility mask."""
    _check(queries, keys.shape, values.shape, offset, window)
    batch, n_heads, n_queries, head_dim = queries.shape
    n_kv, capacity = keys.shape[1], keys.shape[2]
    group = n_heads // n_kv
    visible = mx.tile(ring_visible(offset, capacity, n_queries, window), (group, 1))
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


# -- over a quantized ring ---------------------------------------------------------------------------
# The same kernel with each key and value dequantized in float32 as it is loaded.


def quantized_sliding_window_attention_kernel(
    factory: KernelFactory,
    queries: mx.array,
    keys: Quantized,
    values: Quantized,
    offset: int,
    window: int,
    *,
    group_size: int,
    bits: int,
) -> mx.array:
    """The kernel path of `quantized_sliding_window_attention`, built with `factory`."""
    shapes = (quantized_shape(keys, group_size, bits), quantized_shape(values, group_size, bits))
    _check(queries, *shapes, offset, window, for_kernel=True)
    return _launch(factory, queries, [*keys, *values], offset, window, (group_size, bits))


def quantized_sliding_window_attention_reference(
    queries: mx.array,
    keys: Quantized,
    values: Quantized,
    offset: int,
    window: int,
    *,
    group_size: int,
    bits: int,
) -> mx.array:
    """Pure-MLX reference: `sliding_window_attention_reference` over the float32 dequantized ring."""
    shapes = (quantized_shape(keys, group_size, bits), quantized_shape(values, group_size, bits))
    _check(queries, *shapes, offset, window)
    dense_keys, dense_values = dequantize(keys, group_size, bits), dequantize(values, group_size, bits)
    return sliding_window_attention_reference(queries, dense_keys, dense_values, offset, window)


def _primitives(queries, keys, values, offset, window, group_size, bits) -> mx.array:
    """The fallback off Metal: MLX's quantized products over the packed ring."""
    shapes = (quantized_shape(keys, group_size, bits), quantized_shape(values, group_size, bits))
    _check(queries, *shapes, offset, window)
    visible = ring_visible(offset, shapes[0][2], queries.shape[2], window)
    mask = mx.where(visible, 0.0, -mx.inf)
    return quantized_attention(queries, QuantizedKeys(keys, group_size, bits), values, mask)


def quantized_sliding_window_attention(
    queries: mx.array,
    keys: Quantized,
    values: Quantized,
    offset: int,
    window: int,
    *,
    group_size: int,
    bits: int,
) -> mx.array:
    """`sliding_window_attention` over a quantized ring (`mx.quantize`'s triples of the keys and
    values, groups of `group_size` along D, `bits` bits). Metal kernel when enabled, else MLX's
    quantized products."""
    options = dict(group_size=group_size, bits=bits)
    return dispatch.run(
        "quantized_sliding_window_attention",
        (queries.dtype, queries.shape[-1], queries.shape[2], queries.shape[1] // keys[0].shape[1], bits, group_size),
        lambda: quantized_sliding_window_attention_kernel(
            dispatch.metal_factory(), queries, keys, values, offset, window, **options
        ),
        lambda: _primitives(queries, keys, values, offset, window, group_size, bits),
        supported=_kernel_supports(queries.shape[-1]),
    )
