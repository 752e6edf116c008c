"""Hybrid self-attention: sliding-window layers and global layers (with K=V sharing).

On Metal, decoding (a few new tokens) goes through the custom kernels of `mlx_unified.kernels`,
which read the caches in place: the global K=V kernel derives keys from the single cached tensor,
the sliding kernel reads the ring buffer without a mask (on the CPU, their references do the same).
Prefill, and decoding on CUDA, use `mx.fast.scaled_dot_product_attention` (every backend has it), one
block of queries at a time over only the keys that block may see: MLX fuses prefill attention only
for head dims up to 128 on Metal, so for this model's 256- and 512-dim heads, as on CUDA and the CPU,
it computes every score of a [queries x keys] product, masked ones included.
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
from .masks import attention_mask, unsplit_spans
from .memory import PREFILL_SCORE_BYTES, global_blocks_together, query_block, sliding_query_block

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
    score_bytes: int = PREFILL_SCORE_BYTES  # bound on one query block's float32 scores
    masks: dict[tuple, mx.array | str | None] = field(default_factory=dict)
    spans: dict[int, list[tuple[int, int]]] = field(default_factory=dict)

    def mask(
        self, query_start: int, num_queries: int, key_start: int, num_keys: int, window: int | None,
        key_bias: SpanBias | None, dtype: mx.Dtype,
    ) -> mx.array | str | None:
        """`attention_mask` for queries at query_start.. (absolute), built once and shared by the layers
        that ask for the same one (all sliding layers do, and all global layers)."""
        key = (query_start, num_queries, key_start, num_keys, window, key_bias, dtype)
        if key not in self.masks:
            first = query_start - self.offset
            blocks = None if self.block_ids is None else self.block_ids[:, first : first + num_queries]
            self.masks[key] = attention_mask(
                query_start, num_queries, key_start, num_keys, window, blocks, key_bias, dtype
            )
        return self.masks[key]

    def query_spans(self, num_queries: int, size: int) -> list[tuple[int, int]]:
        """This call's queries in blocks of about `size` that never split a vision block, so a block's
        queries see no key after the block's last query."""
        if size not in self.spans:
            self.spans[size] = unsplit_spans(self.block_ids, 0, num_queries, size)
        return self.spans[size]


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
        keys = self.shared_keys(shared, key_start)
        return self._prefill_attention(queries, keys, shared, ctx, key_start, ctx.key_bias)

    def shared_keys(self, shared: mx.array, start: int) -> mx.array:
        """The keys of a K=V layer from its one tensor (positions start..): rope(k_norm.weight * v), which
        is the reference's rope(k_norm(raw)) since v = v_norm(raw) and both norms divide by the same RMS."""
        return rope_fused(shared * self.k_norm.weight.astype(shared.dtype), start, self.rope)

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
        return self._prefill_attention(queries, keys, values, ctx, key_start, key_bias)

    def _prefill_attention(
        self, queries: mx.array, keys: mx.array, values: mx.array, ctx: AttentionContext, key_start: int,
        key_bias: SpanBias | None,
    ) -> mx.array:
        """Attention of this call's queries over keys/values at absolute positions key_start.. (the last
        key is the last query's), one block of queries at a time: each block reads only the keys it may
        see, its sliding window or, on global layers, the keys up to its last query. One product over
        all queries and keys computes and then masks away the rest: on a 2048-token pass of the CPU
        benchmark model, 3.6 s against 0.34 s for a sliding layer, 5.0 s against 2.9 s for a global one.
        Blocks are sized so that what they mask away stays small (`memory.sliding_query_block`,
        `memory.query_block`); global blocks also keep their scores within ctx.score_bytes."""
        L, window = queries.shape[2], self.sliding_window
        if ctx.observer is not None:
            spans = [(0, L)]  # diagnostics see the whole call at once: one block over every key
        elif window is None:
            spans = ctx.query_spans(L, query_block(self.num_heads, keys.shape[2], ctx.score_bytes, L))
        else:
            spans = ctx.query_spans(L, sliding_query_block(window))
        # Each evaluation in turn waits for the device: a short pass, whose blocks together hold no
        # more scores than one full block, need not.
        in_turn = window is None and len(spans) > 1 and not global_blocks_together(
            self.num_heads, L, keys.shape[2], ctx.score_bytes
        )
        outputs = []
        for first, stop in spans:
            query_start = ctx.offset + first
            lo = key_start if window is None else max(key_start, query_start - window + 1)
            hi = ctx.offset + stop  # blocks never split a vision block: no key past its last query
            mask = ctx.mask(query_start, stop - first, lo, hi - lo, window, key_bias, keys.dtype)
            k_slice = slice(lo - key_start, hi - key_start)
            block_queries, block_keys = queries[:, :, first:stop], keys[:, :, k_slice]
            if ctx.observer is not None:
                ctx.observer(window is not None, block_queries, block_keys, lo, mask)
            out = mx.fast.scaled_dot_product_attention(
                block_queries, block_keys, values[:, :, k_slice], scale=1.0, mask=mask
            )
            if in_turn:
                # Left lazy, every block's scores are alive at once (the whole pass's, 2.1 GB for the
                # 12B at 32K); evaluated in turn, one block's (at 8K on the CPU: 78 MB against 503 MB,
                # as fast). mx.depends or async_eval still kept about four blocks' (272 MB).
                mx.eval(out)
            outputs.append(out)
        return outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=2)

    def make_cache(self) -> LayerCache:
        if self.shape.is_sliding:
            return SlidingWindowCache(self.sliding_window)
        return SharedKVCache() if self.shape.k_eq_v else KVCache()
