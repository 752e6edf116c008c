"""attention_share: segments, shares summing to 1, and outputs untouched by the recording."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from media_files import voiced_bursts

from mlx_unified.diagnostics import SEGMENTS, attention_share, segment_labels

WINDOW = 16
pytestmark = pytest.mark.tiny(seed=5, sliding_window=WINDOW)


def voice_prompt(processor, system="You are a helpful voice assistant. Follow every rule. " * 2):
    return processor(
        [
            {"role": "system", "content": system},
            {
                "role": "user",
                "content": [
                    {"type": "audio", "audio": voiced_bursts(1.0)},
                    {"type": "text", "text": "What was said?"},
                ],
            },
        ]
    )


def test_segments_follow_the_chat_structure(tiny):
    processor = tiny.processor
    inputs = voice_prompt(processor)
    labels = segment_labels(inputs["input_ids"][0], inputs["mm_token_type_ids"][0], processor.tokenizer)
    names = np.array(SEGMENTS)[labels]
    assert (names == "audio").sum() == (inputs["mm_token_type_ids"] == 3).sum() == 25
    assert names[0] == "other" and names[1] == "system"  # <bos>, then the system turn
    text = processor.tokenizer.decode(inputs["input_ids"][0][names == "user_text"].tolist())
    assert "What was said?" in text and "helpful" not in text
    assert "helpful voice assistant" in processor.tokenizer.decode(
        inputs["input_ids"][0][names == "system"].tolist()
    )
    assert names[-1] == "other"  # the model turn's header


def test_shares_sum_to_one_per_layer_head_and_kind(tiny):
    model, processor = tiny.model, tiny.processor
    share = attention_share(
        model, voice_prompt(processor), processor.tokenizer, answer_ids=[300, 301, 302, 303]
    )
    assert share.per_head.shape == (6, 4, len(SEGMENTS))
    np.testing.assert_allclose(share.per_head.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(share.per_layer.sum(-1), 1.0, atol=1e-5)
    kinds = share.by_kind()
    assert set(kinds) == {"sliding", "global"}
    for shares in kinds.values():
        assert abs(sum(shares.values()) - 1.0) < 1e-5 and all(v >= 0 for v in shares.values())
    assert share.segment_tokens["answer"] == 4 and share.segment_tokens["audio"] == 25
    # Sliding layers only see the last 16 positions: the system turn ended long before.
    assert kinds["sliding"]["system"] == 0.0 and kinds["global"]["system"] > 0.0
    assert share.to_dict()["per_layer"][5]["type"] == "global"


def test_recording_leaves_the_logits_bit_identical(tiny):
    model, processor = tiny.model, tiny.processor
    inputs = voice_prompt(processor)
    h = model.embed(
        mx.array(inputs["input_ids"]),
        input_features=inputs["input_features"],
        input_features_mask=inputs["input_features_mask"],
    )
    calls = []

    def observer(is_sliding, queries, keys, key_start, mask):
        calls.append(is_sliding)
        mx.eval(mx.softmax((queries[0] @ mx.repeat(keys[0], 4 // keys.shape[1], 0).swapaxes(-1, -2)), -1))

    plain = model.forward_embeddings(h, mm_token_type_ids=inputs["mm_token_type_ids"])
    watched = model.forward_embeddings(h, mm_token_type_ids=inputs["mm_token_type_ids"], observer=observer)
    assert len(calls) == 6 and calls == [True] * 5 + [False]
    assert np.array_equal(np.array(plain), np.array(watched))


def test_measured_probabilities_match_a_direct_computation(tiny):
    """The last layer's share recomputed here from scratch, with the model's own queries and keys."""
    model, processor = tiny.model, tiny.processor
    inputs = voice_prompt(processor, system="Short.")
    share = attention_share(model, inputs, processor.tokenizer)
    seen = {}

    def grab(is_sliding, queries, keys, key_start, mask):
        seen["q"], seen["k"] = queries, keys

    h = model.embed(
        mx.array(inputs["input_ids"]),
        input_features=inputs["input_features"],
        input_features_mask=inputs["input_features_mask"],
    )
    model.forward_embeddings(h, mm_token_type_ids=inputs["mm_token_type_ids"], observer=grab)
    q = np.array(seen["q"][0, :, -1]).astype(np.float64)  # the last position, every head
    k = np.array(seen["k"][0, 0]).astype(np.float64)  # the one global KV head
    scores = q @ k.T
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    labels = segment_labels(inputs["input_ids"][0], inputs["mm_token_type_ids"][0], processor.tokenizer)
    expected = np.stack([probs[:, labels == i].sum(-1) for i in range(len(SEGMENTS))], -1)
    np.testing.assert_allclose(share.per_head[-1], expected, atol=1e-4)


def test_bad_inputs_are_refused(tiny):
    model, processor = tiny.model, tiny.processor
    with pytest.raises(ValueError, match="too short"):
        attention_share(model, {"input_ids": np.array([[2, 3, 4]])}, processor.tokenizer)
    with pytest.raises(ValueError, match="one prompt"):
        attention_share(model, {"input_ids": np.zeros((2, 20), np.int32)}, processor.tokenizer)
