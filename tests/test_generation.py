"""The generation loop: stopping, sampling options, statistics, chunking and cache sizes."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import KVCache

from mlx_unified.attention_blocks import (
    GLOBAL_QUERY_BLOCK,
    MIN_QUERY_BLOCK,
    PREFILL_SCORE_BYTES,
    global_blocks_together,
    query_block,
)
from mlx_unified.cache import SharedKVCache, SlidingWindowCache
from mlx_unified.config import released_config
from mlx_unified.generation import generate, stop_token_ids, stream_generate
from mlx_unified.masks import unsplit_spans
from mlx_unified.prefill import prefill_chunks

pytestmark = pytest.mark.tiny(seed=2)


def prompt(tokenizer, text="Describe the picture"):
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    return {"input_ids": np.array([ids])}


def test_greedy_generation_reports_statistics(tiny):
    model, processor = tiny.model, tiny.processor
    result = generate(model, processor, prompt(processor.tokenizer), max_tokens=12)
    assert result.generation_tokens == len(result.tokens) <= 12
    assert result.prompt_tokens == prompt(processor.tokenizer)["input_ids"].shape[1]
    assert result.prompt_tps > 0 and result.ttft_s > 0 and result.peak_memory_gb > 0
    assert result.finish_reason in ("stop", "length")
    # greedy equals the argmax of a plain forward for the first token
    logits = model(mx.array(prompt(processor.tokenizer)["input_ids"]), logits_to_keep=1)
    assert result.tokens[0] == int(mx.argmax(logits[0, -1]).item())


def test_stops_at_end_of_turn_without_printing_it(tiny):
    model, processor = tiny.model, tiny.processor
    first = generate(model, processor, prompt(processor.tokenizer), max_tokens=3).tokens[0]
    stops = stop_token_ids(model, processor.tokenizer)
    assert processor.tokenizer.convert_tokens_to_ids("<turn|>") in stops and 1 in stops
    # Force the model's first greedy token to be the end-of-turn token through a logits processor.
    turn_end = processor.tokenizer.convert_tokens_to_ids("<turn|>")

    def force_turn_end(tokens, logits):
        return mx.where(mx.arange(logits.shape[-1]) == turn_end, 1e9, logits)

    result = generate(
        model, processor, prompt(processor.tokenizer), max_tokens=10, logits_processors=[force_turn_end]
    )
    assert result.tokens == [turn_end] and result.finish_reason == "stop" and result.text == ""
    assert first != turn_end or result.tokens == [turn_end]


def test_max_tokens_and_streaming_pieces_add_up(tiny):
    model, processor = tiny.model, tiny.processor
    pieces = list(stream_generate(model, processor, prompt(processor.tokenizer), max_tokens=7))
    assert len(pieces) <= 7 and pieces[-1].finish_reason in ("stop", "length")
    assert all(p.finish_reason is None for p in pieces[:-1])
    full = generate(model, processor, prompt(processor.tokenizer), max_tokens=7)
    assert "".join(p.text for p in pieces) == full.text


def test_sampling_is_reproducible_with_a_seed(tiny):
    model, processor = tiny.model, tiny.processor
    kwargs = dict(max_tokens=16, temperature=1.5, top_p=0.95, top_k=50, min_p=0.01, repetition_penalty=1.2)
    a = generate(model, processor, prompt(processor.tokenizer), seed=4, **kwargs).tokens
    b = generate(model, processor, prompt(processor.tokenizer), seed=4, **kwargs).tokens
    c = generate(model, processor, prompt(processor.tokenizer), seed=5, **kwargs).tokens
    assert a == b and a != c


def test_prefill_chunks_never_split_an_image_block():
    types = np.array([[0] * 5 + [1] * 10 + [0] * 3 + [2] * 4 + [0] * 2])
    spans = prefill_chunks(types, types.shape[1], chunk_size=4)
    assert spans[0][0] == 0 and spans[-1][1] == types.shape[1]
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
    for start, _ in spans[1:]:
        assert not (types[0, start - 1] in (1, 2) and types[0, start] == types[0, start - 1])
    assert (5, 15) in spans  # a block longer than the chunk is one chunk
    assert prefill_chunks(None, 10, 4) == [(0, 4), (4, 8), (8, 10)]


def test_prefill_chunks_end_at_snapshot_boundaries_outside_blocks():
    types = np.array([[0] * 5 + [1] * 10 + [0] * 9])
    spans = prefill_chunks(types, 24, chunk_size=8, boundaries=(3, 9, 20))
    assert spans == [(0, 3), (3, 5), (5, 15), (15, 20), (20, 24)]  # 9 is inside the image: passed


def test_query_spans_never_split_a_block_in_any_row():
    blocks = np.array([[-1, 0, 0, 0, -1, -1, -1, -1], [-1, -1, -1, 0, 0, 0, 0, -1]])
    spans = unsplit_spans(blocks, 0, 8, 2)
    assert spans[0][0] == 0 and spans[-1][1] == 8
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
    for _, end in spans[:-1]:
        assert not ((blocks[:, end] >= 0) & (blocks[:, end] == blocks[:, end - 1])).any()
    assert unsplit_spans(None, 3, 10, 4) == [(3, 7), (7, 10)]


def test_global_query_blocks_keep_their_scores_bounded():
    heads = released_config().text.num_attention_heads
    assert query_block(heads, 20000, num_queries=100) == GLOBAL_QUERY_BLOCK  # a turn after a long prefix
    # A 256-token prompt: blocks of 32 compute 1/8 more than its causal triangle (one block: twice it).
    assert query_block(heads, 256, num_queries=256) == 32
    assert query_block(heads, 64, num_queries=64) == MIN_QUERY_BLOCK
    assert query_block(heads, 2048) == GLOBAL_QUERY_BLOCK
    for keys in (8192, 32768, 131072, 262144):
        block = query_block(heads, keys)
        assert 4 * heads * block * keys <= PREFILL_SCORE_BYTES or block == MIN_QUERY_BLOCK
    assert query_block(heads, 32768, 1 << 30) == GLOBAL_QUERY_BLOCK  # a larger budget, full blocks
    assert query_block(heads, 10**7) == MIN_QUERY_BLOCK


def test_only_short_passes_leave_global_blocks_to_evaluate_together():
    heads = released_config().text.num_attention_heads
    assert global_blocks_together(heads, 256, 256, PREFILL_SCORE_BYTES)  # no more than one full block
    assert global_blocks_together(heads, 100, 20000, PREFILL_SCORE_BYTES)  # a turn after a long prefix
    assert not global_blocks_together(heads, 2048, 8192, 1 << 40)  # a whole pass: in turn, whatever the bound
    assert not global_blocks_together(heads, 256, 256, 1)  # a tiny bound: in turn


def test_sliding_cache_never_holds_more_than_the_window():
    cache = SlidingWindowCache(window=8)
    for length in (5, 13, 1, 1, 30):
        cache.update_and_fetch(mx.zeros((1, 2, length, 4)), mx.zeros((1, 2, length, 4)))
        assert cache.keys.shape[2] <= 8
    assert cache.offset == 50 and cache.size() == 8


def test_global_cache_holds_half_of_a_key_value_cache():
    shared, plain = SharedKVCache(), KVCache()
    x = mx.ones((1, 1, 1000, 512), dtype=mx.bfloat16)
    shared.update_and_fetch(x)
    plain.update_and_fetch(x, x)
    assert shared.nbytes * 2 == plain.nbytes
