"""Concurrent streaming clients against a `ServerProcess`: the load test's and the benchmark's driver.

Some clients leave after a few chunks (closing the stream drops the connection); they are queued first,
so that they are accepted, then the others arrive together. Every client ends as "completed" (its
reply ran to `max_tokens`: stop tokens are banned with `logit_bias`), "left" or "refused" (a 503).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from .server_process import ServerProcess


@dataclass
class ClientResult:
    kind: str  # "completed", "left" or "refused"
    seconds: float  # from sending the request to its end
    completion_tokens: int = 0
    chunks: int = 0


def no_stop_bias(checkpoint: str) -> dict[str, int]:
    """logit_bias banning every stop token (end of sequence, end of turn, end of a call)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    stops = {tokenizer.eos_token_id} | {tokenizer.convert_tokens_to_ids(t) for t in ("<turn|>", "<|tool_response>")}
    return {str(token): -100 for token in stops}


async def stream_client(
    client: Any, server: ServerProcess, index: int, max_tokens: int, bias: dict, leave_after: int | None
) -> ClientResult:
    import openai

    started = time.perf_counter()
    try:
        stream = await client.chat.completions.create(
            model=server.name,
            messages=[{"role": "user", "content": f"Client {index}: tell a long story."}],
            max_tokens=max_tokens,
            logit_bias=bias,
            stream=True,
            stream_options={"include_usage": True},
        )
    except openai.APIStatusError as error:
        if error.status_code != 503 or error.body.get("code") != "queue_full":
            raise
        if error.response.headers.get("retry-after") is None:
            raise AssertionError("a 503 without Retry-After") from error
        return ClientResult("refused", time.perf_counter() - started)
    chunks, usage = 0, None
    async with stream:
        async for chunk in stream:
            chunks += 1
            usage = chunk.usage or usage
            if leave_after is not None and chunks >= leave_after:
                return ClientResult("left", time.perf_counter() - started, chunks=chunks)
    return ClientResult("completed", time.perf_counter() - started, usage.completion_tokens, chunks)


async def run_load(
    server: ServerProcess, clients: int, leaving: int, reply_tokens: int, bias: dict, timeout_s: float
) -> list[ClientResult]:
    """`leaving` clients that leave after 3 chunks, queued first, then the other ones all at once."""
    client = server.async_client(timeout=timeout_s)
    try:
        first = [
            asyncio.create_task(stream_client(client, server, i, reply_tokens * 10, bias, leave_after=3))
            for i in range(leaving)
        ]
        await asyncio.wait_for(_queued(server, leaving), timeout_s)
        rest = [stream_client(client, server, i, reply_tokens, bias, None) for i in range(leaving, clients)]
        return await asyncio.wait_for(asyncio.gather(*first, *rest), timeout_s)
    finally:
        await client.close()


async def _queued(server: ServerProcess, jobs: int) -> None:
    while True:
        queue = server.health()["queue"]
        if queue["waiting"] + queue["running"] >= jobs:
            return
        await asyncio.sleep(0.02)


def settle(server: ServerProcess, timeout_s: float = 60.0) -> dict[str, Any]:
    """/health once nothing waits or runs."""
    deadline = time.monotonic() + timeout_s
    while True:
        health = server.health()
        if health["queue"]["waiting"] == 0 and not health["queue"]["running"]:
            return health
        if time.monotonic() > deadline:
            raise TimeoutError(f"the queue did not drain in {timeout_s:.0f} s: {health}")
        time.sleep(0.05)
