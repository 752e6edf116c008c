"""Hybrid self-attention: sliding-window layers and global layers (with K=V sharing)."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_lm.models.cache import KVCache

from .cache import LayerCache, SharedKVCache, SlidingWindowCache
from .config import LayerShape, TextConfig
from .masks import attention_mask
from .rope import Rope


@dataclass
class AttentionContext:
    """What every layer of one forward call shares: where the new tokens start and their blocks."""

    offset: int  # absolute position of the first new token
    block_ids: np.ndarray | None  # [B, L] vision block ids (-1 outside blocks), or None


def rms_norm(x: mx.array, weight: mx.array | None, eps: float) -> mx.array:
    """The reference's RMSNorm: float32 statistics, weight used as is (not 1 + weight)."""
    out = mx.fast.rms_norm(x.astype(mx.float32), None, eps)
    if weight is not None:
        out = out * weight.astype(mx.float32)
    return out.astype(x.dtype)


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
        self.rope = Rope(config.rope_parameters[shape.layer_type], shape.head_dim)

    def _heads(self, x: mx.array, n: int) -> mx.array:
        B, L, _ = x.shape
        return x.reshape(B, L, n, self.shape.head_dim)

    def __call__(self, x: mx.array, ctx: AttentionContext, cache: LayerCache | None) -> mx.array:
        B, L, _ = x.shape
        n_kv = self.shape.num_kv_heads
        queries = rms_norm(self._heads(self.q_proj(x), self.num_heads), self.q_norm.weight, self.eps)
        queries = self.rope(queries.transpose(0, 2, 1, 3), ctx.offset)
        raw = self._heads(self.k_proj(x), n_kv)
        if self.shape.k_eq_v:
            # One tensor serves as values and, scaled by k_norm's weight and rotated, as keys.
            shared = rms_norm(raw, None, self.eps).transpose(0, 2, 1, 3)
            if cache is not None:
                shared = cache.update_and_fetch(shared)
            key_start = ctx.offset + L - shared.shape[2]
            keys = self.rope(shared * self.k_norm.weight.astype(shared.dtype), key_start)
            values = shared
        else:
            keys = rms_norm(raw, self.k_norm.weight, self.eps).transpose(0, 2, 1, 3)
            keys = self.rope(keys, ctx.offset)
            values = rms_norm(self._heads(self.v_proj(x), n_kv), None, self.eps).transpose(0, 2, 1, 3)
            key_start = ctx.offset
            if isinstance(cache, SlidingWindowCache):
                keys, values, key_start = cache.update_and_fetch(keys, values)
            elif cache is not None:
                keys, values = cache.update_and_fetch(keys, values)
                key_start = ctx.offset + L - keys.shape[2]
        mask = attention_mask(ctx.offset, L, key_start, keys.shape[2], self.sliding_window, ctx.block_ids)
        out = mx.fast.scaled_dot_product_attention(queries, keys, values, scale=1.0, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def make_cache(self) -> LayerCache:
        if self.shape.is_sliding:
            return SlidingWindowCache(self.sliding_window)
        return SharedKVCache() if self.shape.k_eq_v else KVCache()
