"""Hybrid self-attention: sliding-window layers and global layers (with K=V sharing).

On Metal, decoding (a few new tokens) goes through the custom kernels of `mlx_unified.kernels`,
which read the caches in place: the global K=V kernel derives keys from the single cached tensor,
the sliding kernel reads the ring buffer without a mask (on the CPU, their references do the same).
Prefill, and decoding on CUDA, use `mx.fast.scaled_dot_product_attention`: with many queries per key it is matmul-bound, MLX's
fused attention runs it at matmul speed with the causal / window / image-block masks applied in
the same pass, and every backend has it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import KVCache

from .cache import LayerCache, SharedKVCache, SlidingWindowCache
from .config import LayerShape, RopeConfig, TextConfig
from .kernels import (
    RopeSpec,
    SpanBias,
    global_kv_attention,
    kernels_enabled,
    norm_rope,
    sliding_window_attention,
)
from .kernels.rope_tables import rope_fused
from .masks import attention_mask

# observer(is_sliding, queries, keys, key_start, mask): see AttentionContext.observer.
AttentionObserver = Callable[[bool, mx.array, mx.array, int, "mx.array | str | None"], None]

# Up to this many new tokens (decoding, speculative verification) use the decode kernels.
DECODE_MAX_TOKENS = 8


def decode_in_place() -> bool:
    """Whether decoding reads the caches in place through `global_kv_attention` and
    `sliding_window_attention`: their Metal kernels, or on the CPU their float32 references, which
    beat MLX's bf16 attention there (decode 1.14x mlx-vlm against 0.91x on the scaled benchmark).
    Elsewhere (CUDA) MLX's fused attention over the derived keys is the faster path."""
    return kernels_enabled() or mx.default_device().type == mx.DeviceType.cpu


@dataclass
class AttentionContext:
    """What every layer of one forward call shares."""

    offset: int  # absolute position of the first new token
    block_ids: np.ndarray | None  # [B, L] vision block ids (-1 outside blocks), or None
    key_bias: SpanBias | None = None  # additive score bias on a key span, global layers only
    # Called on the prefill path of every layer as observer(is_sliding, queries, keys, key_start, mask),
    # with exactly what the fused attention takes (diagnostics recompute the probabilities from it).
    # It only reads: the layer's output is the same with or without it.
    observer: AttentionObserver | None = None
    masks: dict[tuple, mx.array | str | None] = field(default_factory=dict)

    def mask(
        self, num_queries: int, key_start: int, num_keys: int, window: int | None, key_bias: SpanBias | None,
        dtype: mx.Dtype,
    ) -> mx.array | str | None:
        """`attention_mask` for this call's queries, built once and shared by the layers that ask
        for the same one (all sliding layers do, and all global layers)."""
        key = (num_queries, key_start, num_keys, window, key_bias, dtype)
        if key not in self.masks:
            self.masks[key] = attention_mask(
                self.offset, num_queries, key_start, num_keys, window, self.block_ids, key_bias, dtype
            )
        return self.masks[key]


