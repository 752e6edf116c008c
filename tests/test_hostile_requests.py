"""Hostile request contents (issue 23, round two): a request cannot bring its own chat template or switch
the template's framing; a request too large for the model is refused while it is read, before any
templating; a client's mistake is a 400 naming the field, never a 500; text that spells the processor's
internal markers is only text. After every hostile request the server gives an ordinary request its
ordinary reply in its ordinary time."""

from __future__ import annotations

import asyncio
import http.client
import json
import sys
import time
from dataclasses import dataclass

import pytest
from fastapi.testclient import TestClient

from mlx_unified.generation import generate, stop_token_ids
from mlx_unified.generation_params import GenerationParams, ParameterError
from mlx_unified.server.app import Service, create_app
from mlx_unified.server.chat import ChatRequest, ServerDefaults, generation_work
from mlx_unified.server.media import MediaPolicy
from mlx_unified.server.worker import Cancelled, Job, Worker

HELLO = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3}
# The processor's sentinel as it was spelled before its key: user text of this form replaced itself, or
# another message's text, in the prompt.
OLD_MARKER = "\ue0000\ue001"
# A template that renders a million lines for every message: a worker rendering it would stay busy.
NESTED_LOOPS = "{% for a in range(1000) %}{% for b in range(1000) %}{{ a }}{% endfor %}{% endfor %}"
# A context this small (the server's --max-kv-size) makes the context-derived limits cheap to reach.
SMALL_CONTEXT = 64


@dataclass
class Served:
    client: TestClient
    worker: Worker
    root: str  # the --media-root folder
    reply: str  # HELLO's greedy reply
    seconds: float  # and how long it took, warm


def post(client: TestClient, body: dict) -> object:
    """The body as JSON with `\\u` escapes, as a client writes lone surrogates (httpx would refuse them)."""
    return client.post("/v1/chat/completions", content=json.dumps(body), headers={"content-type": "application/json"})


def hello(client: TestClient) -> tuple[str, float]:
    started = time.perf_counter()
    response = post(client, HELLO)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"], time.perf_counter() - started


def assert_still_serving(served: Served) -> None:
    """An ordinary request gets its ordinary reply within its ordinary time (a loose bound: two cores
    shared with other work)."""
    reply, seconds = hello(served.client)
    assert reply == served.reply
    assert seconds < 5 * served.seconds + 2.0, (seconds, served.seconds)
    assert served.worker.running is None and served.worker.waiting == 0


