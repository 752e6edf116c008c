"""Attention: how a layer attends, once it has its queries and its new keys and values (`attend`, the
one place that chooses the backend), what one forward call's layers share, and prefill attention by
query blocks.

Decoding (a few new tokens) reads the caches in place through the custom kernels of
`mlx_unified.kernels` when `decode_in_place()`: the global K=V kernel derives keys from the single
cached tensor, the sliding kernel reads the ring buffer without a mask (on the CPU, their references do
the same). Prefill, and decoding on CUDA, use `mx.fast.scaled_dot_product_attention` (every backend has
it), one block of queries at a time over only the keys that block may see: MLX fuses prefill attention
only for head dims up to 128 on Metal, so for this model's 256- and 512-dim heads, as on CUDA and the
CPU, it computes every score of a [queries x keys] product, masked ones included.

A quantized cache (`cache.py`, `kv_quantization`) is read the same ways: decoding through the
quantized variants of the kernels (each element dequantized as it is loaded; off Metal, MLX's
quantized products), prefill by the same query blocks through `kernels.quantized_attention`, which
scores the packed cache with `mx.quantized_matmul` a key block at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from .attention_blocks import PREFILL_SCORE_BYTES, global_blocks_together, query_block, sliding_query_block
from .cache import LayerCache, StoredKV
from .config import RopeSpec
from .emphasis import SpanBias
from .kernels import (
    global_kv_attention,
    kernels_enabled,
    quantized_global_kv_attention,
    quantized_sliding_window_attention,
    sliding_window_attention,
)
from .kernels.quantized_attention import DerivedKeys, Quantized, QuantizedKeys, quantized_attention
from .kernels.rope_tables import rope_fused
from .masks import additive_mask, attention_mask, unsplit_spans

# observer(is_sliding, queries, keys, key_start, mask): see AttentionContext.observer.
AttentionObserver = Callable[[bool, mx.array, mx.array, int, "mx.array | str | None"], None]

# Up to this many new tokens (decoding, speculative verification) use the decode kernels.
DECODE_MAX_TOKENS = 8


def decode_in_place() -> bool:
    """Whether decoding reads the caches in place through `global_kv_attention` and
    `sliding_window_attention`: their Metal kernels, or on the CPU their float32 references, which
    beat MLX's bf16 attention there. Elsewhere (CUDA) MLX's fused attention over the derived keys is
    the faster path."""
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


def attend(
    queries: mx.array,
    keys: mx.array | None,
    values: mx.array,
    cache: LayerCache | None,
    ctx: AttentionContext,
    window: int | None,
    rope: RopeSpec,
    key_weight: mx.array,
) -> mx.array:
    """A layer's attention output [B, H, L, D] for its queries [B, H, L, D] (normed and rotated) and
    this call's new keys and values [B, n_kv, L, D], stored first in `cache` (None: attend to them
    alone). K=V layers (`keys` None) pass their one tensor as `values`: keys are
    rope(key_weight * values). `window`: a sliding layer's, None on global layers.

    Decoding (a few new tokens, no vision block) reads the cache in place through the decode kernels
    where `decode_in_place()`; everything else, and a cache that cannot be read in place, attends by
    query blocks (`prefill_attention`). Float or quantized, the cache's `StoredKV` says."""
    length = queries.shape[2]
    decoding = cache is not None and length <= DECODE_MAX_TOKENS and ctx.block_ids is None and decode_in_place()
    stored = StoredKV(keys, values, ctx.offset, ctx.offset + length) if cache is None else cache.store(keys, values, decoding)
    key_bias = ctx.key_bias if window is None else None  # emphasis acts on global layers only
    if stored.in_place:
        return _decode_in_place(queries, stored, window, rope, key_weight, key_bias)
    return prefill_attention(
        queries, _keys(stored, rope, key_weight), stored.values, ctx, stored.key_start, window, key_bias
    )


def _decode_in_place(
    queries: mx.array, stored: StoredKV, window: int | None, rope: RopeSpec, key_weight: mx.array,
    key_bias: SpanBias | None,
) -> mx.array:  # fmt: skip
    """The decode kernels over a cache's own buffers: the global K=V one derives keys from the single
    tensor; the sliding one reads the ring without a mask."""
    q = stored.quantization
    if stored.keys is None:
        if q is not None:
            return quantized_global_kv_attention(
                queries, stored.values, key_weight, stored.offset, group_size=q.group_size, bits=q.bits,
                rope=rope, span_bias=key_bias,
            )  # fmt: skip
        return global_kv_attention(queries, stored.values, key_weight, stored.offset, rope=rope, span_bias=key_bias)
    if q is not None:
        return quantized_sliding_window_attention(
            queries, stored.keys, stored.values, stored.offset, window, group_size=q.group_size, bits=q.bits
        )
    return sliding_window_attention(queries, stored.keys, stored.values, stored.offset, window)


