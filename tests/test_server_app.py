"""The server's application in-process (Starlette's test client): a failure nobody foresaw is a 500 in
OpenAI's shape and the next request is served; a failure mid-stream ends the stream with an error
event; and the command line refuses bad flags in one line, before loading the model."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient

from mlx_unified.generation import GenerationResponse, stop_token_ids
from mlx_unified.generation_params import GenerationParams
from mlx_unified.server import app as app_module
from mlx_unified.server.app import Service, create_app
from mlx_unified.server.chat import ServerDefaults
from mlx_unified.server.worker import Worker

HELLO = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3}


@pytest.fixture(scope="module")
def client(tiny):
    model, processor = tiny.model, tiny.processor
    worker = Worker(max_waiting=2)
    service = Service(model, processor, "tiny", worker, stop_token_ids(model, processor.tokenizer))
    with TestClient(create_app(service)) as test_client:
        yield test_client
    worker.close()


def failing_work(emit_first: bool):
    def make(*_):
        def work(job):
            if emit_first:
                job.emit(GenerationResponse(1, 1.0, 1, 1.0, 0.1, 0.1, text="Hi", token=5))
            raise RuntimeError("a secret detail of the failure")

        return work

    return make


def test_an_unforeseen_failure_is_a_500_and_serving_goes_on(client, monkeypatch):
    monkeypatch.setattr(app_module, "generation_work", failing_work(emit_first=False))
    response = client.post("/v1/chat/completions", json=HELLO)
    assert response.status_code == 500
    assert response.json() == {
        "error": {
            "message": "internal server error (logged on the server)",
            "type": "server_error",
            "param": None,
            "code": "internal_error",
        }
    }
    assert "secret" not in response.text and "Traceback" not in response.text
    monkeypatch.undo()
    assert client.post("/v1/chat/completions", json=HELLO).status_code == 200


def test_a_failure_mid_stream_ends_it_with_an_error_event(client, monkeypatch):
    monkeypatch.setattr(app_module, "generation_work", failing_work(emit_first=True))
    with client.stream("POST", "/v1/chat/completions", json={**HELLO, "stream": True}) as response:
        events = [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]
    assert response.status_code == 200
    chunks = [json.loads(event) for event in events]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[1]["choices"][0]["delta"] == {"content": "Hi"}
    assert chunks[-1]["error"]["code"] == "internal_error" and "[DONE]" not in events
    assert "secret" not in "".join(events)
    monkeypatch.undo()
    assert client.post("/v1/chat/completions", json={**HELLO, "stream": True}).status_code == 200


def test_health_and_models_need_no_model_work(client):
    assert client.get("/health").json()["queue"]["max_waiting"] == 2
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
    assert client.get("/v1/models/other").status_code == 404


def server_command(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlx_unified.server", *flags], capture_output=True, text=True, timeout=120
    )


def test_the_servers_max_kv_size_ends_replies_there_and_refuses_prompts_that_fill_it(tiny, client):
    prompt_tokens = client.post("/v1/chat/completions", json=HELLO).json()["usage"]["prompt_tokens"]
    model, processor = tiny.model, tiny.processor
    for cap, status in ((prompt_tokens + 2, 200), (prompt_tokens, 400)):
        worker = Worker(max_waiting=2)
        defaults = ServerDefaults(GenerationParams(max_tokens=40, max_kv_size=cap))
        service = Service(model, processor, "tiny", worker, stop_token_ids(model, processor.tokenizer), defaults=defaults)
        with TestClient(create_app(service)) as capped:
            answer = capped.post("/v1/chat/completions", json={**HELLO, "max_tokens": 40})
        worker.close()
        assert answer.status_code == status, answer.text
        if status == 200:
            body = answer.json()
            tokens, finish = body["usage"]["completion_tokens"], body["choices"][0]["finish_reason"]
            assert tokens <= 2 and (finish == "length" or tokens < 2)
        else:
            assert answer.json()["error"]["param"] == "max_kv_size"


def test_the_servers_kv_bits_quantize_every_request_as_the_api_does(tiny_factory, tmp_path):
    """`mlx-unified-server --kv-bits 4 ...`: a request's greedy reply equals the API's with the same KV
    cache settings (and the flag parses as generate.py's, through the one GenerationParams)."""
    from mlx_unified.generation import generate
    from mlx_unified.loading import load
    from mlx_unified.server.cli import build_parser
    from mlx_unified.testing.server_process import ServerProcess

    wide = tiny_factory(seed=3, head_dim=64, global_head_dim=128)  # heads a group of 32 divides
    kv = {"kv_bits": 4, "kv_group_size": 32, "quantized_kv_start": 0}
    flags = ("--kv-bits", "4", "--kv-group-size", "32", "--quantized-kv-start", "0")
    args = build_parser().parse_args(["--model", str(wide.path), *flags])
    assert (args.kv_bits, args.kv_group_size, args.quantized_kv_start) == (4, 32, 0)
    model, processor = load(wide.path)  # as the server loads it (its dtype)
    messages = [{"role": "user", "content": "Hello there"}]
    expected = generate(model, processor, messages, max_tokens=12, use_prefix_cache=False, **kv)
    plain = generate(model, processor, messages, max_tokens=12, use_prefix_cache=False)
    assert expected.tokens != plain.tokens  # 4-bit KV changes this random model's reply: the flag is seen
    with ServerProcess(wide.path, *flags, cache_dir=tmp_path / "cache", log=tmp_path / "server.log") as server:
        for _ in range(2):  # the second time from the server's prefix cache, quantized
            reply = server.client().chat.completions.create(
                model=server.name, messages=messages, max_tokens=12, temperature=0
            )
            assert reply.choices[0].message.content == expected.content
            assert reply.usage.completion_tokens == expected.generation_tokens


def test_bad_flags_are_refused_in_one_line_before_loading(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        cases = {
            "port 0": (["--model", str(tmp_path), "--port", "0"], "--port"),
            "negative temperature": (["--model", str(tmp_path), "--temp", "-1"], "temperature"),
            "missing media root": (["--model", str(tmp_path), "--media-root", str(tmp_path / "none")], "--media-root"),
            "bad template args": (["--model", str(tmp_path), "--chat-template-args", "[1]"], "JSON object"),
            "kv bits": (["--model", str(tmp_path), "--kv-bits", "3"], "--kv-bits: must be one of 4, 8, got 3"),
            "kv group": (["--model", str(tmp_path), "--kv-bits", "8", "--kv-group-size", "48"], "--kv-group-size"),
            "port in use": (["--model", str(tmp_path), "--port", port], "cannot listen"),
            "no model": ([], "--model"),
        }
        for name, (flags, expected) in cases.items():
            result = server_command(*flags)
            assert result.returncode == 2, (name, result.stderr)
            assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, (name, result.stderr)
            assert expected in result.stderr and "Loading" not in result.stderr, (name, result.stderr)
    not_a_checkpoint = server_command("--model", str(tmp_path))
    assert not_a_checkpoint.returncode == 2 and "Traceback" not in not_a_checkpoint.stderr


def test_default_top_k_above_the_vocabulary_is_refused_after_loading(tiny):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    vocab = tiny.model.config.text.vocab_size
    result = server_command("--model", str(tiny.path), "--port", port, "--top-k", str(vocab + 1))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "Loading" in result.stderr  # checked against the loaded model's vocabulary
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"mlx-unified-server: error: --top-k: must be between 0 and {vocab}, got {vocab + 1}"
    unfit = server_command("--model", str(tiny.path), "--port", port, "--kv-bits", "8")  # heads 16 wide
    assert unfit.returncode == 2 and "Traceback" not in unfit.stderr and "Loading" in unfit.stderr
    assert unfit.stderr.strip().splitlines()[-1].startswith(
        "mlx-unified-server: error: --kv-group-size: 64 does not divide this model's head dim 16"
    )


def test_a_draft_model_gives_the_same_reply_and_reports_its_drafts(tiny, client, tmp_path):
    from mlx_unified.drafter import load_drafter
    from mlx_unified.testing import tiny_drafter

    request = {**HELLO, "max_tokens": 12}
    plain = client.post("/v1/chat/completions", json=request).json()
    model, processor = tiny.model, tiny.processor
    drafter = load_drafter(tiny_drafter(tmp_path / "drafter", tiny.path, copies_last_token=True))
    worker = Worker(max_waiting=2)
    service = Service(model, processor, "tiny", worker, stop_token_ids(model, processor.tokenizer), draft_model=drafter)
    with TestClient(create_app(service)) as speculating:
        answer = speculating.post("/v1/chat/completions", json=request).json()
    worker.close()
    assert answer["choices"][0]["message"] == plain["choices"][0]["message"]
    drafts = answer["usage"]["speculative_decoding"]
    assert drafts["draft_tokens"] > 0 and 0 <= drafts["acceptance_rate"] <= 1 and drafts["mean_accepted_length"] >= 1
    assert "speculative_decoding" not in plain["usage"]
