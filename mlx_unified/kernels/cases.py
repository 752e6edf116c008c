"""Random cases pairing each kernel path with its reference: shared by tests, selfcheck and bench.

A case is a name plus two thunks over the same fresh inputs: `kernel(factory)` and `reference()`.
Shapes are small (the emulator runs every Metal thread as a real thread) but cover the awkward
corners: partial chunks and tiles, head dims 256 and 512, GQA ratios, ring wrap-around, offsets,
and all three float dtypes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx

from mlx_unified.emphasis import SpanBias
from mlx_unified.kernels.attention_global import (
    global_kv_attention_kernel,
    global_kv_attention_reference,
    quantized_global_kv_attention_kernel,
    quantized_global_kv_attention_reference,
)
from mlx_unified.kernels.attention_sliding import (
    quantized_sliding_window_attention_kernel,
    quantized_sliding_window_attention_reference,
    sliding_window_attention_kernel,
    sliding_window_attention_reference,
)
from mlx_unified.kernels.audio_norm import audio_norm_kernel, audio_norm_reference
from mlx_unified.kernels.dispatch import KernelFactory
from mlx_unified.kernels.norm_rope import norm_rope_kernel, norm_rope_reference
from mlx_unified.kernels.rope_tables import DEFAULT_ROPE, PROPORTIONAL_ROPE, RopeSpec
from mlx_unified.kernels.vision_tail import vision_tail_kernel, vision_tail_reference

# Max |kernel - reference| relative to max |reference|, per dtype (one rounding apart).
TOLERANCE = {mx.float32: 2e-5, mx.float16: 4e-3, mx.bfloat16: 3e-2}


@dataclass(frozen=True)
class Case:
    kernel_name: str
    label: str
    dtype: mx.Dtype
    kernel: Callable[[KernelFactory], mx.array]
    reference: Callable[[], mx.array]


def _normal(shape: tuple[int, ...], dtype: mx.Dtype, scale: float = 1.0) -> mx.array:
    return (scale * mx.random.normal(shape)).astype(dtype)


def global_attention_case(batch, heads, n_kv, queries, head_dim, length, capacity, dtype,
                          rope: RopeSpec = PROPORTIONAL_ROPE, span_bias: SpanBias | None = None) -> Case:
    q = _normal((batch, heads, queries, head_dim), dtype, head_dim**-0.5)
    v = _normal((batch, n_kv, capacity, head_dim), dtype)
    w = (1.0 + 0.2 * mx.random.normal((head_dim,))).astype(dtype)
    label = f"B{batch} H{heads}/{n_kv} L{queries} D{head_dim} T{length}/{capacity} bias={span_bias is not None}"
    return Case(
        "global_kv_attention", label, dtype,
        lambda f: global_kv_attention_kernel(f, q, v, w, length, rope=rope, span_bias=span_bias),
        lambda: global_kv_attention_reference(q, v, w, length, rope=rope, span_bias=span_bias),
    )


def sliding_attention_case(batch, heads, n_kv, queries, head_dim, offset, capacity, window, dtype) -> Case:
    q = _normal((batch, heads, queries, head_dim), dtype, head_dim**-0.5)
    k = _normal((batch, n_kv, capacity, head_dim), dtype)
    v = _normal((batch, n_kv, capacity, head_dim), dtype)
    label = f"B{batch} H{heads}/{n_kv} L{queries} D{head_dim} offset{offset} ring{capacity} window{window}"
    return Case(
        "sliding_window_attention", label, dtype,
        lambda f: sliding_window_attention_kernel(f, q, k, v, offset, window),
        lambda: sliding_window_attention_reference(q, k, v, offset, window),
    )


def quantized_global_attention_case(batch, heads, n_kv, queries, head_dim, length, capacity, dtype, bits, group_size,
                                    rope: RopeSpec = PROPORTIONAL_ROPE, span_bias: SpanBias | None = None) -> Case:
    q = _normal((batch, heads, queries, head_dim), dtype, head_dim**-0.5)
    v = tuple(mx.quantize(_normal((batch, n_kv, capacity, head_dim), dtype), group_size=group_size, bits=bits))
    w = (1.0 + 0.2 * mx.random.normal((head_dim,))).astype(dtype)
    options = dict(group_size=group_size, bits=bits, rope=rope, span_bias=span_bias)
    label = (f"B{batch} H{heads}/{n_kv} L{queries} D{head_dim} T{length}/{capacity} bias={span_bias is not None} "
             f"{bits}-bit g{group_size}")
    return Case(
        "quantized_global_kv_attention", label, dtype,
        lambda f: quantized_global_kv_attention_kernel(f, q, v, w, length, **options),
        lambda: quantized_global_kv_attention_reference(q, v, w, length, **options),
    )


def quantized_sliding_attention_case(batch, heads, n_kv, queries, head_dim, offset, capacity, window, dtype, bits,
                                     group_size) -> Case:
    q = _normal((batch, heads, queries, head_dim), dtype, head_dim**-0.5)
    k, v = (tuple(mx.quantize(_normal((batch, n_kv, capacity, head_dim), dtype), group_size=group_size, bits=bits))
            for _ in range(2))
    options = dict(group_size=group_size, bits=bits)
    label = (f"B{batch} H{heads}/{n_kv} L{queries} D{head_dim} offset{offset} ring{capacity} window{window} "
             f"{bits}-bit g{group_size}")
    return Case(
        "quantized_sliding_window_attention", label, dtype,
        lambda f: quantized_sliding_window_attention_kernel(f, q, k, v, offset, window, **options),
        lambda: quantized_sliding_window_attention_reference(q, k, v, offset, window, **options),
    )


def norm_rope_case(batch, length, heads, head_dim, offset, dtype, weighted: bool, rope: RopeSpec | None) -> Case:
    x = _normal((batch, length, heads, head_dim), dtype, 3.0)
    w = (1.0 + 0.2 * mx.random.normal((head_dim,))).astype(dtype) if weighted else None
    label = f"B{batch} L{length} H{heads} D{head_dim} offset{offset} weight={weighted} rope={rope}"
    return Case(
        "norm_rope", label, dtype,
        lambda f: norm_rope_kernel(f, x, w, offset, rope=rope),
        lambda: norm_rope_reference(x, w, offset, rope=rope),
    )


def vision_tail_case(patches, channels, table_rows, dtype) -> Case:
    x = _normal((1, patches, channels), dtype, 2.0)
    coords = mx.random.randint(0, table_rows, (1, patches, 2))
    positions = mx.where(mx.arange(patches)[None, :, None] >= patches - 2, -1, coords)  # 2 padding patches
    params = [_normal((channels,), dtype) for _ in range(4)]
    table = _normal((table_rows, 2, channels), dtype)
    args = (x, positions, params[0], params[1], table, params[2], params[3])
    return Case(
        "vision_tail", f"N{patches} C{channels} table{table_rows}", dtype,
        lambda f: vision_tail_kernel(f, *args),
        lambda: vision_tail_reference(*args),
    )


def audio_norm_case(frames, samples, dtype) -> Case:
    x = _normal((1, frames, samples), dtype, 0.1)
    return Case(
        "audio_norm", f"N{frames} C{samples}", dtype,
        lambda f: audio_norm_kernel(f, x),
        lambda: audio_norm_reference(x),
    )


def all_cases(seed: int = 0) -> list[Case]:
    """Every kernel, a handful of shapes each: the model's head dims and a few general ones."""
    mx.random.seed(seed)
    f32, f16, bf16 = mx.float32, mx.float16, mx.bfloat16
    return [
        # Model shapes: 16 query heads on 1 KV head of 512; partial last chunk; span bias.
        global_attention_case(1, 16, 1, 1, 512, 150, 160, f32, span_bias=SpanBias(20, 60, 1.5)),
        global_attention_case(1, 16, 1, 3, 512, 70, 80, bf16),
        # General: GQA 2:1 over 2 KV heads, batch 2, head dim 256, default RoPE, L = cache length.
        global_attention_case(2, 4, 2, 2, 256, 2, 8, f16, rope=DEFAULT_ROPE),
        global_attention_case(1, 6, 3, 1, 128, 97, 97, f32, rope=RopeSpec(1e4, 64)),
        # Model shapes: 16 heads on 8 KV heads of 256; wrapped ring, partly filled ring.
        sliding_attention_case(1, 16, 8, 1, 256, 300, 128, 128, bf16),
        sliding_attention_case(2, 4, 2, 1, 256, 37, 64, 64, f32),
        # Ring bigger than the window, and a short multi-token step inside it.
        sliding_attention_case(1, 4, 1, 2, 128, 150, 96, 40, f16),
        # The same shapes over quantized caches: 8 and 4 bits, groups of 32, 64 and 128.
        quantized_global_attention_case(1, 16, 1, 1, 512, 150, 160, f32, 8, 64, span_bias=SpanBias(20, 60, 1.5)),
        quantized_global_attention_case(1, 16, 1, 3, 512, 70, 80, bf16, 4, 64),
        quantized_global_attention_case(2, 4, 2, 2, 256, 2, 8, f16, 8, 32, rope=DEFAULT_ROPE),
        quantized_global_attention_case(1, 6, 3, 1, 128, 97, 97, f32, 4, 128, rope=RopeSpec(1e4, 64)),
        quantized_sliding_attention_case(1, 16, 8, 1, 256, 300, 128, 128, bf16, 8, 64),
        quantized_sliding_attention_case(2, 4, 2, 1, 256, 37, 64, 64, f32, 4, 32),
        quantized_sliding_attention_case(1, 4, 1, 2, 128, 150, 96, 40, f16, 4, 128),
        norm_rope_case(1, 3, 4, 512, 1000, bf16, True, PROPORTIONAL_ROPE),
        norm_rope_case(2, 2, 2, 256, 7, f32, True, DEFAULT_ROPE),
        norm_rope_case(1, 3, 2, 512, 0, f16, False, None),
        norm_rope_case(1, 1, 3, 64, 262_000, f32, True, DEFAULT_ROPE),
        vision_tail_case(5, 300, 7, f32),
        vision_tail_case(4, 384, 5, bf16),
        audio_norm_case(6, 640, f32),
        audio_norm_case(3, 640, f16),
        audio_norm_case(2, 100, bf16),
    ]


def max_relative_error(result: mx.array, expected: mx.array) -> float:
    result, expected = result.astype(mx.float32), expected.astype(mx.float32)
    if mx.isnan(result).any().item():
        return float("inf")  # poisoned (never written) or broken elements
    scale = max(mx.abs(expected).max().item(), 1e-6)
    return mx.abs(result - expected).max().item() / scale


def check(case: Case, factory: KernelFactory) -> float:
    """Relative error of the kernel on `factory` against the reference; raises past tolerance."""
    result = case.kernel(factory)
    expected = case.reference()
    if result.shape != expected.shape or result.dtype != expected.dtype:
        raise AssertionError(f"{case.kernel_name} {case.label}: got {result.shape} {result.dtype}, "
                             f"expected {expected.shape} {expected.dtype}")
    error = max_relative_error(result, expected)
    if not error <= TOLERANCE[case.dtype]:
        raise AssertionError(f"{case.kernel_name} {case.label} {case.dtype}: relative error {error:.3g}")
    return error
