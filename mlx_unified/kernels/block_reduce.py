"""Metal helper shared by the row-norm kernels: a sum over a whole threadgroup."""

# `scratch` holds one float per simdgroup; the trailing barrier lets the caller reuse it at once.
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
