"""The Python API in the peers' terms (issue 16): a prompt as token ids or as text already rendered by the
chat template is taken as it is, never templated twice; the results carry mlx-lm's `peak_memory` and
per-token `logprobs`; arguments that would be read wrongly are refused by name (issue 14, item 9)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from media_files import write_image

import mlx_unified
from mlx_unified.checkpoint import ModelLoadError
from mlx_unified.generation import generate, stream_generate
from mlx_unified.generation_params import ParameterError
from mlx_unified.processing import MediaError

pytestmark = pytest.mark.tiny(seed=4)
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    return write_image(tmp_path_factory.mktemp("prompts") / "picture.png")


def reply(tiny, prompt, **kwargs):
    return generate(tiny.model, tiny.processor, prompt, max_tokens=10, use_prefix_cache=False, **kwargs)


def test_token_ids_are_the_whole_prompt(tiny):
    expected = reply(tiny, MESSAGES)
    ids = tiny.processor(MESSAGES)["input_ids"][0]
    for form in (ids.tolist(), tuple(ids.tolist()), ids, ids[None], mx.array(ids)):
        result = reply(tiny, form)
        assert (result.tokens, result.prompt_tokens) == (expected.tokens, expected.prompt_tokens)


def test_a_templated_prompt_is_not_templated_again(tiny, picture):
    messages = [{"role": "user", "content": [{"type": "image", "image": str(picture)}, {"type": "text", "text": "What?"}]}]
    for chat in (MESSAGES, messages):
        expected = reply(tiny, chat)
        text = tiny.processor.apply_chat_template(chat)
        assert text.startswith("<bos><|turn>")
        images = [str(picture)] if chat is messages else []
        result = reply(tiny, text, templated=True, images=images)
        assert (result.tokens, result.prompt_tokens) == (expected.tokens, expected.prompt_tokens)
    # The same text as the user's text is templated again: one user turn holding it, markers as text.
    text = tiny.processor.apply_chat_template(MESSAGES)
    assert reply(tiny, text).prompt_tokens > reply(tiny, text, templated=True).prompt_tokens


@pytest.mark.parametrize(
    "prompt, kwargs, error, name",
    [
        ([2, 3], {"system": "Be brief."}, ParameterError, "system"),
        ([2, 3], {"images": ["x.png"]}, ParameterError, "images"),
        ([2, 3], {"enable_thinking": True}, ParameterError, "enable_thinking"),
        ([2, 10**7], {}, ParameterError, "prompt"),
        ([2, -1], {}, ParameterError, "prompt"),
        (np.zeros((2, 3), np.int32), {}, ParameterError, "prompt"),
        (np.array([1.5, 2.0]), {}, ParameterError, "prompt"),
        ("<bos><|turn>user\nhi<turn|>\n", {"templated": True, "task_reminder": "Answer."}, ParameterError, "task_reminder"),
        ("<bos><|turn>user\n<|image|><turn|>\n", {"templated": True}, MediaError, None),
        (MESSAGES, {"templated": True}, ParameterError, "templated"),
        ("Look.", {"images": "photo.png"}, ParameterError, "images"),  # one path, not a list of them
        ("Listen.", {"audios": np.zeros(16000, np.float32)}, ParameterError, "audios"),
    ],
)
def test_prompts_that_would_be_misread_are_refused_by_name(tiny, prompt, kwargs, error, name):
    with pytest.raises(error) as refused:
        next(stream_generate(tiny.model, tiny.processor, prompt, **kwargs))
    if name is not None:
        assert refused.value.param == name


def test_token_ids_with_a_media_placeholder_and_no_media_are_refused(tiny):
    image_token = tiny.processor.token_ids["image"]
    with pytest.raises(MediaError, match="placeholder"):
        next(stream_generate(tiny.model, tiny.processor, [2, image_token, 3]))


def test_results_carry_the_peers_field_names(tiny):
    model, processor = tiny.model, tiny.processor
    inputs = processor(MESSAGES)
    logits = model(mx.array(inputs["input_ids"]), logits_to_keep=1)[0, -1].astype(mx.float32)
    expected = np.array(logits - mx.logsumexp(logits))
    first = next(stream_generate(model, processor, inputs, logprobs=True))
    assert first.logprobs.shape == (model.config.text.vocab_size,)  # mlx-lm's GenerationResponse.logprobs
    # Prefill and the plain forward order their float32 sums differently: equal to about 1e-6 of ~7.
    np.testing.assert_allclose(np.array(first.logprobs.astype(mx.float32)), expected, atol=1e-4)
    assert first.logprob == pytest.approx(float(expected[first.token]), abs=1e-4)
    assert first.peak_memory == first.peak_memory_gb > 0
    result = generate(model, processor, inputs, max_tokens=4)
    assert result.peak_memory == result.peak_memory_gb > 0
    sampled = next(stream_generate(model, processor, inputs, temperature=0.8, seed=1))
    assert sampled.logprobs.shape == (model.config.text.vocab_size,) and sampled.logprob is None


def test_an_empty_model_name_is_refused_not_read_as_the_current_folder(tiny, monkeypatch):
    monkeypatch.chdir(tiny.path)  # a checkpoint folder: Path("") would load it
    with pytest.raises(ModelLoadError, match="empty name"):
        mlx_unified.load("")
