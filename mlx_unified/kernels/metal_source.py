"""Metal source the kernels share: how a kernel reads its int parameters, and helper functions."""


def int_params(*names: str) -> str:
    """Metal lines naming a kernel's int parameters, in the order its Python side packs them into the
    `params` input (an int32 array)."""
    return "".join(f"const int {name} = params[{i}];\n" for i, name in enumerate(names))


# A sum over a whole threadgroup, for the row-norm kernels. `scratch` holds one float per simdgroup; the
# trailing barrier lets the caller reuse it at once.
BLOCK_SUM_HEADER = """
template <int THREADS>
inline float block_sum(float value, threadgroup float* scratch, uint lane, uint simdgroup) {
  value = simd_sum(value);
  if (lane == 0) scratch[simdgroup] = value;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float total = 0.0f;
  for (int s = 0; s < THREADS / 32; ++s) total += scratch[s];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  return total;
}
"""

# The rotation of one RoPE pair held by a lane: its slot k and the partner slot k + HALF (lane t owns
# dims t, t + 32, ..., so pair (i, i + D/2) sits in one lane), in float32.
ROTATE_PAIR_HEADER = """
template <int HALF>
inline void rotate_pair(thread float* x, int k, float angle) {
  // precise: angles reach ~2.6e5 rad at 256K context, beyond fast-math range reduction.
  const float cs = metal::precise::cos(angle);
  const float sn = metal::precise::sin(angle);
  const float x1 = x[k];
  const float x2 = x[k + HALF];
  x[k] = x1 * cs - x2 * sn;
  x[k + HALF] = x2 * cs + x1 * sn;
}
"""
