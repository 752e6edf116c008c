"""The server under load (loopback only): 16 concurrent streaming clients against a queue of 8, four of
them leaving mid-stream; a client leaving during a long prefill. Every request is answered or refused
with a clear status, none hangs, the queue bound holds, a cancelled reply frees the model within one
token or prefill chunk, and memory returns to its idle level."""

from __future__ import annotations

import asyncio
import os
import time

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from mlx_unified.testing import tiny_checkpoint
from mlx_unified.testing.server_process import ServerProcess

MAX_QUEUE = 8
CLIENTS = 16
LEAVING = 4
REPLY_TOKENS = 32
PREFILL_STEP = 64
REQUEST_TIMEOUT_S = 180
# Idle RSS after warm-up vs after the load: MLX's buffers are released after each job; what may stay
# is allocator slack and the prefix-cache entries of the prompts seen (a few hundred KB here).
RSS_SLACK_BYTES = 48 << 20


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    checkpoint = tiny_checkpoint(tmp_path_factory.mktemp("load") / "tiny")
    previous = os.environ.get("MLX_UNIFIED_CACHE_DIR")
    os.environ["MLX_UNIFIED_CACHE_DIR"] = str(tmp_path_factory.mktemp("load-prefix-cache"))
    flags = ("--max-queue", str(MAX_QUEUE), "--prefill-step-size", str(PREFILL_STEP))
    try:
        with ServerProcess(checkpoint, *flags, log=tmp_path_factory.mktemp("load-log") / "server.log") as running:
            yield running
    finally:
        if previous is None:
            os.environ.pop("MLX_UNIFIED_CACHE_DIR", None)
        else:
            os.environ["MLX_UNIFIED_CACHE_DIR"] = previous


def no_stop_bias(checkpoint: str) -> dict[str, int]:
    """logit_bias that bans every stop token, so each reply runs to max_tokens."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    stops = {tokenizer.eos_token_id} | {tokenizer.convert_tokens_to_ids(t) for t in ("<turn|>", "<|tool_response>")}
    return {str(token): -100 for token in stops}


async def stream_reply(client, server, bias, index: int, leave_after: int | None) -> tuple[str, int]:
    """('completed', completion tokens) / ('left', chunks read) / ('refused', 503)."""
    messages = [{"role": "user", "content": f"Client {index}: tell a long story."}]
    try:
        stream = await client.chat.completions.create(
            model=server.name,
            messages=messages,
            max_tokens=REPLY_TOKENS * 10 if leave_after else REPLY_TOKENS,
            logit_bias=bias,
            stream=True,
            stream_options={"include_usage": True},
        )
    except openai.APIStatusError as error:
        assert error.status_code == 503 and error.body["code"] == "queue_full"
        assert error.response.headers["retry-after"] == "1"
        return "refused", 503
    chunks, usage = 0, None
    async with stream:
        async for chunk in stream:
            chunks += 1
            usage = chunk.usage or usage
            if leave_after is not None and chunks >= leave_after:
                return "left", chunks  # closing the stream drops the connection
    return "completed", usage.completion_tokens


async def wait_for_queue(server, jobs: int) -> None:
    while True:
        queue = server.health()["queue"]
        if queue["waiting"] + queue["running"] >= jobs:
            return
        await asyncio.sleep(0.02)


async def load(server, bias):
    client = server.async_client(timeout=REQUEST_TIMEOUT_S)
    leaving = [asyncio.create_task(stream_reply(client, server, bias, i, leave_after=3)) for i in range(LEAVING)]
    await asyncio.wait_for(wait_for_queue(server, LEAVING), 60)
    staying = [stream_reply(client, server, bias, i, None) for i in range(LEAVING, CLIENTS)]
    results = await asyncio.wait_for(asyncio.gather(*leaving, *staying), REQUEST_TIMEOUT_S)
    await client.close()
    return results


def settle(server) -> dict:
    """/health once nothing is waiting or running."""
    for _ in range(400):
        health = server.health()
        if health["queue"]["waiting"] == 0 and not health["queue"]["running"]:
            return health
        time.sleep(0.05)
    raise AssertionError(f"the queue did not drain: {health}")


def test_sixteen_streaming_clients_against_a_bounded_queue(server):
    bias = no_stop_bias(server.name)
    warm = server.client().chat.completions.create(
        model=server.name, messages=[{"role": "user", "content": "Warm up."}], max_tokens=REPLY_TOKENS, logit_bias=bias
    )
    assert warm.usage.completion_tokens == REPLY_TOKENS
    idle = server.rss_bytes()
    before = settle(server)["requests"]
    results = asyncio.run(load(server, bias))
    health = settle(server)
    outcomes = [kind for kind, _ in results]
    assert outcomes[:LEAVING] == ["left"] * LEAVING  # they were queued before the others came
    assert all(value == REPLY_TOKENS for kind, value in results if kind == "completed")
    assert outcomes.count("refused") >= 1 and outcomes.count("completed") >= 1
    requests = health["requests"]
    assert requests["refused"] - before["refused"] == outcomes.count("refused")
    assert requests["completed"] - before["completed"] == outcomes.count("completed")
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
    # The model is free: a new request is answered at once.
    reply = server.client().chat.completions.create(
        model=server.name, messages=[{"role": "user", "content": "Hello"}], max_tokens=2
    )
    assert reply.choices[0].finish_reason in ("stop", "length")
