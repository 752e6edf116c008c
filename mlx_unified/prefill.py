"""Prefill: the prompt through the model in bounded passes that never split an image or video block."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx
import numpy as np

from .cache import LayerCache, maybe_quantize
from .emphasis import SpanBias
from .footprint import prefill_sizes
from .kv_quantization import KVQuantization
from .masks import inside_block, unsplit_spans, vision_block_ids
from .model import Model

# progress(done, total): prompt tokens in the cache after each pass, and the prompt's length.
ProgressCallback = Callable[[int, int], None]
# on_snapshot(position, cache): the model's cache right after `position` prompt tokens.
SnapshotCallback = Callable[[int, list[LayerCache]], None]


def prefill_chunks(
    mm_token_type_ids: np.ndarray | None,
    length: int,
    chunk_size: int,
    start: int = 0,
    boundaries: Sequence[int] = (),
) -> list[tuple[int, int]]:
    """Split [start, length) into passes of about chunk_size tokens, never cutting an image/video
    block (its tokens attend to each other both ways, so a block must be seen whole). A pass also
    ends at each of `boundaries` that is not inside a block (where prefix snapshots are taken)."""
    blocks = None if mm_token_type_ids is None else vision_block_ids(np.asarray(mm_token_type_ids)[:1])
    spans: list[tuple[int, int]] = []
    for stop in sorted({b for b in boundaries if start < b < length and not inside_block(blocks, b)} | {length}):
        spans += unsplit_spans(blocks, start, stop, chunk_size)
        start = stop
    return spans


def prefill(
    model: Model,
    inputs: dict[str, Any],
    cache: list[LayerCache],
    chunk_size: int | None = None,
    progress: ProgressCallback | None = None,
    logits_to_keep: int = 1,
    *,
    embeddings: mx.array | None = None,
    key_bias: SpanBias | None = None,
    snapshot_at: Sequence[int] = (),
    on_snapshot: SnapshotCallback | None = None,
    return_hidden: bool = False,
    kv_quantization: KVQuantization | None = None,
) -> mx.array | tuple[mx.array, mx.array]:
    """Run the prompt through the model in bounded-memory chunks; logits of the last positions only
    (with return_hidden, also their hidden states after the final norm, which the drafter reads).

    Starts at the cache's offset (a restored prefix is not run again). `embeddings`: the prompt's
    embeddings when already computed. A chunk ends at each of `snapshot_at`, where
    `on_snapshot(position, cache)` is called. `kv_quantization`: the cache is quantized (in the list)
    before the first pass that starts at or after its `start`, where a chunk ends.

    Passes are at most `chunk_size` tokens (default: `attention_blocks.PREFILL_CHUNK`, shorter when
    the memory left beside the weights and the prompt's KV cache is tight). Attention runs a block of
    queries at a time, sized so that one block's scores fit a quarter of that memory
    (`footprint.prefill_sizes`, `attention_blocks.query_block`).
    """
    input_ids = np.asarray(inputs["input_ids"])
    if embeddings is None:
        embeddings = model.embed_inputs(mx.array(input_ids), inputs)
    mm = inputs.get("mm_token_type_ids")
    mm = None if mm is None else np.asarray(mm)
    length = input_ids.shape[1]
    start = cache[0].offset
    if not 0 <= start < length:
        raise ValueError(
            f"the cache holds {start} positions; the prompt has {length}: nothing left to prefill"
        )
    logits = None
    kv = kv_quantization
    sizes = prefill_sizes(model.config, model.nbytes, length, *(() if kv is None else (kv.bits, kv.group_size)))
    chunk_size = chunk_size or sizes.chunk
    score_bytes = sizes.score_bytes
    boundaries = tuple(snapshot_at) + (() if kv_quantization is None else (kv_quantization.start,))
    for begin, end in prefill_chunks(mm, length, chunk_size, start, boundaries):
        last = end == length
        maybe_quantize(cache, kv_quantization)
        logits = model.forward_embeddings(
            embeddings[:, begin:end],
            cache=cache,
            mm_token_type_ids=None if mm is None else mm[:, begin:end],
            logits_to_keep=logits_to_keep if last else 1,
            key_bias=key_bias,
            score_bytes=score_bytes,
            return_hidden=return_hidden,
        )
        mx.eval(logits, [c.state for c in cache])
        mx.clear_cache()
        if on_snapshot is not None and end in snapshot_at:
            on_snapshot(end, cache)
        if progress is not None:
            progress(end, length)
    return logits