def _keys(stored: StoredKV, rope: RopeSpec, key_weight: mx.array) -> mx.array | QuantizedKeys | DerivedKeys:
    """The keys prefill attention reads: as stored, or derived on K=V layers; quantized ones as the
    quantized products read them."""
    q = stored.quantization
    if stored.keys is None:
        if q is not None:
            return DerivedKeys(stored.values, key_weight, stored.key_start, rope, q.group_size, q.bits)
        return derived_keys(stored.values, key_weight, stored.key_start, rope)
    return stored.keys if q is None else QuantizedKeys(stored.keys, q.group_size, q.bits)


def derived_keys(shared: mx.array, key_weight: mx.array, start: int, rope: RopeSpec) -> mx.array:
    """The keys of a K=V layer from its one tensor (positions start..): rope(k_norm.weight * v), which
    is the reference's rope(k_norm(raw)) since v = v_norm(raw) and both norms divide by the same RMS."""
    return rope_fused(shared * key_weight.astype(shared.dtype), start, rope)


def prefill_attention(
    queries: mx.array,
    keys: mx.array | QuantizedKeys | DerivedKeys,
    values: mx.array | Quantized,
    ctx: AttentionContext,
    key_start: int,
    window: int | None,
    key_bias: SpanBias | None,
) -> mx.array:
    """Attention of this call's queries [B, H, L, D] over keys/values at absolute positions key_start..
    (the last key is the last query's), one block of queries at a time: each block reads only the keys
    it may see, its sliding `window` or, on global layers (`window` None), the keys up to its last
    query. One product over all queries and keys would compute and then mask away the rest. Blocks are
    sized so that what they mask away stays small (`attention_blocks.sliding_query_block`,
    `attention_blocks.query_block`); global blocks also keep their scores within ctx.score_bytes.

    Keys and values are float arrays (MLX's fused attention), or a quantized cache's: its keys
    (`QuantizedKeys`, or on K=V layers `DerivedKeys`) and values (`mx.quantize`'s triple), read with
    MLX's quantized products (`quantized_attention`)."""
    quantized = not isinstance(keys, mx.array)
    num_keys = keys.length if quantized else keys.shape[2]
    heads, length = queries.shape[1], queries.shape[2]
    if ctx.observer is not None:
        spans = [(0, length)]  # diagnostics see the whole call at once: one block over every key
    elif window is None:
        spans = ctx.query_spans(length, query_block(heads, num_keys, ctx.score_bytes, length))
    else:
        spans = ctx.query_spans(length, sliding_query_block(window))
    # Each evaluation in turn waits for the device: a short pass, whose blocks together hold no
    # more scores than one full block, need not.
    in_turn = window is None and len(spans) > 1 and not global_blocks_together(
        heads, length, num_keys, ctx.score_bytes
    )
    outputs = []
    for first, stop in spans:
        query_start = ctx.offset + first
        lo = key_start if window is None else max(key_start, query_start - window + 1)
        hi = ctx.offset + stop  # blocks never split a vision block: no key past its last query
        mask_dtype = mx.float32 if quantized else keys.dtype
        mask = ctx.mask(query_start, stop - first, lo, hi - lo, window, key_bias, mask_dtype)
        block_queries = queries[:, :, first:stop]
        if quantized:
            block_keys = keys.sliced(lo - key_start, hi - key_start)
            block_values = tuple(v[:, :, lo - key_start : hi - key_start] for v in values)
            if ctx.observer is not None:
                ctx.observer(window is not None, block_queries, block_keys.dense(), lo, mask)
            scores_mask = None if mask is None else additive_mask(mask, query_start, stop - first, lo, hi - lo)
            out = quantized_attention(block_queries, block_keys, block_values, scores_mask, ctx.score_bytes)
        else:
            k_slice = slice(lo - key_start, hi - key_start)
            block_keys = keys[:, :, k_slice]
            if ctx.observer is not None:
                ctx.observer(window is not None, block_queries, block_keys, lo, mask)
            out = mx.fast.scaled_dot_product_attention(
                block_queries, block_keys, values[:, :, k_slice], scale=1.0, mask=mask
            )
        if in_turn:
            # Left lazy, every block's scores are alive at once; evaluated in turn, one block's
            # (mx.depends or async_eval still kept several blocks' alive).
            mx.eval(out)
        outputs.append(out)
    return outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=2)
