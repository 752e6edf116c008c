"""`/v1/chat/completions`: OpenAI's request read into our generation call, and the reply written back.

The request's fields map onto `stream_generate` (validated by `GenerationParams`); thinking is turned
on by `reasoning_effort` or `chat_template_kwargs.enable_thinking`; the reply's text is split by
`ReplyParser` into `content`, `reasoning_content` and `tool_calls`.
"""

from __future__ import annotations

import time
import uuid
from contextlib import closing
from dataclasses import asdict, dataclass, field
from typing import Any

from ..generation_params import GenerationParams
from ..reply_parser import ReplyDelta, ReplyParser
from ..tool_calls import check_tools
from .errors import bad_request
from .worker import Job

# Fields read from a request; the second set is accepted and has no effect here (no accounts, no storage).
CHAT_FIELDS = {
    "model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature",
    "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "logit_bias",
    "seed", "stop", "logprobs", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls",
    "reasoning_effort", "chat_template_kwargs", "response_format", "n",
}  # fmt: skip
IGNORED_FIELDS = {"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key"}
# Gemma 4 thinks or does not: the efforts that ask for thought turn it on.
REASONING_EFFORT = {"none": False, "minimal": False, "low": True, "medium": True, "high": True}


DEFAULT_MAX_TOKENS = 512


@dataclass
class ServerDefaults:
    """What a request gets for the fields it leaves out: the server's generation flags, checked
    (`generation_flags.generation_params`), and its thinking and chat-template settings."""

    params: GenerationParams = field(default_factory=lambda: GenerationParams(max_tokens=DEFAULT_MAX_TOKENS))
    enable_thinking: bool = False
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class ChatRequest:
    messages: Any  # as sent; `media.convert_messages` decodes them
    params: GenerationParams
    stream: bool = False
    include_usage: bool = False
    enable_thinking: bool = False
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    json_output: bool = False  # response_format json_object / json_schema
    json_schema: dict[str, Any] | None = None
    parallel_tool_calls: bool = True


def parse_chat_request(body: dict[str, Any], defaults: ServerDefaults, vocab_size: int) -> ChatRequest:
    """A checked request; APIError (400) naming the first field at fault."""
    unknown = sorted(set(body) - CHAT_FIELDS - IGNORED_FIELDS)
    if unknown:
        raise bad_request(f"unrecognized request argument: {unknown[0]}", unknown[0], "unknown_parameter")
    if body.get("n", 1) != 1:
        raise bad_request("n: only one choice per request is generated (n must be 1)", "n", "unsupported_value")
    stream = _flag(body, "stream", False)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad_request("stream_options: must be an object", "stream_options")
    maximum = body.get("max_completion_tokens", body.get("max_tokens"))
    default = defaults.params
    params = GenerationParams(
        max_tokens=default.max_tokens if maximum is None else maximum,
        temperature=_value(body, "temperature", default.temperature),
        top_p=_value(body, "top_p", default.top_p),
        top_k=_value(body, "top_k", default.top_k),
        min_p=_value(body, "min_p", default.min_p),
        repetition_penalty=_value(body, "repetition_penalty", default.repetition_penalty),
        repetition_context_size=default.repetition_context_size,
        presence_penalty=_value(body, "presence_penalty", default.presence_penalty),
        frequency_penalty=_value(body, "frequency_penalty", default.frequency_penalty),
        logit_bias=body.get("logit_bias"),
        seed=body.get("seed"),
        stop=body.get("stop") or (),
        prefill_chunk_size=default.prefill_chunk_size,
        max_kv_size=default.max_kv_size,
        num_draft_tokens=default.num_draft_tokens,
        kv_bits=default.kv_bits,
        kv_group_size=default.kv_group_size,
        quantized_kv_start=default.quantized_kv_start,
        logprobs=_flag(body, "logprobs", False),
        top_logprobs=_value(body, "top_logprobs", 0),
    ).validate(vocab_size)
    kwargs = {**defaults.chat_template_kwargs, **_mapping(body, "chat_template_kwargs")}
    thinking = defaults.enable_thinking
    effort = body.get("reasoning_effort")
    if effort is not None:
        if effort not in REASONING_EFFORT:
            raise bad_request(
                f"reasoning_effort: expected one of {', '.join(REASONING_EFFORT)}, got {effort!r}", "reasoning_effort"
            )
        thinking = REASONING_EFFORT[effort]
    thinking = kwargs.pop("enable_thinking", thinking)
    if not isinstance(thinking, bool):
        raise bad_request("chat_template_kwargs.enable_thinking: must be true or false", "chat_template_kwargs")
    request = ChatRequest(
        body.get("messages"),
        params,
        stream=stream,
        include_usage=_flag(options, "include_usage", False),
        enable_thinking=thinking,
        tools=_tools(body),
        chat_template_kwargs=kwargs,
        parallel_tool_calls=_flag(body, "parallel_tool_calls", True),
    )
    _response_format(body.get("response_format"), request)
    return request


def _value(body: dict[str, Any], name: str, default: Any) -> Any:
    value = body.get(name)
    return default if value is None else value


def _flag(body: dict[str, Any], name: str, default: bool) -> bool:
    value = _value(body, name, default)
    if not isinstance(value, bool):
        raise bad_request(f"{name}: must be true or false, got {value!r}", name)
    return value


def _mapping(body: dict[str, Any], name: str) -> dict[str, Any]:
    value = _value(body, name, {})
    if not isinstance(value, dict):
        raise bad_request(f"{name}: must be an object", name)
    return value


