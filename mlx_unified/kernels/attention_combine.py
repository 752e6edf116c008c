"""Second pass of split-key decode attention: merges per-chunk soft-max partials into the output.

The first pass (global or sliding attention) leaves, for each chunk of keys and each query row,
the running maximum `m`, the soft-max denominator `l` and the unnormalized weighted sum of values
`acc` (float32).  Rows are `r = g * L + l` for query head `kv_head * G + g` and query `l`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import mlx.core as mx

from mlx_unified.kernels.dispatch import KernelFactory
from mlx_unified.kernels.metal_source import int_params

# The first pass's per-row steps, shared by the global and sliding kernels. `acc` holds this lane's
# DPL dims of one query row; `write_partial` leaves what `combine_partials` below merges.
PARTIALS_HEADER = """
template <int DPL>
inline void softmax_step(
    float score, thread const float* v, thread float& m, thread float& l, thread float* acc) {
  const float m_new = metal::max(m, score);
  const float correction = metal::exp(m - m_new);
  const float p = metal::exp(score - m_new);
  l = l * correction + p;
  for (int k = 0; k < DPL; ++k) acc[k] = acc[k] * correction + p * v[k];
  m = m_new;
}

template <int DPL, int D>
inline void write_partial(
    device float* part_acc, device float* part_m, device float* part_l, size_t at, uint lane,
    thread const float* acc, float m, float l) {
  for (int k = 0; k < DPL; ++k) part_acc[at * D + lane + 32 * k] = acc[k];
  if (lane == 0) {
    part_m[at] = m;
    part_l[at] = l;
  }
}
"""

# One simdgroup per query row; lane t owns dims t, t + 32, ... so reads of `acc` are coalesced.
SOURCE = int_params("n_chunks", "rows", "L", "G", "n_kv") + """
constexpr int DPL = D / 32;
const uint lane = thread_position_in_grid.x;
const int r = thread_position_in_grid.y;
const int bh = thread_position_in_grid.z;
const int b = bh / n_kv;
const int h = bh % n_kv;

const size_t row_base = (size_t)bh * n_chunks * rows + r;
float m_max = -3.0e38f;
for (int c = 0; c < n_chunks; ++c) {
  m_max = metal::max(m_max, part_m[row_base + (size_t)c * rows]);
}
float denom = 0.0f;
float out_acc[DPL];
for (int i = 0; i < DPL; ++i) out_acc[i] = 0.0f;
for (int c = 0; c < n_chunks; ++c) {
  const size_t at = row_base + (size_t)c * rows;
  // Chunks a row cannot see carry l = 0 and the empty maximum, so their weight is 0.
  const float weight = metal::exp(part_m[at] - m_max);
  denom += weight * part_l[at];
  const device float* acc = part_acc + at * D;
  for (int i = 0; i < DPL; ++i) out_acc[i] += weight * acc[lane + 32 * i];
}
const float inv = 1.0f / denom;
const int g = r / L;
const int l = r % L;
device T* o = out + (((size_t)b * n_kv * G + h * G + g) * L + l) * D;
for (int i = 0; i < DPL; ++i) o[lane + 32 * i] = static_cast<T>(out_acc[i] * inv);
"""


@cache
def _kernel(factory: KernelFactory):
    return factory(
        name="mlxu_attention_combine",
        input_names=["part_acc", "part_m", "part_l", "params"],
        output_names=["out"],
        source=SOURCE,
    )


# The first pass's launch shape: up to MAX_SIMDGROUPS simdgroups of up to MAX_ROWS_PER_SIMDGROUP query
# rows each, and the keys split into chunks of at least MIN_CHUNK (at most `max_chunks` of them).
MIN_CHUNK = 64
MAX_ROWS_PER_SIMDGROUP = 8
MAX_SIMDGROUPS = 16


@dataclass(frozen=True)
class SplitKeyLaunch:
    """How the first pass covers `rows` query rows of one KV head and `n_keys` keys."""

    rows: int
    rows_per_simdgroup: int
    simdgroups: int
    chunk: int
    n_chunks: int


def split_key_launch(rows: int, n_keys: int, max_chunks: int) -> SplitKeyLaunch:
    rows_per_simdgroup = min(MAX_ROWS_PER_SIMDGROUP, max(1, -(-rows // MAX_SIMDGROUPS)))
    chunk = max(MIN_CHUNK, -(-n_keys // max_chunks))
    return SplitKeyLaunch(rows, rows_per_simdgroup, -(-rows // rows_per_simdgroup), chunk, -(-n_keys // chunk))


def split_key_attention(
    factory: KernelFactory,
    first_pass: Callable[..., list[mx.array]],
    queries: mx.array,
    n_kv: int,
    launch: SplitKeyLaunch,
    inputs: list[mx.array],
    template: list[tuple[str, int]] = (),
) -> mx.array:
    """Run a first-pass kernel (inputs as it names them; template T, D, ROWS and `template`) over
    `launch`, then merge its partials: `[B, H, L, D]` attention output for `[B, H, L, D]` queries."""
    batch, n_heads, n_queries, head_dim = queries.shape
    rows, n_chunks = launch.rows, launch.n_chunks
    part_acc, part_m, part_l = first_pass(
        inputs=inputs,
        template=[("T", queries.dtype), ("D", head_dim), ("ROWS", launch.rows_per_simdgroup), *template],
        grid=(32 * launch.simdgroups * n_chunks, n_kv, batch),
        threadgroup=(32 * launch.simdgroups, 1, 1),
        output_shapes=[(batch, n_kv, n_chunks, rows, head_dim), (batch, n_kv, n_chunks, rows),
                       (batch, n_kv, n_chunks, rows)],
        output_dtypes=[mx.float32, mx.float32, mx.float32],
    )
    return combine_partials(
        factory, part_acc, part_m, part_l,
        batch=batch, n_kv=n_kv, group=n_heads // n_kv, length=n_queries, dtype=queries.dtype,
    )  # fmt: skip


def combine_partials(
    factory: KernelFactory,
    part_acc: mx.array,
    part_m: mx.array,
    part_l: mx.array,
    *,
    batch: int,
    n_kv: int,
    group: int,
    length: int,
    dtype: mx.Dtype,
) -> mx.array:
    """`[B, n_kv * group, length, D]` attention output from `[B, n_kv, chunks, rows(, D)]` partials."""
    n_chunks, rows, head_dim = part_acc.shape[2], part_acc.shape[3], part_acc.shape[4]
    params = mx.array([n_chunks, rows, length, group, n_kv], dtype=mx.int32)
    (out,) = _kernel(factory)(
        inputs=[part_acc, part_m, part_l, params],
        template=[("T", dtype), ("D", head_dim)],
        grid=(32, rows, batch * n_kv),
        threadgroup=(32, 1, 1),
        output_shapes=[(batch, n_kv * group, length, head_dim)],
        output_dtypes=[dtype],
    )
    return out
