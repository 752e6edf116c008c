"""Decode attention for the global K=V layers, reading the single cached tensor once.

The cache holds `v = v_norm(k_proj(x))` only; keys are derived in the kernel as
`k = rope_proportional(v * k_norm_weight)`, so a decoded token reads `capacity x 512` values per
global layer instead of keys and values: half of a K-and-V cache.  All 16 query heads share the
one KV head (GQA), so each value row is fetched once per threadgroup and reused by every row.

Split-key ("flash decoding") layout: threadgroup `c` handles keys `[c * chunk, (c + 1) * chunk)`
for every query row of one (batch, KV head); a second kernel (`attention_combine`) merges the
per-chunk soft-max partials.  Each simdgroup owns `ROWS` query rows held in registers; lane t owns
dims t, t + 32, ..., so a RoPE pair (i, i + D/2) sits in one lane and keys never leave registers.

Prefill (many queries) keeps `mx.fast.scaled_dot_product_attention` over explicitly derived keys:
there the work is matrix-matrix and MLX's tiled kernel beats a per-row loop, while the extra key
tensor is written once per prompt rather than once per token.
"""

from __future__ import annotations

from functools import cache

import mlx.core as mx

from mlx_unified.emphasis import SpanBias
from mlx_unified.kernels import dispatch
from mlx_unified.kernels.attention_combine import PARTIALS_HEADER, split_key_attention, split_key_launch
from mlx_unified.kernels.dispatch import KernelFactory
from mlx_unified.kernels.metal_source import ROTATE_PAIR_HEADER, int_params, load_header, with_loads
from mlx_unified.kernels.quantized_attention import (
    DerivedKeys,
    Quantized,
    dequantize,
    quantized_attention,
    quantized_shape,
)
from mlx_unified.kernels.rope_tables import (
    PROPORTIONAL_ROPE,
    RopeSpec,
    inv_freq,
    rope_reference,
    rotated_pairs,
)

# Keeps the partials small while giving the GPU enough threadgroups at short contexts.
MAX_CHUNKS = 64