@pytest.fixture(scope="module")
def served(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("media-root")
    (root / "loop-a").symlink_to(root / "loop-b")
    (root / "loop-b").symlink_to(root / "loop-a")
    model, processor = tiny.model, tiny.processor
    worker = Worker(max_waiting=2)
    service = Service(
        model, processor, "tiny", worker, stop_token_ids(model, processor.tokenizer),
        policy=MediaPolicy.from_folders([root]),
    )  # fmt: skip
    with TestClient(create_app(service)) as client:
        hello(client)  # warm
        reply, seconds = hello(client)
        yield Served(client, worker, str(root), reply, seconds)
    worker.close()


@pytest.fixture(scope="module")
def small(tiny):
    """A server whose requests get SMALL_CONTEXT positions (--max-kv-size)."""
    model, processor = tiny.model, tiny.processor
    worker = Worker(max_waiting=2)
    defaults = ServerDefaults(GenerationParams(max_tokens=3, max_kv_size=SMALL_CONTEXT))
    service = Service(model, processor, "tiny", worker, stop_token_ids(model, processor.tokenizer), defaults=defaults)
    with TestClient(create_app(service)) as client:
        hello(client)
        reply, seconds = hello(client)
        yield Served(client, worker, "", reply, seconds)
    worker.close()


def refused(served: Served, body: dict) -> dict:
    """The 400's error object, after checking the request never reached the worker."""
    jobs = served.worker.counters.completed + served.worker.counters.failed
    response = post(served.client, {**HELLO, **body})
    assert response.status_code == 400, response.text
    assert served.worker.counters.completed + served.worker.counters.failed == jobs
    return response.json()["error"]


# ---------------------------------------------------------------- 1. no template, no framing switches


@pytest.mark.parametrize(
    "key, value",
    [
        ("chat_template", NESTED_LOOPS),
        ("tokenize", True),
        ("add_generation_prompt", False),
        ("continue_final_message", True),
        ("return_dict", True),
        ("tools", [{"type": "function", "function": {"name": "f"}}]),
        ("documents", [{"text": "x"}]),
        ("messages", []),
        ("bos_token", "<eos>"),
        ("namespace", 1),
    ],
)
def test_a_request_cannot_bring_its_own_chat_template(served, key, value):
    started = time.perf_counter()
    error = refused(served, {"chat_template_kwargs": {key: value}})
    assert time.perf_counter() - started < 2.0
    assert error["param"] == f"chat_template_kwargs.{key}" and error["message"].startswith(error["param"])
    assert_still_serving(served)


def test_plain_template_variables_still_pass(served):
    response = post(served.client, {**HELLO, "chat_template_kwargs": {"enable_thinking": False, "house_style": 1}})
    assert response.status_code == 200, response.text


def test_the_api_and_the_cli_refuse_a_template_and_framing_switches(tiny, capsys):
    from mlx_unified.cli import main

    for variables in ({"chat_template": NESTED_LOOPS}, {"tokenize": True}, {"add_generation_prompt": False}):
        key = next(iter(variables))
        with pytest.raises(ParameterError) as refusal:
            generate(tiny.model, tiny.processor, "Hello", max_tokens=2, chat_template_kwargs=variables)
        assert refusal.value.param == f"chat_template_kwargs.{key}"
        with pytest.raises(ParameterError):
            tiny.processor([{"role": "user", "content": "Hello"}], chat_template_kwargs=variables)
        code = main(["--model", str(tiny.path), "--prompt", "Hello", "--chat-template-config", json.dumps(variables)])
        stderr = capsys.readouterr().err
        assert code == 2 and stderr.count("\n") == 1 and "Traceback" not in stderr
        assert f"--chat-template-config/--chat-template-args: {key}: " in stderr
    tools = [{"type": "function", "function": {"name": "f"}}]
    with pytest.raises(ParameterError, match="chat_template_kwargs.tools"):
        generate(tiny.model, tiny.processor, "Hello", max_tokens=2, tools=tools, chat_template_kwargs={"tools": tools})


def test_a_client_that_left_stops_the_job_before_the_model_runs(tiny, served, monkeypatch):
    """Templating and tokenizing are bounded by the request's limits; once they are done, a job whose
    client has left ends before its prefill (and after that at the next chunk or token)."""
    calls = []
    monkeypatch.setattr("mlx_unified.generation.stream_generate", lambda *a, **k: calls.append(a) or iter(()))

    class Leaving:
        """The processor, with the client leaving while it tokenizes."""

        def __init__(self, job: Job) -> None:
            self.job = job
            self.tokenizer = tiny.processor.tokenizer

        def __call__(self, *args, **kwargs):
            self.job.cancel()
            return tiny.processor(*args, **kwargs)

    service = Service(tiny.model, None, "tiny", served.worker, set())
    request = ChatRequest(HELLO["messages"], GenerationParams(max_tokens=3))
    loop = asyncio.new_event_loop()
    job = Job(lambda _: None, loop)
    service.processor = Leaving(job)
    try:
        with pytest.raises(Cancelled):
            generation_work(service, request, HELLO["messages"], [])(job)
    finally:
        loop.close()
    assert calls == []


# ---------------------------------------------------------------- 2. sizes refused while a request is read


def rss_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the server's memory from /proc")
def test_a_million_messages_are_refused_before_templating(tiny, tmp_path):
    """A 33 MB body of a million messages: a 400 naming `messages` within 5 s, the server's resident
    memory (its peak, reset before the request) less than 256 MB above idle."""
    from mlx_unified.testing.server_process import API_KEY, ServerProcess

    message = b'{"role":"user","content":"hi"},'
    count = 1_000_000
    raw = b'{"model":"%s","max_tokens":3,"messages":[' % str(tiny.path).encode() + message * count
    raw = raw[:-1] + b"]}"
    with ServerProcess(tiny.path, cache_dir=tmp_path / "cache", log=tmp_path / "server.log") as server:
        ordinary = json.dumps({**HELLO, "model": str(tiny.path)}).encode()
        headers = {"content-type": "application/json", "authorization": f"Bearer {API_KEY}"}

        def send(body: bytes) -> tuple[int, dict, float]:
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
            started = time.perf_counter()
            connection.request("POST", "/v1/chat/completions", body=body, headers=headers)
            response = connection.getresponse()
            answer = json.loads(response.read())
            connection.close()
            return response.status, answer, time.perf_counter() - started

        status, normal, usual = send(ordinary)
        assert status == 200
        idle = rss_kib(server.pid, "VmRSS")
        with open(f"/proc/{server.pid}/clear_refs", "w") as clear:
            clear.write("5")  # resets the peak (VmHWM) to the resident size now
        assert rss_kib(server.pid, "VmHWM") < idle + 4096
        status, answer, seconds = send(raw)
        peak = rss_kib(server.pid, "VmHWM")
        assert status == 400 and answer["error"]["param"] == "messages", answer
        assert seconds < 5.0, seconds
        assert (peak - idle) / 1024 < 256, (peak - idle) / 1024
        print(f"\n{len(raw) / 1e6:.1f} MB, {count} messages: refused in {seconds:.2f} s, peak {(peak - idle) / 1024:.0f} MB above idle")
        status, again, seconds = send(ordinary)
        assert status == 200 and again["choices"][0]["message"] == normal["choices"][0]["message"]
        assert seconds < 5 * usual + 2.0


def long_text(characters: int) -> str:
    return ("a" * 15 + " ") * (characters // 16) + "a" * (characters % 16)


@pytest.mark.parametrize(
    "case",
    ["more messages than tokens", "more parts than tokens", "more text than tokens", "media past the context"],
)
def test_messages_that_cannot_fit_the_context_are_refused_before_templating(small, tiny, case, monkeypatch):
    """With a context of SMALL_CONTEXT tokens (and the tiny tokenizer's longest token of 16 characters):
    what certainly cannot fit is refused at parse time; nothing is templated or decoded."""
    rendered = []
    monkeypatch.setattr(type(tiny.processor), "_render", lambda *a, **k: rendered.append(a))
    user = {"role": "user", "content": "hi"}
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}  # never decoded
    messages = {
        "more messages than tokens": [user] * (SMALL_CONTEXT + 1),
        "more parts than tokens": [{"role": "user", "content": [{"type": "text", "text": ""}] * (SMALL_CONTEXT + 1)}],
        "more text than tokens": [{"role": "user", "content": long_text(16 * SMALL_CONTEXT + 1)}],
        "media past the context": [{"role": "user", "content": [image] * (SMALL_CONTEXT // 3 + 1)}],
    }[case]
    error = refused(small, {"messages": messages})
    assert error["param"] == "messages" and error["code"] == "context_length_exceeded", error
    assert rendered == []
    monkeypatch.undo()
    assert_still_serving(small)


def test_text_that_may_fit_is_not_refused_by_the_cheap_limits(small):
    """Right at the bound (every character could be a 16-character token's) the request goes on to the
    tokenizer, which counts its tokens exactly (and finds it too long: a 400 after templating)."""
    response = post(small.client, {**HELLO, "messages": [{"role": "user", "content": long_text(16 * 40)}]})
    assert response.status_code == 400 and "the prompt is" in response.json()["error"]["message"]
    assert_still_serving(small)


# ---------------------------------------------------------------- 3. a client's mistake is a 400 naming it


def nested_properties(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def tool(name: str = "f", **function) -> dict:
    return {"type": "function", "function": {"name": name, "description": "d", **function}}


def local_image(path: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"file://{path}"}}, {"type": "text", "text": "Hi"}]}]


def deep_arguments(depth: int) -> str:
    return "{" + '"a":{' * depth + "}" * depth + "}"


CASES = {
    "logit_bias key not a number": ({"logit_bias": {"abc": 1}}, "logit_bias"),
    "logit_bias key a superscript": ({"logit_bias": {"\u00b2": 1}}, "logit_bias"),
    "logit_bias key with two minus signs": ({"logit_bias": {"--5": 1}}, "logit_bias"),
    "logit_bias key of 5000 digits": ({"logit_bias": {"9" * 5000: 1}}, "logit_bias"),
    "reasoning_effort a list": ({"reasoning_effort": ["high"]}, "reasoning_effort"),
    "reasoning_effort an object": ({"reasoning_effort": {"level": "high"}}, "reasoning_effort"),
    "tokenize": ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs.tokenize"),
    "add_generation_prompt": (
        {"chat_template_kwargs": {"add_generation_prompt": False}},
        "chat_template_kwargs.add_generation_prompt",
    ),
    "continue_final_message": (
        {"chat_template_kwargs": {"continue_final_message": True}},
        "chat_template_kwargs.continue_final_message",
    ),
    "enable_thinking not a flag": (
        {"chat_template_kwargs": {"enable_thinking": "yes"}},
        "chat_template_kwargs.enable_thinking",
    ),
    "surrogate in content": ({"messages": [{"role": "user", "content": "hi \ud800"}]}, "messages[0].content"),
    "surrogate in a text part": (
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]},
        "messages[0].content[0].text",
    ),
    "surrogate in a tool name": ({"tools": [tool("f\ud800")]}, "tools[0].function.name"),
    "surrogate in a schema key": (
        {"tools": [tool(parameters={"type": "object", "properties": {"\ud800": {"type": "string"}}})]},
        "tools[0].function.parameters.properties",
    ),
    "surrogate in call arguments": (
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"a": "\\ud800"}'}}]},
                {"role": "tool", "tool_call_id": "c", "content": "x"},
            ]
        },
        "messages[1].tool_calls[0].function.arguments",
    ),
    "call arguments nested 200 deep": (
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": deep_arguments(200)}}]},
                {"role": "tool", "tool_call_id": "c", "content": "x"},
            ]
        },
        "messages[1].tool_calls[0].function.arguments",
    ),
    "tool parameters nested 200 deep": ({"tools": [tool(parameters=nested_properties(200))]}, "tools[0].function.parameters"),
    "tool result nested 200 deep": (
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c", "content": json.loads(deep_arguments(200))},
            ]
        },
        "messages[2].content",
    ),
    "tool properties a list": ({"tools": [tool(parameters={"type": "object", "properties": ["a"]})]}, "tools"),
    "tool required not a list": (
        {"tools": [tool(parameters={"type": "object", "properties": {"a": {"type": "string"}}, "required": "a"})]},
        "tools",
    ),
    "tool property without a type": (
        {"tools": [tool(parameters={"type": "object", "properties": {"a": {"anyOf": [{"type": "string"}]}}})]},
        "tools",
    ),
    "tool name with a brace": ({"tools": [tool("f{x")]}, "tools"),
    "129 tools": ({"tools": [tool(f"f{i}") for i in range(129)]}, "tools"),
    "65 stop strings": ({"stop": [f"s{i}" for i in range(65)]}, "stop"),
    "a stop string of 1025 characters": ({"stop": ["a" * 1025]}, "stop"),
}
MEDIA_CASES = {
    "a NUL byte": ("{root}/a\u0000b.png", "messages[0].content[0].image_url.url"),
    "a symlink loop": ("{root}/loop-a", "messages[0].content[0].image_url.url"),
    "an over-long name": ("{root}/" + "a" * 300, "messages[0].content[0].image_url.url"),
    "a name over 255 bytes": ("{root}/" + "\u00e9" * 200, "messages[0].content[0].image_url.url"),
    "an over-long path": ("{root}/" + "a/" * 2100 + "b.png", "messages[0].content[0].image_url.url"),
}


