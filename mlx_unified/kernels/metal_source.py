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

# How an attention kernel reads one cached element, dim `d` of row `row` (a position of one KV head),
# as float: its source writes `LOAD(name, row, d)` and `with_loads` makes that a call of the float
# `load_element` or of the quantized one, which unpacks `mx.quantize`'s layout (element d of a row in
# bits [(d % per_word) * BITS, +BITS) of word d / per_word; scale and bias of group d / GROUP; inputs
# `name`, `name_scales`, `name_biases`) and dequantizes it in float32.
FLOAT_LOAD_HEADER = """
template <int D, typename U>
inline float load_element(const device U* x, size_t row, int d) {
  return static_cast<float>(x[row * D + d]);
}
"""

QUANTIZED_LOAD_HEADER = """
template <int D, int BITS, int GROUP, typename S>
inline float load_element(
    const device uint32_t* packed, const device S* scales, const device S* biases, size_t row, int d) {
  constexpr int PER_WORD = 32 / BITS;
  const uint32_t word = packed[row * (D / PER_WORD) + d / PER_WORD];
  const float q = static_cast<float>((word >> ((d % PER_WORD) * BITS)) & ((1u << BITS) - 1u));
  const size_t g = row * (D / GROUP) + d / GROUP;
  return q * static_cast<float>(scales[g]) + static_cast<float>(biases[g]);
}
"""


def with_loads(source: str, names: tuple[str, ...], quantized: bool) -> str:
    """`source` with its `LOAD(name, ...)` reads of the inputs `names` made float or quantized loads."""
    for name in names:
        call = f"load_element<D, BITS, GROUP>({name}, {name}_scales, {name}_biases," if quantized else (
            f"load_element<D>({name},"
        )
        source = source.replace(f"LOAD({name},", call)
    return source


def load_header(quantized: bool) -> str:
    return QUANTIZED_LOAD_HEADER if quantized else FLOAT_LOAD_HEADER
