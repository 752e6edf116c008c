"""One validation of generation parameters (issue 14, item 9): what hung or lied is refused by name,
before any model work; the new sampling fields (stop strings, logprobs, penalties, logit bias) and
thinking/tools through the Python API."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
from scripted_replies import (
    ASK_WEATHER,
    CALL_ARGUMENTS,
    PLAIN_ANSWER,
    PRIME,
    THINKING_ANSWER,
    THOUGHT,
    WEATHER_TOOL,
)

import mlx_unified
from mlx_unified.generation import generate, stop_token_ids, stream_generate
from mlx_unified.generation_params import ContextLengthError, GenerationParams, ParameterError

CONTEXT = 256
pytestmark = pytest.mark.tiny(seed=3, max_position_embeddings=CONTEXT)


REFUSED = [
    ("prefill_chunk_size", -1),
    ("prefill_chunk_size", 0),
    ("max_kv_size", 0),
    ("max_kv_size", 2.5),
    ("max_tokens", 0),
    ("max_tokens", -3),
    ("max_tokens", 2.5),
    ("temperature", -1),
    ("temperature", math.nan),
    ("temperature", math.inf),
    ("top_p", 2),
    ("top_p", -0.5),
    ("top_p", 0),
    ("top_k", -5),
    ("top_k", 10**9),  # above the vocabulary
    ("min_p", 1.5),
    ("repetition_penalty", 0),
    ("presence_penalty", 3),
    ("frequency_penalty", math.nan),
    ("seed", -1),
    ("seed", 2**64),
    ("seed", "7"),
    ("stop", [""]),
    ("stop", [1, 2]),
    ("logit_bias", {-1: 1.0}),
    ("logit_bias", {"5": 500}),
    ("top_logprobs", 3),  # without logprobs
    ("logprobs", "yes"),
]


@pytest.mark.parametrize("name, value", REFUSED)
def test_bad_values_are_refused_by_name_before_any_work(tiny, name, value):
    model, processor = tiny.model, tiny.processor
    with pytest.raises(ParameterError) as refused:
        GenerationParams(**{name: value}).validate(vocab_size=model.config.text.vocab_size)
    assert refused.value.param.startswith(name) and str(refused.value).startswith(name)
    with pytest.raises(ParameterError):  # stream_generate refuses it too, before reading the prompt
        next(stream_generate(model, processor, "Hello", **{name: value}))


def test_good_values_pass_and_are_normalized():
    params = GenerationParams(stop="END", logit_bias={"7": -100, 3: 2.5}, seed=2**64 - 1, top_k=5).validate(100)
    assert params.stop == ("END",) and params.logit_bias == {7: -100.0, 3: 2.5}


def test_a_prompt_longer_than_the_context_is_refused_and_replies_end_at_the_context(tiny):
    model, processor = tiny.model, tiny.processor
    with pytest.raises(ContextLengthError, match=f"context holds {CONTEXT}"):
        next(stream_generate(model, processor, "word " * CONTEXT))
    prompt = {"input_ids": np.ones((1, CONTEXT - 3), np.int32)}
    result = generate(model, processor, prompt, max_tokens=50, logit_bias={1: -100, 2: -100})
    assert result.generation_tokens <= 3 and (result.finish_reason == "length" or result.generation_tokens < 3)


def test_max_kv_size_ends_the_reply_where_the_cache_is_full_and_drops_nothing(tiny):
    model, processor = tiny.model, tiny.processor
    never_stop = {token: -100.0 for token in stop_token_ids(model, processor.tokenizer)}
    prompt = {"input_ids": np.arange(5, 45, dtype=np.int32)[None]}  # 40 tokens, past the window

    def tokens(**cap):
        return [r.token for r in stream_generate(model, processor, prompt, max_tokens=10, logit_bias=never_stop, **cap)]

    full = tokens()
    capped = list(stream_generate(model, processor, prompt, max_tokens=10, logit_bias=never_stop, max_kv_size=46))
    assert len(full) == 10 and [r.token for r in capped] == full[:6] and capped[-1].finish_reason == "length"
    assert tokens(max_kv_size=CONTEXT * 4) == full  # a cap beyond the context changes nothing
    with pytest.raises(ContextLengthError, match="max_kv_size holds 40 positions") as refused:
        tokens(max_kv_size=40)
    assert refused.value.param == "max_kv_size"


def test_stop_strings_end_the_reply_and_are_left_out(tiny):
    model, processor = tiny.model, tiny.processor
    full = generate(model, processor, "Tell me", max_tokens=24)
    assert len(full.text) > 6
    stop = full.text[4:7]
    cut = generate(model, processor, "Tell me", max_tokens=24, stop=[stop])
    assert cut.text == full.text[: full.text.index(stop)] and cut.finish_reason == "stop"


def test_logprobs_are_the_log_softmax_of_the_logits(tiny):
    model, processor = tiny.model, tiny.processor
    inputs = processor([{"role": "user", "content": "Hello"}])
    first = next(stream_generate(model, processor, inputs, logprobs=True, top_logprobs=4))
    logits = model(mx.array(inputs["input_ids"]), logits_to_keep=1)[0, -1].astype(mx.float32)
    expected = np.array(logits - mx.logsumexp(logits))
    assert first.logprob == pytest.approx(float(expected[first.token]), abs=1e-4)
    assert [t for t, _ in first.top_logprobs] == list(np.argsort(-expected)[:4])
    assert [v for _, v in first.top_logprobs] == pytest.approx(sorted(expected, reverse=True)[:4], abs=1e-4)
    assert next(stream_generate(model, processor, inputs)).logprob is None


def test_logit_bias_changes_the_choice(tiny):
    model, processor = tiny.model, tiny.processor
    plain = generate(model, processor, "Hello", max_tokens=1).tokens[0]
    banned = generate(model, processor, "Hello", max_tokens=1, logit_bias={plain: -100}).tokens[0]
    assert banned != plain


def test_penalties_are_mlx_lms_over_the_recent_tokens():
    history = mx.array([3, 3, 5])

    def processed(**penalties):
        out = mx.ones((1, 8))  # fresh each time: mlx-lm's scatter updates may write into their input
        for process in GenerationParams(**penalties).validate().make_logits_processors():
            out = process(history, out)
        return np.array(out[0]).tolist()

    assert processed(presence_penalty=2.0) == [1, 1, 1, -1, 1, -1, 1, 1]
    assert processed(frequency_penalty=0.5) == [1, 1, 1, 0, 1, 0.5, 1, 1]
    assert processed(repetition_penalty=2.0) == [1, 1, 1, 0.5, 1, 0.5, 1, 1]
    assert processed(logit_bias={0: -1.0}) == [0, 1, 1, 1, 1, 1, 1, 1]
    assert processed() == [1] * 8  # nothing asked, nothing changed


def test_thinking_and_tools_through_the_python_api(scripted):
    model, processor = mlx_unified.load(scripted)
    thought = generate(model, processor, PRIME, enable_thinking=True)
    assert (thought.reasoning, thought.content, thought.tool_calls) == (THOUGHT, THINKING_ANSWER, [])
    assert generate(model, processor, PRIME, enable_thinking=False).content == PLAIN_ANSWER
    called = generate(model, processor, ASK_WEATHER, tools=[WEATHER_TOOL])
    (call,) = called.tool_calls
    assert (call.name, call.arguments, called.content, called.finish_reason) == ("get_weather", CALL_ARGUMENTS, "", "stop")
    with pytest.raises(ParameterError, match="enable_thinking"):
        generate(model, processor, processor(PRIME), enable_thinking=True)  # ready-made arrays: no template