def _tools(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    choice = _value(body, "tool_choice", "auto")
    tools = body.get("tools")
    if choice not in ("auto", "none"):
        raise bad_request(
            "tool_choice: 'auto' and 'none' are supported (Gemma 4 decides when to call a tool)",
            "tool_choice",
            "unsupported_value",
        )
    if not tools or choice == "none":
        return None
    try:
        return check_tools(tools)
    except ValueError as error:
        raise bad_request(str(error), "tools") from error


def _response_format(value: Any, request: ChatRequest) -> None:
    kind = value.get("type") if isinstance(value, dict) else value
    if value is None or kind == "text":
        return
    if kind not in ("json_object", "json_schema"):
        raise bad_request(f"response_format.type: expected text, json_object or json_schema, got {kind!r}", "response_format")
    if request.tools:
        raise bad_request("response_format: JSON output cannot be combined with tools", "response_format")
    request.json_output = True
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise bad_request("response_format.json_schema.schema: a JSON schema object is required", "response_format")
        request.json_schema = schema


def generation_work(service: Any, request: ChatRequest, messages: list[dict[str, Any]], processors: list) -> Any:
    """The job that answers one chat request on the worker thread."""
    from ..generation import stream_generate

    def work(job: Job) -> None:
        replies = stream_generate(
            service.model,
            service.processor,
            messages,
            prefill_progress=job.prefill_progress,
            logits_processors=processors,
            enable_thinking=request.enable_thinking,
            tools=request.tools,
            chat_template_kwargs=request.chat_template_kwargs,
            prefix_cache=service.prefix_cache,
            use_prefix_cache=service.prefix_cache is not None,
            draft_model=service.draft_model,
            **asdict(request.params),
        )
        with closing(replies):
            for response in replies:
                job.token_done()
                job.emit(response)

    return work


class ReplyAssembler:
    """Generation responses -> OpenAI's message fields, piece by piece and as a whole."""

    def __init__(self, tokenizer: Any, stop_ids: set[int], parallel_tool_calls: bool) -> None:
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        self.parallel_tool_calls = parallel_tool_calls
        self.parser = ReplyParser(tokenizer)
        self.whole = ReplyDelta()
        self.last: Any = None

    def add(self, response: Any) -> tuple[ReplyDelta, list[dict[str, Any]]]:
        """What this response adds to the message, and its token's logprobs entry (if asked)."""
        delta = self.parser.feed(response.text)
        if response.finish_reason:
            delta += self.parser.finish()
        if not self.parallel_tool_calls:
            delta.tool_calls = delta.tool_calls[: max(0, 1 - len(self.whole.tool_calls))]
        self.whole += delta
        self.last = response
        entries = []
        if response.logprob is not None and response.token not in self.stop_ids:
            entries.append(self._logprob_entry(response))
        return delta, entries

    @property
    def finish_reason(self) -> str | None:
        if self.whole.tool_calls:
            return "tool_calls"
        return None if self.last is None else self.last.finish_reason

    def delta_fields(self, delta: ReplyDelta, first_call: int) -> dict[str, Any]:
        """A streamed chunk's `delta`; `first_call` is the index of the first of its tool calls."""
        fields: dict[str, Any] = {}
        if delta.reasoning:
            fields["reasoning_content"] = delta.reasoning
        if delta.content:
            fields["content"] = delta.content
        if delta.tool_calls:
            fields["tool_calls"] = [
                {"index": first_call + i, **call.as_openai()} for i, call in enumerate(delta.tool_calls)
            ]
        return fields

    def message(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": self.whole.content or None}
        if self.whole.reasoning:
            message["reasoning_content"] = self.whole.reasoning
        if self.whole.tool_calls:
            message["tool_calls"] = [call.as_openai() for call in self.whole.tool_calls]
        elif message["content"] is None:
            message["content"] = ""
        return message

    def usage(self) -> dict[str, Any]:
        prompt = self.last.prompt_tokens if self.last else 0
        completion = self.last.generation_tokens if self.last else 0
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": self.last.cached_tokens if self.last else 0},
        } | self._speculation()

    def _speculation(self) -> dict[str, Any]:
        """With a draft model (`--draft-model`): the reply's drafts, as the statistics of `generate` name them."""
        if not self.last or not self.last.draft_rounds:
            return {}
        last = self.last
        return {
            "speculative_decoding": {
                "draft_tokens": last.draft_tokens,
                "accepted_draft_tokens": last.accepted_draft_tokens,
                "acceptance_rate": last.acceptance_rate,
                "mean_accepted_length": last.mean_accepted_length,
            }
        }

    def _logprob_entry(self, response: Any) -> dict[str, Any]:
        def entry(token: int, logprob: float) -> dict[str, Any]:
            text = self.tokenizer.decode([token])
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return {
            **entry(response.token, response.logprob),
            "top_logprobs": [entry(token, logprob) for token, logprob in response.top_logprobs],
        }


@dataclass
class CompletionMeta:
    """The fields every chunk and completion of one reply share."""

    model: str
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None, logprobs: list | None = None) -> dict:
        choice = {
            "index": 0,
            "delta": delta,
            "logprobs": {"content": logprobs} if logprobs else None,
            "finish_reason": finish_reason,
        }
        return {**self._head("chat.completion.chunk"), "choices": [choice]}

    def completion(self, assembler: ReplyAssembler, logprobs: list | None) -> dict:
        choice = {
            "index": 0,
            "message": assembler.message(),
            "logprobs": {"content": logprobs} if logprobs is not None else None,
            "finish_reason": assembler.finish_reason,
        }
        return {**self._head("chat.completion"), "choices": [choice], "usage": assembler.usage()}

    def usage_chunk(self, assembler: ReplyAssembler) -> dict:
        return {**self._head("chat.completion.chunk"), "choices": [], "usage": assembler.usage()}

    def _head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}
