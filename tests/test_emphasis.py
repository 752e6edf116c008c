"""Audio emphasis: off is a strict no-op, below 1 it raises the audio's share, validation, placement."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
from logits_log import LogitsLog, run_logged
from media_files import voiced_bursts

from mlx_unified.diagnostics import SEGMENTS, attention_share
from mlx_unified.emphasis import audio_emphasis_bias
from mlx_unified.generation import generate
from mlx_unified.prefix_cache import PrefixCache
from mlx_unified.processing import build_messages

pytestmark = pytest.mark.tiny(seed=7, sliding_window=16)
SYSTEM = "You are a helpful voice assistant. Follow every rule. " * 2


def voice_messages(question="What was said?", clip=None):
    clip = voiced_bursts(1.0) if clip is None else clip
    return build_messages(question, system=SYSTEM, audios=[clip])


def run(model, processor, prompt, **kwargs):
    return run_logged(model, processor, prompt, 6, use_prefix_cache=False, **kwargs)


def test_emphasis_one_changes_nothing_bit_for_bit(tiny):
    model, processor = tiny.model, tiny.processor
    inputs = processor(voice_messages())
    assert (
        audio_emphasis_bias(
            inputs["input_ids"], inputs["mm_token_type_ids"], model.config.audio_token_id, 1.0
        )
        is None
    )
    default, default_logits = run(model, processor, inputs)
    off, off_logits = run(model, processor, inputs, audio_emphasis=1.0)
    assert default.tokens == off.tokens
    assert all(np.array_equal(a, b) for a, b in zip(default_logits, off_logits, strict=True))
    # and both equal a plain forward pass of the model for the first token
    plain = model(
        mx.array(inputs["input_ids"]),
        input_features=inputs["input_features"],
        input_features_mask=inputs["input_features_mask"],
        mm_token_type_ids=inputs["mm_token_type_ids"],
        logits_to_keep=1,
    )
    np.testing.assert_allclose(default_logits[0][0], np.array(plain[0, -1]), atol=1e-5)


def test_emphasis_is_the_audio_span_bias_on_global_layers(tiny):
    model, processor = tiny.model, tiny.processor
    inputs = processor(voice_messages())
    audio = np.nonzero(inputs["mm_token_type_ids"][0] == 3)[0]
    bias = audio_emphasis_bias(
        inputs["input_ids"], inputs["mm_token_type_ids"], model.config.audio_token_id, 0.25
    )
    assert (bias.start, bias.stop) == (audio[0], audio[-1] + 1) and math.isclose(bias.value, math.log(4))
    # without mm_token_type_ids the placeholder ids give the same span
    assert audio_emphasis_bias(inputs["input_ids"], None, model.config.audio_token_id, 0.25) == bias
    text_only = processor(build_messages("Hello", system=SYSTEM))
    assert (
        audio_emphasis_bias(
            text_only["input_ids"], text_only["mm_token_type_ids"], model.config.audio_token_id, 0.5
        )
        is None
    )


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5, float("nan"), "strong", None])
def test_invalid_emphasis_is_refused(tiny, bad):
    model, processor = tiny.model, tiny.processor
    with pytest.raises(ValueError, match=r"audio_emphasis must be a number in \(0, 1\]"):
        generate(model, processor, processor(voice_messages()), max_tokens=1, audio_emphasis=bad)


def test_lower_emphasis_raises_the_audio_share_monotonically(tiny):
    model, processor = tiny.model, tiny.processor
    inputs = processor(voice_messages())
    answer = [300, 301, 302]
    shares = []
    for emphasis in (1.0, 0.7, 0.4, 0.2, 0.05):
        bias = audio_emphasis_bias(
            inputs["input_ids"], inputs["mm_token_type_ids"], model.config.audio_token_id, emphasis
        )
        share = attention_share(model, inputs, processor.tokenizer, answer_ids=answer, key_bias=bias)
        shares.append(share.by_kind())
    global_audio = [s["global"]["audio"] for s in shares]
    assert all(a < b for a, b in zip(global_audio, global_audio[1:], strict=False)), global_audio
    # Sliding layers get no bias (and come before the only global layer of this model): unchanged.
    assert len({round(s["sliding"]["audio"], 7) for s in shares}) == 1
    # The renormalization law, per head of the first global layer, for one query: a' = a / (a + e (1 - a)).
    audio, e = SEGMENTS.index("audio"), 0.2
    bias = audio_emphasis_bias(
        inputs["input_ids"], inputs["mm_token_type_ids"], model.config.audio_token_id, e
    )
    before = attention_share(model, inputs, processor.tokenizer).per_head[-1, :, audio]
    after = attention_share(model, inputs, processor.tokenizer, key_bias=bias).per_head[-1, :, audio]
    np.testing.assert_allclose(after, before / (before + e * (1 - before)), rtol=1e-4, atol=1e-6)


def test_emphasis_changes_the_reply_logits_and_stays_exact_with_the_prefix_cache(tiny):
    model, processor = tiny.model, tiny.processor
    first, second = (
        voice_messages("What was said?"),
        voice_messages("Who spoke?", clip=voiced_bursts(1.0, seed=3)),
    )
    plain, plain_logits = run(model, processor, second, audio_emphasis=1.0)
    emphasized, emphasized_logits = run(model, processor, second, audio_emphasis=0.1)
    assert not np.array_equal(plain_logits[0], emphasized_logits[0])
    store = PrefixCache()
    log = LogitsLog()
    generate(model, processor, first, max_tokens=2, audio_emphasis=0.1, prefix_cache=store)
    cached = generate(
        model,
        processor,
        second,
        max_tokens=6,
        audio_emphasis=0.1,
        prefix_cache=store,
        logits_processors=[log],
    )
    assert cached.cached_tokens > 0  # the system prompt, which ends before the audio
    assert cached.tokens == emphasized.tokens
    np.testing.assert_allclose(log.steps[0], emphasized_logits[0], atol=1e-4)
    # A stored prefix that includes the audio is not reused under another emphasis.
    whole = processor(second)
    extended = {"input_ids": np.concatenate([whole["input_ids"], [[300, 301]]], 1)}
    extended["mm_token_type_ids"] = np.concatenate([whole["mm_token_type_ids"], [[0, 0]]], 1)
    extended.update({k: whole[k] for k in ("input_features", "input_features_mask")})
    again = generate(model, processor, extended, max_tokens=1, audio_emphasis=0.5, prefix_cache=store)
    same = generate(model, processor, extended, max_tokens=1, audio_emphasis=0.1, prefix_cache=store)
    assert again.cached_tokens < whole["input_ids"].shape[1] <= same.cached_tokens


def test_placement_media_first_and_task_reminder(tiny):
    model, processor = tiny.model, tiny.processor
    clip = voiced_bursts(1.0)
    reminder = "Answer only from the recording."
    messages = build_messages("Transcribe this.", system=SYSTEM, audios=[clip], task_reminder=reminder)
    assert [item["type"] for item in messages[-1]["content"]] == ["audio", "text", "text"]
    ids = processor(messages)["input_ids"][0]
    text = processor.tokenizer.decode(ids.tolist())
    assert text.index("<audio|>") < text.index("Transcribe this.") < text.index(reminder)
    text_first = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Transcribe this."},
                {"type": "audio", "audio": clip},
                {"type": "text", "text": reminder},
            ],
        }
    ]
    kept = processor.tokenizer.decode(processor(text_first, media_first=False)["input_ids"][0].tolist())
    assert kept.index("Transcribe this.") < kept.index("<audio|>") < kept.index(reminder)
    moved = processor.tokenizer.decode(processor(text_first)["input_ids"][0].tolist())
    assert moved.index("<audio|>") < moved.index("Transcribe this.")
    result = generate(
        model,
        processor,
        "Transcribe this.",
        system=SYSTEM,
        audios=[clip],
        task_reminder=reminder,
        max_tokens=2,
    )
    assert result.prompt_tokens == len(ids)
