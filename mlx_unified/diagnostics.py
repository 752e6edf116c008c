"""Where the answer looks: the share of attention each prompt segment receives from the answer positions.

`attention_share` runs the model as generation does (chunked prefill with a cache) and, on the last
chunk, hands every layer's queries, keys and mask to an observer that recomputes the attention
probabilities in float32 in a side path. The model's outputs are untouched (the observer only reads).
Keys are grouped by segment from the chat structure: the system turn, the user turns' text, audio,
image and video soft tokens, the answer itself, and everything else (turn markers of model turns,
earlier replies, `<bos>`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from .attention import DECODE_MAX_TOKENS
from .config import TOKEN_TYPES
from .emphasis import SpanBias
from .masks import additive_mask, vision_block_ids
from .model import Model
from .prefill import prefill
from .processing import TURN_START

SEGMENTS = ("system", "user_text", "audio", "image", "video", "answer", "other")


@dataclass
class AttentionShare:
    """Attention mass per segment, averaged over the answer positions.

    per_head[layer, head, segment]: for each layer and query head, the mean over answer positions of
    the probability mass on the segment's keys; it sums to 1 over segments.
    """

    segments: tuple[str, ...]
    layer_types: list[str]  # "sliding" or "global" per layer
    per_head: np.ndarray  # [layers, heads, segments]
    segment_tokens: dict[str, int]  # how many prompt/answer tokens each segment holds
    query_positions: tuple[int, int]  # [start, stop) of the positions whose attention is measured

    @property
    def per_layer(self) -> np.ndarray:
        """[layers, segments]: mean over heads."""
        return self.per_head.mean(axis=1)

    def by_kind(self) -> dict[str, dict[str, float]]:
        """{"sliding"|"global": {segment: share}}: mean over the layers (and heads) of each kind."""
        kinds: dict[str, dict[str, float]] = {}
        for kind in ("sliding", "global"):
            rows = [i for i, t in enumerate(self.layer_types) if t == kind]
            if rows:
                mean = self.per_layer[rows].mean(axis=0)
                kinds[kind] = {name: float(v) for name, v in zip(self.segments, mean, strict=True)}
        return kinds

    def to_dict(self) -> dict[str, Any]:
        return {
            "segments": list(self.segments),
            "segment_tokens": self.segment_tokens,
            "query_positions": list(self.query_positions),
            "by_kind": self.by_kind(),
            "per_layer": [
                {"layer": i, "type": t, **{s: float(v) for s, v in zip(self.segments, row, strict=True)}}
                for i, (t, row) in enumerate(zip(self.layer_types, self.per_layer, strict=True))
            ],
        }


def segment_labels(
    input_ids: Sequence[int] | np.ndarray,
    mm_token_type_ids: Sequence[int] | np.ndarray | None,
    tokenizer: Any,
    answer_start: int | None = None,
) -> np.ndarray:
    """Index into SEGMENTS for every position of one sequence (positions from `answer_start` on are
    the answer). A turn runs from its `<|turn>` to the next one; its role is read after the marker."""
    ids = np.asarray(input_ids).reshape(-1)
    types = np.zeros_like(ids) if mm_token_type_ids is None else np.asarray(mm_token_type_ids).reshape(-1)
    if len(types) != len(ids):
        raise ValueError(f"mm_token_type_ids has {len(types)} entries for {len(ids)} input ids")
    index = {name: i for i, name in enumerate(SEGMENTS)}
    labels = np.full(len(ids), index["other"], dtype=np.int64)
    turn_start = tokenizer.convert_tokens_to_ids(TURN_START)
    starts = list(np.nonzero(ids == turn_start)[0]) + [len(ids)]
    for begin, end in zip(starts[:-1], starts[1:], strict=True):
        role = tokenizer.decode(ids[begin + 1 : begin + 4].tolist()).lstrip()
        if role.startswith("system"):
            labels[begin:end] = index["system"]
        elif role.startswith("user"):
            turn = types[begin:end]
            labels[begin:end] = index["user_text"]
            for name in ("image", "video", "audio"):
                labels[begin:end][turn == TOKEN_TYPES[name]] = index[name]
    if answer_start is not None:
        labels[answer_start:] = index["answer"]
    return labels


class _Recorder:
    """Observer: per layer, the mean (over the measured queries) attention mass on each segment."""

    def __init__(self, labels: np.ndarray, query_rows: slice, query_start: int) -> None:
        self.one_hot = mx.array(np.eye(len(SEGMENTS), dtype=np.float32)[labels])
        self.rows = query_rows
        self.query_start = query_start
        self.layers: list[tuple[bool, mx.array]] = []

    def __call__(
        self, is_sliding: bool, queries: mx.array, keys: mx.array, key_start: int, mask: Any
    ) -> None:
        heads, n_kv = queries.shape[1], keys.shape[1]
        q = queries[0, :, self.rows].astype(mx.float32)  # [H, R, D]
        k = mx.repeat(keys[0].astype(mx.float32), heads // n_kv, axis=0)  # [H, Lk, D]
        scores = q @ k.swapaxes(-1, -2) + self._additive(mask, queries.shape[2], key_start, k.shape[1])
        probs = mx.softmax(scores, axis=-1)  # [H, R, Lk]
        mass = probs @ self.one_hot[key_start : key_start + k.shape[1]]  # [H, R, segments]
        share = mass.mean(axis=1)
        mx.eval(share)
        self.layers.append((is_sliding, share))

    def _additive(self, mask: Any, num_queries: int, key_start: int, num_keys: int) -> mx.array:
        """The layer's mask for the measured rows, as an additive float [.., R, Lk] (or [Lk])."""
        mask = additive_mask(mask, self.query_start, num_queries, key_start, num_keys)
        if mask.ndim == 1:
            return mask
        while mask.ndim > 2:  # [B, 1, Lq, Lk]: one batch row, shared by the heads
            mask = mask[0]
        return mask[self.rows]