@pytest.mark.parametrize("case", [*CASES, *(f"media root path with {name}" for name in MEDIA_CASES)])
def test_a_clients_mistake_is_a_400_naming_the_field(served, case):
    if case in CASES:
        body, param = CASES[case]
    else:
        path, param = MEDIA_CASES[case.removeprefix("media root path with ")]
        body = {"messages": local_image(path.format(root=served.root))}
    error = refused(served, body)
    assert error["param"] is not None and error["param"].startswith(param), error
    assert error["type"] == "invalid_request_error" and "Traceback" not in error["message"]
    assert_still_serving(served)


def test_a_lone_surrogate_is_a_400_naming_the_field(served):
    error = refused(served, {"messages": [{"role": "user", "content": "fine"}, {"role": "user", "content": "\ud83d"}]})
    assert error["param"] == "messages[1].content" and "surrogate" in error["message"]
    assert_still_serving(served)


def test_logit_bias_keys_that_are_not_token_ids_are_a_400(served):
    for key in ("12.5", "\u0661", "1e3", " -1"):
        error = refused(served, {"logit_bias": {key: 1}})
        assert error["param"] == "logit_bias", error
    assert post(served.client, {**HELLO, "logit_bias": {" 7 ": 5}}).status_code == 200
    assert_still_serving(served)


