"""Attention masks: causal, sliding window, and the bidirectional image/video block overlay."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .config import TOKEN_TYPES
from .emphasis import SpanBias


def vision_block_ids(mm_token_type_ids: np.ndarray) -> np.ndarray:
    """Number each contiguous run of image/video tokens (0, 1, ...); text and audio get -1.

    Each run is one block whose tokens see each other in both directions (the reference's
    `get_block_sequence_ids_for_mask`).
    """
    types = np.asarray(mm_token_type_ids)
    is_vision = (types == TOKEN_TYPES["image"]) | (types == TOKEN_TYPES["video"])
    prev = np.zeros_like(is_vision)
    prev[..., 1:] = is_vision[..., :-1]
    starts = is_vision & ~prev
    ids = np.cumsum(starts, axis=-1) - 1
    return np.where(is_vision, ids, -1)


def _rows(block_ids: np.ndarray) -> np.ndarray:
    block_ids = np.asarray(block_ids)
    return block_ids.reshape(-1, block_ids.shape[-1])


def _block_through(blocks: np.ndarray, position: int) -> int | None:
    """The row of blocks [B, L] whose vision block runs through `position` (goes on from position - 1)."""
    if not 0 < position < blocks.shape[1]:
        return None
    inside = (blocks[:, position] >= 0) & (blocks[:, position] == blocks[:, position - 1])
    return int(np.argmax(inside)) if inside.any() else None


def _block_end(blocks: np.ndarray, row: int, position: int) -> int:
    """One past the last position of the block that holds `position` in `row`."""
    return int(blocks.shape[1] - np.argmax(blocks[row][::-1] == blocks[row, position]))


def inside_block(block_ids: np.ndarray | None, position: int) -> bool:
    """Whether cutting the sequence before `position` would split a vision block (in any row)."""
    return block_ids is not None and _block_through(_rows(block_ids), position) is not None


def unsplit_spans(block_ids: np.ndarray | None, start: int, stop: int, size: int) -> list[tuple[int, int]]:
    """Split [start, stop) into consecutive spans of about `size` positions that never cut a vision
    block (in any row of block_ids [B, L]): a span that would end inside a block ends before it, or
    after it when the block starts the span (so a block longer than `size` is one span)."""
    blocks = None if block_ids is None else _rows(block_ids)
    spans = []
    while start < stop:
        end = min(start + size, stop)
        row = None if blocks is None else _block_through(blocks, end)
        if row is not None:
            first = int(np.argmax(blocks[row] == blocks[row, end]))
            end = first if first > start else _block_end(blocks, row, end)
            # that end may fall inside another row's block: take that one whole too
            while (row := _block_through(blocks, end)) is not None:
                end = _block_end(blocks, row, end)
        spans.append((start, end))
        start = end
    return spans


def _allowed(
    query_start: int,
    num_queries: int,
    key_start: int,
    num_keys: int,
    sliding_window: int | None,
    block_ids: np.ndarray | None,
) -> mx.array:
    """Boolean [Lq, Lk] (or [B, 1, Lq, Lk] with vision blocks): True where a query may attend a key.

    Built with MLX ops, so the host builds no mask itself: on a GPU a numpy mask took longer than the
    layer's own work."""
    q_pos = mx.arange(query_start, query_start + num_queries)[:, None]
    k_pos = mx.arange(key_start, key_start + num_keys)[None, :]
    allowed = k_pos <= q_pos
    if sliding_window is not None:
        allowed = allowed & (k_pos > q_pos - sliding_window)
    if block_ids is not None and (np.asarray(block_ids) >= 0).any():
        # As the reference: the block overlay is OR-ed last, so a block longer than the window
        # still sees all of itself on sliding layers. Keys before query_start are in no block.
        queries = np.asarray(block_ids)  # [B, Lq]
        keys = np.full((queries.shape[0], num_keys), -1)
        own = query_start - key_start
        keys[:, own:] = queries[:, : num_keys - own]
        q_blocks, k_blocks = mx.array(queries)[:, :, None], mx.array(keys)[:, None, :]
        allowed = (allowed[None] | ((q_blocks == k_blocks) & (q_blocks >= 0)))[:, None]
    return allowed


def attention_mask(
    query_start: int,
    num_queries: int,
    key_start: int,
    num_keys: int,
    sliding_window: int | None,
    block_ids: np.ndarray | None,
    key_bias: SpanBias | None = None,
    dtype: mx.Dtype = mx.float32,
) -> mx.array | str | None:
    """The mask for queries at absolute positions query_start.. over keys at key_start..: boolean
    [.., num_queries, num_keys] (True = attend), or "causal"/None when MLX's built-in handling is exact.

    block_ids: [B, num_queries] vision block ids of the queries (-1 outside blocks); keys before
    query_start never share a block with a query, because prefill never splits a block.
    key_bias: an additive score bias on a key span (audio emphasis); the mask is then additive, in
    `dtype` (the fused attention requires a mask that promotes to its output type).
    """
    if key_bias is None:
        window_binds = sliding_window is not None and (
            query_start + num_queries - 1 - sliding_window >= key_start
        )
        has_blocks = block_ids is not None and bool((np.asarray(block_ids) >= 0).any())
        if num_queries == 1 and not window_binds:
            return None
        if not window_binds and not has_blocks and key_start + num_keys == query_start + num_queries:
            return "causal"
    allowed = _allowed(query_start, num_queries, key_start, num_keys, sliding_window, block_ids)
    if key_bias is None:
        return allowed
    k_pos = mx.arange(key_start, key_start + num_keys)
    bias = mx.where((k_pos >= key_bias.start) & (k_pos < key_bias.stop), key_bias.value, 0.0)
    return mx.where(allowed, bias, -mx.inf).astype(dtype)


def additive_mask(
    mask: mx.array | str | None, query_start: int, num_queries: int, key_start: int, num_keys: int
) -> mx.array:
    """Any mask `attention_mask` returns, as the float32 scores to add ([Lk] when there is none)."""
    if mask is None:
        return mx.zeros((num_keys,))
    if isinstance(mask, str):
        mask = _allowed(query_start, num_queries, key_start, num_keys, None, None)
    if mask.dtype == mx.bool_:
        return mx.where(mask, 0.0, -mx.inf)
    return mask.astype(mx.float32)