def attention_share(
    model: Model,
    inputs: dict[str, Any],
    tokenizer: Any,
    *,
    answer_ids: Sequence[int] = (),
    key_bias: SpanBias | None = None,
    chunk_size: int = 512,
) -> AttentionShare:
    """Share of attention mass each prompt segment receives from the answer positions, per layer and
    head, for one prompt (`inputs`: the processor's output, batch 1).

    answer_ids: the answer's tokens (e.g. a generated reply). The measured positions are those whose
    outputs are the answer: the last prompt position and the answer tokens but the last. With no
    answer, only the last prompt position (the one that predicts the first answer token).
    key_bias: the global-layer key bias the model runs with (e.g. `audio_emphasis_bias(...)`); the
    measured probabilities include it.
    """
    prompt_ids = np.asarray(inputs["input_ids"])
    if prompt_ids.ndim != 2 or prompt_ids.shape[0] != 1:
        raise ValueError(f"attention_share takes one prompt (input_ids [1, L]), got shape {prompt_ids.shape}")
    answer = np.asarray(list(answer_ids), dtype=prompt_ids.dtype).reshape(1, -1)
    ids = np.concatenate([prompt_ids, answer[:, :-1]], axis=1)  # the last answer token is never an input
    prompt_len, total = prompt_ids.shape[1], ids.shape[1]
    if total <= DECODE_MAX_TOKENS:
        raise ValueError(f"prompt too short to measure: {total} tokens, need more than {DECODE_MAX_TOKENS}")
    mm = inputs.get("mm_token_type_ids")
    mm = np.zeros_like(prompt_ids) if mm is None else np.asarray(mm).reshape(1, -1)
    mm = np.concatenate([mm, np.zeros_like(answer[:, :-1])], axis=1)
    h = model.embed_inputs(mx.array(ids), inputs)

    query_start = prompt_len - 1
    # The measured chunk holds more than DECODE_MAX_TOKENS positions so that every layer takes the
    # prefill path (the one with explicit keys) and never starts inside an image/video block.
    start = min(query_start, total - DECODE_MAX_TOKENS - 1)
    blocks = vision_block_ids(mm)[0]
    while start > 0 and blocks[start] >= 0 and blocks[start] == blocks[start - 1]:
        start -= 1
    cache = model.make_cache()
    if start > 0:
        head = {"input_ids": ids[:, :start], "mm_token_type_ids": mm[:, :start]}
        prefill(model, head, cache, chunk_size, embeddings=h[:, :start], key_bias=key_bias)

    labels = segment_labels(ids[0], mm[0], tokenizer, answer_start=prompt_len)
    recorder = _Recorder(labels, slice(query_start - start, total - start), start)
    model.forward_embeddings(
        h[:, start:],
        cache=cache,
        mm_token_type_ids=mm[:, start:],
        logits_to_keep=1,
        key_bias=key_bias,
        observer=recorder,
    )
    if len(recorder.layers) != len(model.layer_types):
        raise RuntimeError(f"recorded {len(recorder.layers)} layers of {len(model.layer_types)}")
    per_head = np.stack([np.asarray(share) for _, share in recorder.layers])
    counts = np.bincount(labels, minlength=len(SEGMENTS))
    if len(answer_ids):
        counts[SEGMENTS.index("answer")] += 1  # the last answer token, never an input
    return AttentionShare(
        segments=SEGMENTS,
        layer_types=["sliding" if sliding else "global" for sliding, _ in recorder.layers],
        per_head=per_head,
        segment_tokens={name: int(c) for name, c in zip(SEGMENTS, counts, strict=True)},
        query_positions=(query_start, total),
    )
