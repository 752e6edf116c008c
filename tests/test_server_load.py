"""The server under load (loopback only): 16 concurrent streaming clients against a queue of 8, four of
them leaving mid-stream; a client leaving during a long prefill. Every request is answered or refused
with a clear status, none hangs, the queue bound holds, a cancelled reply frees the model within one
token or prefill chunk, and memory returns to its idle level. Figures: benchmarks/bench_server.py."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from mlx_unified.testing.server_load import no_stop_bias, run_load, settle
from mlx_unified.testing.server_process import ServerProcess

MAX_QUEUE = 8
CLIENTS = 16
LEAVING = 4
REPLY_TOKENS = 32
PREFILL_STEP = 64
TIMEOUT_S = 180
# Idle RSS after warm-up vs after the load: MLX's buffers are released after each job; what may stay
# is allocator slack and the prefix-cache entries of the prompts seen (a few hundred KB here).
RSS_SLACK_BYTES = 48 << 20


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("load")
    flags = ("--max-queue", str(MAX_QUEUE), "--prefill-step-size", str(PREFILL_STEP))
    with ServerProcess(tiny.path, *flags, cache_dir=folder / "cache", log=folder / "server.log") as running:
        yield running


def test_sixteen_streaming_clients_against_a_bounded_queue(server):
    bias = no_stop_bias(server.name)
    warm = server.client().chat.completions.create(
        model=server.name, messages=[{"role": "user", "content": "Warm up."}], max_tokens=REPLY_TOKENS, logit_bias=bias
    )
    assert warm.usage.completion_tokens == REPLY_TOKENS
    idle = server.rss_bytes()
    before = settle(server)["requests"]
    results = asyncio.run(run_load(server, CLIENTS, LEAVING, REPLY_TOKENS, bias, TIMEOUT_S))  # none hangs
    health = settle(server)
    kinds = [result.kind for result in results]
    assert kinds[:LEAVING] == ["left"] * LEAVING  # queued before the others came
    assert all(r.completion_tokens == REPLY_TOKENS for r in results if r.kind == "completed")
    assert kinds.count("refused") >= 1 and kinds.count("completed") >= 1
    requests = health["requests"]
    assert requests["refused"] - before["refused"] == kinds.count("refused")
    assert requests["completed"] - before["completed"] == kinds.count("completed")
    assert requests["cancelled"] - before["cancelled"] == LEAVING and requests["failed"] == 0
    assert health["queue"]["peak_waiting"] <= MAX_QUEUE
    assert health["cancellation"]["max_tokens_after_cancel"] <= 1
    assert server.rss_bytes() <= idle + RSS_SLACK_BYTES


def test_a_client_leaving_during_prefill_frees_the_model_at_the_next_chunk(server):
    long_system = " ".join(f"Rule {i}: answer with care and in full sentences." for i in range(200))
    body = {
        "model": server.name,
        "messages": [{"role": "system", "content": long_system}, {"role": "user", "content": "Go."}],
        "max_tokens": 1,
    }
    headers = {"Authorization": f"Bearer {server.api_key}"}
    before = server.health()
    with pytest.raises(httpx.ReadTimeout):  # the client gives up while the prompt is being read
        httpx.post(f"{server.base_url}/v1/chat/completions", json=body, headers=headers, timeout=httpx.Timeout(1.0))
    health = settle(server)
    assert health["requests"]["cancelled"] == before["requests"]["cancelled"] + 1
    assert health["cancellation"]["max_prefill_chunks_after_cancel"] <= 1
    reply = server.client().chat.completions.create(  # the model is free again
        model=server.name, messages=[{"role": "user", "content": "Hello"}], max_tokens=2
    )
    assert reply.choices[0].finish_reason in ("stop", "length")