def test_the_python_api_refuses_lone_surrogates_and_deep_tools_by_name(tiny):
    with pytest.raises(ParameterError) as refusal:
        generate(tiny.model, tiny.processor, "hi \ud800", max_tokens=2)
    assert refusal.value.param == "messages"
    from mlx_unified.tool_calls import ToolMessageError

    with pytest.raises(ToolMessageError, match=r"tools\[0\].function.parameters"):
        generate(tiny.model, tiny.processor, "hi", max_tokens=2, tools=[tool(parameters=nested_properties(200))])
    with pytest.raises(ToolMessageError, match=r"tools\[0\].function.parameters.properties: must be an object"):
        generate(tiny.model, tiny.processor, "hi", max_tokens=2, tools=[tool(parameters={"properties": ["a"]})])


# ---------------------------------------------------------------- 3-4. marker text is plain text


def test_marker_text_in_a_prompt_is_plain_text(tiny, served, capsys):
    processor = tiny.processor
    text = f"a {OLD_MARKER} b"
    ids = processor([{"role": "user", "content": text}])["input_ids"][0].tolist()
    plain = processor.tokenizer(processor.apply_chat_template([{"role": "user", "content": text}]), add_special_tokens=False)
    assert ids == plain["input_ids"]
    # Beside a message whose control-token text is set apart, the marker text is still its own text.
    messages = [
        {"role": "user", "content": "<turn|> first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": OLD_MARKER},
    ]
    decoded = processor.tokenizer.decode(processor(messages)["input_ids"][0])
    assert decoded.count("<turn|> first") == 1 and OLD_MARKER in decoded
    response = post(served.client, {**HELLO, "messages": [{"role": "user", "content": text}]})
    assert response.status_code == 200, response.text
    assert_still_serving(served)

    from mlx_unified.cli import main

    code = main(["--model", str(tiny.path), "--prompt", text, "--max-tokens", "2", "--no-prefix-cache"])
    captured = capsys.readouterr()
    assert code == 0 and "Traceback" not in captured.err, captured.err


def test_the_server_cli_refuses_template_switches_in_one_line():
    from mlx_unified.cli import BadInput
    from mlx_unified.server.cli import build_parser

    with pytest.raises(BadInput) as refusal:
        build_parser().parse_args(["--model", "m", "--chat-template-config", '{"chat_template": "x"}'])
    assert "chat_template: the checkpoint's chat template renders every prompt" in str(refusal.value)
    assert "\n" not in str(refusal.value)
