"""`mlx-unified-server` as a real process, driven by the official `openai` client: chat with every
media kind (streamed and not), tools, thinking, JSON output, sampling fields, transcription of a long
recording, and every refusal in OpenAI's error shape with the server still serving after it."""

from __future__ import annotations

import base64
import json

import httpx
import openai
import pytest
from media_files import write_corrupt, write_image, write_video, write_wav
from scripted_replies import (
    ASK_WEATHER,
    CALL_ARGUMENTS,
    CONTEXT_TOKENS,
    PLAIN_ANSWER,
    PRIME,
    THINKING_ANSWER,
    THOUGHT,
    TOOL_RESULT,
    WEATHER_ANSWER,
    WEATHER_TOOL,
)
from speech import long_speech_file

from mlx_unified.generation import generate, stream_generate
from mlx_unified.loading import load
from mlx_unified.processing import load_audio, run_long_audio, user_turn
from mlx_unified.reply_parser import parse_reply
from mlx_unified.server.transcription import instruction
from mlx_unified.testing.server_process import ServerProcess

BODY_LIMIT_MB = 4  # above the 75 s recording (2.4 MB)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("server-media")
    outside = tmp_path_factory.mktemp("not-served")
    return {
        "root": folder,
        "image": write_image(folder / "picture.png"),
        "audio": write_wav(folder / "speech.wav"),
        "video": write_video(folder / "clip.mp4"),
        "corrupt": write_corrupt(folder / "broken.wav"),
        "outside": write_image(outside / "secret.png"),
    }


@pytest.fixture(scope="module")
def server(scripted, media, tmp_path_factory):
    flags = ("--media-root", str(media["root"]), "--max-request-mb", str(BODY_LIMIT_MB))
    folder = tmp_path_factory.mktemp("server")
    with ServerProcess(scripted, *flags, cache_dir=folder / "cache", log=folder / "server.log") as running:
        yield running


@pytest.fixture(scope="module")
def local(scripted):
    """The same checkpoint in this process, for answers to compare with."""
    return load(scripted)