def rope_spec(rope: RopeConfig, head_dim: int) -> RopeSpec:
    if rope.rope_type == "default":
        return RopeSpec(rope.theta)
    return RopeSpec(rope.theta, 2 * int(rope.partial_rotary_factor * head_dim // 2))


def rms_norm(x: mx.array, weight: mx.array | None, eps: float) -> mx.array:
    """The reference's RMSNorm: weight used as is (not 1 + weight). MLX's fused kernel accumulates in
    float32 like the reference; in bf16 it may round the product once more (one ulp)."""
    return mx.fast.rms_norm(x, None if weight is None else weight.astype(x.dtype), eps)


class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, config: TextConfig, shape: LayerShape):
        super().__init__()
        self.shape = shape
        self.num_heads = config.num_attention_heads
        self.eps = config.rms_norm_eps
        self.sliding_window = config.sliding_window if shape.is_sliding else None
        dim, heads, kv_dim = config.hidden_size, config.num_attention_heads, shape.num_kv_heads * shape.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(dim, heads * shape.head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, kv_dim, bias=bias)
        if not shape.k_eq_v:
            self.v_proj = nn.Linear(dim, kv_dim, bias=bias)
        self.o_proj = nn.Linear(heads * shape.head_dim, dim, bias=bias)
        self.q_norm = RMSNorm(shape.head_dim, self.eps)
        self.k_norm = RMSNorm(shape.head_dim, self.eps)
        self.rope = rope_spec(config.rope_parameters[shape.layer_type], shape.head_dim)

    def _heads(self, x: mx.array, n: int) -> mx.array:
        B, L, _ = x.shape
        return x.reshape(B, L, n, self.shape.head_dim)

    def __call__(self, x: mx.array, ctx: AttentionContext, cache: LayerCache | None) -> mx.array:
        B, L, _ = x.shape
        n_kv, offset = self.shape.num_kv_heads, ctx.offset
        queries = norm_rope(self._heads(self.q_proj(x), self.num_heads), self.q_norm.weight, offset, rope=self.rope)
        raw = self._heads(self.k_proj(x), n_kv)
        decoding = cache is not None and L <= DECODE_MAX_TOKENS and ctx.block_ids is None and decode_in_place()
        if self.shape.k_eq_v:
            out = self._shared_kv(queries, raw, ctx, cache, decoding)
        else:
            keys = norm_rope(raw, self.k_norm.weight, offset, rope=self.rope)
            values = norm_rope(self._heads(self.v_proj(x), n_kv), None, offset, rope=None)
            out = self._separate_kv(queries, keys, values, ctx, cache, decoding and L == 1)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def _shared_kv(self, queries, raw, ctx: AttentionContext, cache: SharedKVCache | None, decoding: bool):
        """One tensor is the values and, scaled by k_norm's weight and rotated, the keys."""
        L = queries.shape[2]
        shared = norm_rope(raw, None, ctx.offset, rope=None)  # v_norm: RMSNorm without weight
        if cache is not None:
            shared = cache.update_and_fetch(shared)
        if decoding:
            return global_kv_attention(
                queries, cache.values, self.k_norm.weight, cache.offset, rope=self.rope, span_bias=ctx.key_bias
            )
        key_start = ctx.offset + L - shared.shape[2]
        keys = rope_fused(shared * self.k_norm.weight.astype(shared.dtype), key_start, self.rope)
        mask = ctx.mask(L, key_start, shared.shape[2], None, ctx.key_bias, shared.dtype)
        if ctx.observer is not None:
            ctx.observer(False, queries, keys, key_start, mask)
        return mx.fast.scaled_dot_product_attention(queries, keys, shared, scale=1.0, mask=mask)

    def _separate_kv(self, queries, keys, values, ctx: AttentionContext, cache: LayerCache | None, decoding: bool):
        L = queries.shape[2]
        key_start = ctx.offset
        if isinstance(cache, SlidingWindowCache):
            keys, values, key_start = cache.update_and_fetch(keys, values)
            if decoding:
                return sliding_window_attention(queries, cache.keys, cache.values, cache.offset, self.sliding_window)
        elif cache is not None:
            keys, values = cache.update_and_fetch(keys, values)
            key_start = ctx.offset + L - keys.shape[2]
        key_bias = None if self.shape.is_sliding else ctx.key_bias  # emphasis acts on global layers only
        mask = ctx.mask(L, key_start, keys.shape[2], self.sliding_window, key_bias, keys.dtype)
        if ctx.observer is not None:
            ctx.observer(self.sliding_window is not None, queries, keys, key_start, mask)
        return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=1.0, mask=mask)

    def make_cache(self) -> LayerCache:
        if self.shape.is_sliding:
            return SlidingWindowCache(self.sliding_window)
        return SharedKVCache() if self.shape.k_eq_v else KVCache()