_SOURCE = int_params("length", "L", "chunk", "G", "n_kv", "bias_start", "bias_stop", "pairs") + """
constexpr int DPL = D / 32;   // dims per lane
constexpr int HALF = DPL / 2; // the RoPE partner of slot i is slot i + HALF
const float bias_value = bias[0];
const int capacity = values_shape[2];
const int rows = G * L;
const int n_chunks = threadgroups_per_grid.x;

const uint lane = thread_index_in_simdgroup;
const uint sg = simdgroup_index_in_threadgroup;
const int c = threadgroup_position_in_grid.x;
const int h = threadgroup_position_in_grid.y;
const int b = threadgroup_position_in_grid.z;

float qr[ROWS][DPL];
float acc[ROWS][DPL];
float m[ROWS];
float l[ROWS];
int last_visible[ROWS];
for (int i = 0; i < ROWS; ++i) {
  const int r = sg * ROWS + i;
  const bool active = r < rows;
  const int g = active ? r / L : 0;
  const int ql = active ? r % L : 0;
  // Query ql sits at position length - L + ql and sees keys up to it (causal among the L).
  last_visible[i] = active ? length - L + ql : -1;
  const device T* qrow = queries + (((size_t)b * n_kv * G + h * G + g) * L + ql) * D;
  for (int k = 0; k < DPL; ++k) {
    qr[i][k] = active ? static_cast<float>(qrow[lane + 32 * k]) : 0.0f;
    acc[i][k] = 0.0f;
  }
  m[i] = -3.0e38f;  // finite: Metal's fast math may not honour infinities
  l[i] = 0.0f;
}
float wk[DPL];
for (int k = 0; k < DPL; ++k) wk[k] = static_cast<float>(k_norm_weight[lane + 32 * k]);
float freq[HALF];
for (int k = 0; k < HALF; ++k) freq[k] = inv_freq[lane + 32 * k];

const size_t head = ((size_t)b * n_kv + h) * capacity;  // row of position 0 of this KV head
const int j_end = metal::min(length, (c + 1) * chunk);
for (int j = c * chunk; j < j_end; ++j) {
  float v[DPL];
  float key[DPL];
  for (int k = 0; k < DPL; ++k) {
    v[k] = LOAD(values, head + j, lane + 32 * k);
    key[k] = v[k] * wk[k];
  }
  for (int k = 0; k < HALF; ++k) {
    if ((int)(lane + 32 * k) < pairs) rotate_pair<HALF>(key, k, (float)j * freq[k]);
  }
  const float key_bias = (j >= bias_start && j < bias_stop) ? bias_value : 0.0f;
  for (int i = 0; i < ROWS; ++i) {
    float dot = 0.0f;
    for (int k = 0; k < DPL; ++k) dot += qr[i][k] * key[k];
    const float score = simd_sum(dot) + key_bias;
    if (j <= last_visible[i]) softmax_step<DPL>(score, v, m[i], l[i], acc[i]);
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
    values = ["values", "values_scales", "values_biases"] if quantized else ["values"]
    return factory(
        name="mlxu_global_kv_attention" + ("_quantized" if quantized else ""),
        input_names=["queries", *values, "k_norm_weight", "inv_freq", "params", "bias"],
        output_names=["part_acc", "part_m", "part_l"],
        source=with_loads(_SOURCE, ("values",), quantized),
        header=PARTIALS_HEADER + ROTATE_PAIR_HEADER + load_header(quantized),
    )


def _kernel_supports(head_dim: int) -> bool:
    return head_dim % 64 == 0


def _check(queries: mx.array, values_shape: tuple[int, ...], length: int, for_kernel: bool = False) -> None:
    if queries.ndim != 4 or len(values_shape) != 4:
        raise ValueError("queries and values must be [B, heads, L, D] and [B, n_kv, capacity, D]")
    head_dim = queries.shape[-1]
    if values_shape[-1] != head_dim:
        raise ValueError(f"head_dim {head_dim} must be shared by values")
    if for_kernel and not _kernel_supports(head_dim):
        raise ValueError(f"head_dim {head_dim} must be a multiple of 64")
    if queries.shape[1] % values_shape[1]:
        raise ValueError("query heads must be a multiple of KV heads")
    if not queries.shape[2] <= length <= values_shape[2]:
        raise ValueError(f"length {length} must cover the {queries.shape[2]} queries and fit the cache")


def _launch(
    factory: KernelFactory,
    queries: mx.array,
    values: list[mx.array],
    k_norm_weight: mx.array,
    length: int,
    rope: RopeSpec,
    span_bias: SpanBias | None,
    quantization: tuple[int, int] | None,
) -> mx.array:
    """Both kernels' launch: `values` is the cache tensor, or its (packed, scales, biases) with
    `quantization` (group_size, bits)."""
    n_heads, n_queries, head_dim = queries.shape[1:]
    n_kv = values[0].shape[1]
    group = n_heads // n_kv
    launch = split_key_launch(group * n_queries, length, MAX_CHUNKS)
    start, stop, value = span_bias if span_bias is not None else (0, 0, 0.0)
    params = mx.array(
        [length, n_queries, launch.chunk, group, n_kv, start, stop, rotated_pairs(rope, head_dim)], dtype=mx.int32
    )
    inputs = [queries, *values, k_norm_weight, inv_freq(rope, head_dim), params, mx.array([value], dtype=mx.float32)]
    template = [] if quantization is None else [("BITS", quantization[1]), ("GROUP", quantization[0])]
    kernel = _kernel(factory, quantization is not None)
    return split_key_attention(factory, kernel, queries, n_kv, launch, inputs, template)


def global_kv_attention_kernel(
    factory: KernelFactory,
    queries: mx.array,
    values: mx.array,
    k_norm_weight: mx.array,
    length: int,
    *,
    rope: RopeSpec = PROPORTIONAL_ROPE,
    span_bias: SpanBias | None = None,
) -> mx.array:
    """The kernel path of `global_kv_attention`, built with `factory` (Metal or the emulator)."""
    _check(queries, values.shape, length, for_kernel=True)
    return _launch(factory, queries, [values], k_norm_weight, length, rope, span_bias, None)


def causal_bias(length: int, n_queries: int, span_bias: SpanBias | None) -> mx.array:
    """float32 [n_queries, length]: what the last `n_queries` of `length` positions add to their scores
    over positions 0..length-1 (causal among them, and the span bias)."""
    key_pos = mx.arange(length)
    query_pos = mx.arange(length - n_queries, length)
    bias = mx.where(key_pos[None, :] <= query_pos[:, None], 0.0, -mx.inf)
    if span_bias is not None:
        in_span = (key_pos >= span_bias.start) & (key_pos < span_bias.stop)
        bias = bias + mx.where(in_span, span_bias.value, 0.0)[None, :]
    return bias


def global_kv_attention_reference(
    queries: mx.array,
    values: mx.array,
    k_norm_weight: mx.array,
    length: int,
    *,
    rope: RopeSpec = PROPORTIONAL_ROPE,
    span_bias: SpanBias | None = None,
) -> mx.array:
    """Pure-MLX reference: explicit keys, float32 scores and soft-max, scale 1.0."""
    _check(queries, values.shape, length)
    batch, n_heads, n_queries, head_dim = queries.shape
    n_kv = values.shape[1]
    group = n_heads // n_kv
    v = values[:, :, :length].astype(mx.float32)
    keys = rope_reference(v * k_norm_weight.astype(mx.float32), mx.arange(length), rope)
    q = queries.astype(mx.float32).reshape(batch, n_kv, group * n_queries, head_dim)
    scores = q @ keys.swapaxes(-1, -2)
    bias = mx.tile(causal_bias(length, n_queries, span_bias), (group, 1))
    weights = mx.softmax(scores + bias, axis=-1)
    out = (weights @ v).reshape(batch, n_heads, n_queries, head_dim)
    return out.astype(queries.dtype)


def global_kv_attention(
    queries: mx.array,
    values: mx.array,
    k_norm_weight: mx.array,
    length: int,
    *,
    rope: RopeSpec = PROPORTIONAL_ROPE,
    span_bias: SpanBias | None = None,
) -> mx.array:
    """Attention of `queries [B, H, L, D]` (q_norm'd and RoPE'd, at positions length-L..length-1)
    over the K=V cache `values [B, n_kv, capacity, D]` (valid length `length`), keys derived as
    `rope(values * k_norm_weight)` at positions 0..length-1; causal among the L; scale 1.0.
    Returns `[B, H, L, D]` in the queries' dtype.  Metal kernel when enabled, else the reference.
    """
    return dispatch.run(
        "global_kv_attention",
        (queries.dtype, queries.shape[-1], queries.shape[2], queries.shape[1] // values.shape[1]),
        lambda: global_kv_attention_kernel(
            dispatch.metal_factory(), queries, values, k_norm_weight, length, rope=rope, span_bias=span_bias
        ),
        lambda: global_kv_attention_reference(
            queries, values, k_norm_weight, length, rope=rope, span_bias=span_bias
        ),
        supported=_kernel_supports(queries.shape[-1]),
    )


# -- over a quantized cache --------------------------------------------------------------------------
# The same kernel with each value dequantized in float32 as it is loaded (`QUANTIZED_LOAD_HEADER`):
# the cache is read once, packed, and never dequantized as a whole.


def quantized_global_kv_attention_kernel(
    factory: KernelFactory,
    queries: mx.array,
    values: Quantized,
    k_norm_weight: mx.array,
    length: int,
    *,
    group_size: int,
    bits: int,
    rope: RopeSpec = PROPORTIONAL_ROPE,
    span_bias: SpanBias | None = None,
) -> mx.array:
    """The kernel path of `quantized_global_kv_attention`, built with `factory` (Metal or the emulator)."""
    _check(queries, quantized_shape(values, group_size, bits), length, for_kernel=True)
    return _launch(factory, queries, list(values), k_norm_weight, length, rope, span_bias, (group_size, bits))


def quantized_global_kv_attention_reference(
    queries: mx.array,
    values: Quantized,
    k_norm_weight: mx.array,
    length: int,
    *,
    group_size: int,
    bits: int,
    rope: RopeSpec = PROPORTIONAL_ROPE,
    span_bias: SpanBias | None = None,
) -> mx.array:
    """Pure-MLX reference: `global_kv_attention_reference` over the float32 dequantized values."""
    _check(queries, quantized_shape(values, group_size, bits), length)
    dense = dequantize(tuple(a[:, :, :length] for a in values), group_size, bits)
    return global_kv_attention_reference(queries, dense, k_norm_weight, length, rope=rope, span_bias=span_bias)


def _primitives(queries, values, k_norm_weight, length, group_size, bits, rope, span_bias) -> mx.array:
    """The fallback off Metal: MLX's quantized products over the packed values (`DerivedKeys`)."""
    _check(queries, quantized_shape(values, group_size, bits), length)
    values = tuple(a[:, :, :length] for a in values)
    keys = DerivedKeys(values, k_norm_weight, 0, rope, group_size, bits)
    n_queries = queries.shape[2]
    mask = None if n_queries == 1 and span_bias is None else causal_bias(length, n_queries, span_bias)
    return quantized_attention(queries, keys, values, mask)


def quantized_global_kv_attention(
    queries: mx.array,
    values: Quantized,
    k_norm_weight: mx.array,
    length: int,
    *,
    group_size: int,
    bits: int,
    rope: RopeSpec = PROPORTIONAL_ROPE,
    span_bias: SpanBias | None = None,
) -> mx.array:
    """`global_kv_attention` over the quantized K=V cache `values` (`mx.quantize`'s triple of the
    `[B, n_kv, capacity, D]` tensor, groups of `group_size` along D, `bits` bits). Metal kernel when
    enabled, else MLX's quantized products."""
    options = dict(group_size=group_size, bits=bits, rope=rope, span_bias=span_bias)
    return dispatch.run(
        "quantized_global_kv_attention",
        (queries.dtype, queries.shape[-1], queries.shape[2], queries.shape[1] // values[0].shape[1], bits, group_size),
        lambda: quantized_global_kv_attention_kernel(
            dispatch.metal_factory(), queries, values, k_norm_weight, length, **options
        ),
        lambda: _primitives(queries, values, k_norm_weight, length, group_size, bits, rope, span_bias),
        supported=_kernel_supports(queries.shape[-1]),
    )