def data_url(path, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def ask(server, messages, **fields):
    return server.client().chat.completions.create(model=server.name, messages=messages, **fields)


def streamed(server, messages, **fields) -> tuple[dict, list]:
    """Joined deltas of a streamed reply ({"content", "reasoning_content", "tool_calls", "finish_reason",
    "usage"}) and the chunks."""
    stream = ask(server, messages, stream=True, stream_options={"include_usage": True}, **fields)
    chunks = list(stream)
    joined = {"content": "", "reasoning_content": "", "tool_calls": [], "finish_reason": None, "usage": None}
    for chunk in chunks:
        if chunk.usage is not None:
            joined["usage"] = chunk.usage
        for choice in chunk.choices:
            delta = choice.delta
            joined["content"] += delta.content or ""
            joined["reasoning_content"] += getattr(delta, "reasoning_content", None) or ""
            joined["tool_calls"] += delta.tool_calls or []
            joined["finish_reason"] = choice.finish_reason or joined["finish_reason"]
    return joined, chunks


def user_with(part: dict, text: str = "Describe this.") -> list[dict]:
    return [{"role": "user", "content": [part, {"type": "text", "text": text}]}]


def test_models_lists_the_served_model(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [server.name]
    assert server.client().models.retrieve(server.name).id == server.name


@pytest.mark.parametrize("kind", ["text", "image", "local image", "wav", "video"])
def test_chat_streamed_and_not_with_each_media(server, media, kind):
    parts = {
        "image": {"type": "image_url", "image_url": {"url": data_url(media["image"], "image/png")}},
        "local image": {"type": "image_url", "image_url": {"url": f"file://{media['image']}"}},
        "wav": {
            "type": "input_audio",
            "input_audio": {"data": base64.b64encode(media["audio"].read_bytes()).decode(), "format": "wav"},
        },
        "video": {"type": "video_url", "video_url": {"url": data_url(media["video"], "video/mp4")}},
    }
    messages = [{"role": "user", "content": "Hello"}] if kind == "text" else user_with(parts[kind])
    plain = ask(server, messages, max_tokens=8)
    choice = plain.choices[0]
    assert choice.finish_reason in ("stop", "length") and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert plain.usage.completion_tokens <= 8 and plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens
    if kind != "text":
        text_only = ask(server, user_with({"type": "text", "text": ""}), max_tokens=1).usage.prompt_tokens
        assert plain.usage.prompt_tokens > text_only + 5  # the media's soft tokens are in the prompt
    joined, chunks = streamed(server, messages, max_tokens=8)
    assert joined["content"] == choice.message.content  # greedy: the same reply both ways
    assert joined["finish_reason"] == choice.finish_reason
    assert joined["usage"].completion_tokens == plain.usage.completion_tokens
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices == []


def test_greedy_output_through_the_server_equals_generate(server, local):
    model, processor = local
    messages = [
        {"role": "system", "content": "You answer in one sentence."},
        {"role": "user", "content": "Describe the picture of a cat on a red chair."},
    ]
    expected = generate(model, processor, messages, max_tokens=24, use_prefix_cache=False)
    reply = ask(server, messages, max_tokens=24, temperature=0)
    assert reply.choices[0].message.content == expected.content
    assert reply.usage.completion_tokens == expected.generation_tokens
    assert reply.usage.prompt_tokens == expected.prompt_tokens


def test_tool_call_round_trip(server):
    first = ask(server, ASK_WEATHER, tools=[WEATHER_TOOL])
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == CALL_ARGUMENTS
    history = [
        *ASK_WEATHER,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": TOOL_RESULT},
    ]
    second = ask(server, history, tools=[WEATHER_TOOL])
    assert second.choices[0].message.content == WEATHER_ANSWER and second.choices[0].finish_reason == "stop"
    assert second.usage.prompt_tokens_details.cached_tokens > 0  # the tools' system turn came from the prefix cache
    joined, _ = streamed(server, ASK_WEATHER, tools=[WEATHER_TOOL])
    (delta,) = joined["tool_calls"]
    assert delta.index == 0 and delta.function.name == "get_weather"
    assert json.loads(delta.function.arguments) == CALL_ARGUMENTS and joined["finish_reason"] == "tool_calls"
    # tool_choice "none": the tools are left out of the prompt, so the model does not call them.
    unused = ask(server, ASK_WEATHER, tools=[WEATHER_TOOL], tool_choice="none", max_tokens=12)
    assert not unused.choices[0].message.tool_calls


def test_thinking_on_and_off(server):
    on = ask(server, PRIME, reasoning_effort="high").choices[0].message
    assert on.reasoning_content == THOUGHT and on.content == THINKING_ANSWER
    on_too = ask(server, PRIME, extra_body={"chat_template_kwargs": {"enable_thinking": True}}).choices[0].message
    assert (on_too.reasoning_content, on_too.content) == (THOUGHT, THINKING_ANSWER)
    for off in (
        ask(server, PRIME, extra_body={"chat_template_kwargs": {"enable_thinking": False}}),
        ask(server, PRIME, reasoning_effort="none"),
        ask(server, PRIME),
    ):
        message = off.choices[0].message
        assert message.content == PLAIN_ANSWER and getattr(message, "reasoning_content", None) is None
    joined, chunks = streamed(server, PRIME, reasoning_effort="medium")
    assert joined["reasoning_content"] == THOUGHT and joined["content"] == THINKING_ANSWER
    assert not any(THOUGHT[:10] in (c.choices[0].delta.content or "") for c in chunks if c.choices)


def test_json_schema_output(server):
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}, "count": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["answer", "count"],
        "additionalProperties": False,
    }
    for thinking in ("none", "high"):
        reply = ask(
            server,
            PRIME,
            max_tokens=64,
            reasoning_effort=thinking,
            response_format={"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema}},
        )
        value = json.loads(reply.choices[0].message.content)
        assert set(value) == {"answer", "count"} and value["answer"] in ("yes", "no") and value["count"] in range(10)
        assert reply.choices[0].finish_reason == "stop"
    # Greedy, this checkpoint closes the object within the limit: the reply is always checked.
    anything = ask(server, PRIME, max_tokens=64, response_format={"type": "json_object"}).choices[0]
    assert anything.finish_reason == "stop" and isinstance(json.loads(anything.message.content), dict)


def test_stop_seed_penalties_and_logprobs(server):
    full = ask(server, PRIME, reasoning_effort="high").choices[0].message.content
    cut = ask(server, PRIME, reasoning_effort="high", stop=[" is"]).choices[0]
    assert cut.message.content == full.split(" is")[0] and cut.finish_reason == "stop"
    sampled = [
        ask(server, [{"role": "user", "content": "Tell a story."}], temperature=1.5, seed=seed, max_tokens=16)
        .choices[0]
        .message.content
        for seed in (7, 7, 8)
    ]
    assert sampled[0] == sampled[1] != sampled[2]
    penalized = ask(
        server, PRIME, max_tokens=8, presence_penalty=2.0, frequency_penalty=2.0, extra_body={"repetition_penalty": 1.3}
    )
    assert penalized.choices[0].finish_reason in ("stop", "length")
    reply = ask(server, PRIME, logprobs=True, top_logprobs=3).choices[0]
    entries = reply.logprobs.content
    assert "".join(e.token for e in entries) == reply.message.content  # every answer token, no stop token
    for entry in entries:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob
        assert entry.top_logprobs[0].token == entry.token  # greedy: the likeliest token was taken
        assert bytes(entry.bytes).decode() == entry.token


def openai_error(response: httpx.Response) -> dict:
    assert "Traceback" not in response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_every_refusal_is_an_openai_error_and_the_server_keeps_serving(server, media):
    url = f"{server.base_url}/v1/chat/completions"
    auth = {"Authorization": f"Bearer {server.api_key}"}
    hello = {"model": server.name, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}

    def post(body=None, content=None, headers=auth, path=url):
        return httpx.post(path, json=body, content=content, headers=headers, timeout=120)

    def with_part(part):
        return {**hello, "messages": user_with(part)}

    audio = base64.b64encode(media["corrupt"].read_bytes()).decode()
    cases = {
        "bad json": (post(content=b"{not json", headers={**auth, "Content-Type": "application/json"}), 400, "invalid_json"),
        "unknown model": (post({**hello, "model": "gpt-4o"}), 404, "model_not_found"),
        "oversize body": (post({**hello, "padding": "x" * (BODY_LIMIT_MB << 20)}), 413, "request_too_large"),
        "bad base64": (post(with_part({"type": "input_audio", "input_audio": {"data": "@@@", "format": "wav"}})), 400, "invalid_base64"),
        "corrupt audio": (post(with_part({"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}})), 400, "invalid_media"),
        "too many tokens": (post({**hello, "messages": [{"role": "user", "content": "word " * CONTEXT_TOKENS}]}), 400, "context_length_exceeded"),
        "max_tokens 0": (post({**hello, "max_tokens": 0}), 400, "invalid_value"),
        "negative temperature": (post({**hello, "temperature": -1}), 400, "invalid_value"),
        "top_p 2": (post({**hello, "top_p": 2}), 400, "invalid_value"),
        "seed -1": (post({**hello, "seed": -1}), 400, "invalid_value"),
        "unknown field": (post({**hello, "temprature": 0.5}), 400, "unknown_parameter"),
        "n 2": (post({**hello, "n": 2}), 400, "unsupported_value"),
        "file outside the media root": (post(with_part({"type": "image_url", "image_url": {"url": str(media["outside"])}})), 403, "outside_media_root"),
        "remote url": (post(with_part({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}})), 400, "unsupported_url"),
        "no api key": (post(hello, headers={}), 401, "invalid_api_key"),
        "wrong api key": (post(hello, headers={"Authorization": "Bearer nope"}), 401, "invalid_api_key"),
        "unknown endpoint": (post(hello, path=f"{server.base_url}/v1/completions"), 404, None),
        "wrong method": (httpx.get(url, headers=auth), 405, None),
    }
    for name, (response, status, code) in cases.items():
        assert response.status_code == status, (name, response.text)
        error = openai_error(response)
        assert error["code"] == code, (name, error)
        assert post(hello).status_code == 200, name  # and the server keeps serving
    assert cases["max_tokens 0"][0].json()["error"]["param"] == "max_tokens"
    assert cases["seed -1"][0].json()["error"]["param"] == "seed"
    with pytest.raises(openai.NotFoundError):
        server.client().chat.completions.create(model="nope", messages=PRIME)
    with pytest.raises(openai.BadRequestError) as refused:
        ask(server, user_with({"type": "input_audio", "input_audio": {"data": "not base64!", "format": "wav"}}))
    assert refused.value.body["code"] == "invalid_base64"


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    """About 75 s of espeak-ng phrases with known pauses (the long-audio tests' recording)."""
    return long_speech_file(tmp_path_factory.mktemp("server-speech"))


def test_transcription_of_a_75_s_recording_is_cut_in_pauses(server, local, speech):
    path, pauses = speech
    client = server.client()
    with open(path, "rb") as upload:
        verbose = client.audio.transcriptions.create(model=server.name, file=upload, response_format="verbose_json")
    duration = len(load_audio(path)) / 16000
    assert 75.0 <= verbose.duration == pytest.approx(duration)
    segments = verbose.segments
    assert len(segments) >= 3 and segments[0].start == 0 and segments[-1].end == pytest.approx(duration)
    for before, after in zip(segments, segments[1:], strict=False):
        assert after.start == before.end and any(start <= before.end <= end for start, end in pauses)
    assert all(s.end - s.start <= 30.0 for s in segments)
    assert verbose.text == " ".join(s.text for s in segments if s.text)
    # The same long-audio path in this process gives the same transcript.
    model, processor = local

    def segment_text(samples):
        pieces = [r.text for r in stream_generate(model, processor, [user_turn(instruction(None, None), audios=[samples])], max_tokens=512)]
        return parse_reply("".join(pieces), processor.tokenizer).content

    assert run_long_audio(load_audio(path), segment_text, progress=False).text == verbose.text
    with open(path, "rb") as upload:
        plain = client.audio.transcriptions.create(model=server.name, file=upload, response_format="text")
    assert plain.strip() == verbose.text
    with open(path, "rb") as upload:
        assert client.audio.transcriptions.create(model=server.name, file=upload).text == verbose.text


def test_transcription_refusals(server, media):
    client = server.client()
    with open(media["corrupt"], "rb") as upload, pytest.raises(openai.BadRequestError) as corrupt:
        client.audio.transcriptions.create(model=server.name, file=upload)
    assert corrupt.value.body["param"] == "file"
    with open(media["audio"], "rb") as upload, pytest.raises(openai.BadRequestError):
        client.audio.transcriptions.create(model=server.name, file=upload, response_format="srt")
    with open(media["audio"], "rb") as upload, pytest.raises(openai.NotFoundError):
        client.audio.transcriptions.create(model="whisper-1", file=upload)
    with open(media["audio"], "rb") as upload:
        assert isinstance(client.audio.transcriptions.create(model=server.name, file=upload).text, str)
