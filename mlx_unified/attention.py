"""Attention outside the decode kernels: what one forward call's layers share, and prefill attention by
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
from .emphasis import SpanBias
from .kernels import kernels_enabled
from .kernels.quantized_attention import DerivedKeys, Quantized, QuantizedKeys, quantized_attention
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
