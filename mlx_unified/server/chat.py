"""`/v1/chat/completions`: OpenAI's request read into our generation call, and the reply written back.

The request's fields map onto `stream_generate` (validated by `GenerationParams`); thinking is turned
on by `reasoning_effort` or `chat_template_kwargs.enable_thinking`; the reply's text is split by
`ReplyParser` into `content`, `reasoning_content` and `tool_calls`.
"""

from __future__ import annotations

import json
import time
import uuid
from contextlib import closing
from dataclasses import asdict, dataclass, field
from typing import Any

from ..generation_params import GenerationParams, ParameterError, check_template_variables
from ..reply_parser import ReplyDelta, ReplyParser
from ..tool_calls import MAX_NESTING, MAX_TOOLS, check_tools, json_fault
from .errors import bad_request
from .media import MEDIA_PART_TYPES
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

# Read before any templating, tokenizing or media decoding, so that a request too large for the model costs
# little. Objects in a body are counted while it is parsed: a policy cap far above any conversation a
# context holds, which keeps a body of a million small messages from being built in memory at all.
MAX_JSON_OBJECTS = 1 << 17
# Fields whose values reach the chat template or the tokenizer: checked for depth and lone surrogates.
TEXT_FIELDS = ("messages", "tools", "chat_template_kwargs", "stop", "response_format")
# Tokens a media item takes at the least: its begin and end markers around one soft token.
MIN_MEDIA_TOKENS = 3
_PART_TYPES = ("text", *MEDIA_PART_TYPES)


@dataclass(frozen=True)
class RequestLimits:
    """What a request certainly cannot exceed and still fit the model: `context_tokens` positions, and
    text of `max_token_chars` characters per token at the most (`Processor.max_token_chars`)."""

    context_tokens: int
    max_token_chars: int

    @classmethod
    def of(cls, model: Any, processor: Any) -> RequestLimits:
        return cls(model.config.text.max_position_embeddings, processor.max_token_chars)


class CountedObjects:
    """`json.loads`' object_pairs_hook for a chat request: refuses the body once it holds more than
    `limit` objects, while it is parsed, so the rest of it is never built. The refusal names `param`, else
    `messages` when most objects are messages or content parts."""

    def __init__(self, limit: int = MAX_JSON_OBJECTS, param: str | None = None) -> None:
        self.limit, self.param, self.objects, self.message_like = limit, param, 0, 0

    def __call__(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        value = dict(pairs)
        self.objects += 1
        if "role" in value or value.get("type") in _PART_TYPES:
            self.message_like += 1
        if self.objects > self.limit:
            param = self.param or ("messages" if 2 * self.message_like >= self.objects else None)
            raise bad_request(
                f"{param or 'the request body'}: more than {self.limit} JSON objects (messages, content parts, "
                "tool definitions) in one request",
                param,
                "request_too_large",
            )
        return value


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


def parse_chat_request(
    body: dict[str, Any], defaults: ServerDefaults, vocab_size: int, limits: RequestLimits | None = None
) -> ChatRequest:
    """A checked request; APIError (400) naming the first field at fault. With `limits`, a request whose
    messages certainly cannot fit the model's context is refused here, before any templating."""
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
    if limits is not None:
        context = limits.context_tokens
        if params.max_kv_size is not None:
            context = min(context, params.max_kv_size)
        _check_fit(body.get("messages"), context, limits.max_token_chars)
    for name in TEXT_FIELDS:
        fault = json_fault(body.get(name), MAX_NESTING)
        if fault is not None:
            raise bad_request(f"{name}{fault[0]}: {fault[1]}", f"{name}{fault[0]}")
    _check_call_arguments(body.get("messages"))
    try:
        requested = check_template_variables(_mapping(body, "chat_template_kwargs"), tools_allowed=False)
    except ParameterError as error:
        raise bad_request(str(error), error.param, "invalid_value") from error
    kwargs = {**defaults.chat_template_kwargs, **requested}
    thinking = defaults.enable_thinking
    effort = body.get("reasoning_effort")
    if effort is not None:
        if not isinstance(effort, str) or effort not in REASONING_EFFORT:
            raise bad_request(
                f"reasoning_effort: expected one of {', '.join(REASONING_EFFORT)}, got {effort!r}", "reasoning_effort"
            )
        thinking = REASONING_EFFORT[effort]
    thinking = kwargs.pop("enable_thinking", thinking)
    tools = _tools(body)
    if tools:
        kwargs.pop("tools", None)  # the request's own replace the server's --chat-template-config ones
    request = ChatRequest(
        body.get("messages"),
        params,
        stream=stream,
        include_usage=_flag(options, "include_usage", False),
        enable_thinking=thinking,
        tools=tools,
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


def _check_fit(messages: Any, context: int, max_token_chars: int) -> None:
    """Refuse messages that certainly cannot fit `context` tokens, counting only what costs no more than
    a pass over them. Gemma 4's template frames every message with two marker tokens (a turn's, or a tool
    result's), except an assistant reply that joins the turn of the tool results before it, which takes
    none but follows a tool message of its own: at least one marker token per message. Each media item
    takes `MIN_MEDIA_TOKENS`; text of a person's or a tool's message
    (trimmed, as the template trims it) takes a token per `max_token_chars` characters at the least. An
    assistant's text is not counted: the template drops its thinking. A content part takes a token at
    the least (or is empty, and worth nothing), so no more parts than the context's tokens are taken.
    Messages of the wrong shape are left to `media.convert_messages`, which names them."""
    if not isinstance(messages, list):
        return
    if len(messages) > context:
        raise bad_request(
            f"messages: {len(messages)} messages; the model's context holds {context} tokens and each message "
            "takes at least one",
            "messages",
            "context_length_exceeded",
        )
    parts = media = chars = 0
    for message in messages:
        if not isinstance(message, dict):
            continue
        counted = message.get("role") != "assistant"
        content = message.get("content")
        if isinstance(content, str):
            chars += len(content.strip()) if counted else 0
        elif isinstance(content, list):
            parts += len(content)
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    chars += len(part["text"].strip()) if counted else 0
                elif kind in MEDIA_PART_TYPES:
                    media += 1
    if parts > context:
        raise bad_request(
            f"messages: {parts} content parts; the model's context holds {context} tokens",
            "messages",
            "context_length_exceeded",
        )
    least = -(-chars // max_token_chars) + MIN_MEDIA_TOKENS * media + len(messages)
    if least > context:
        raise bad_request(
            f"messages: at least {least} tokens ({chars} characters of text, {media} media items); the "
            f"model's context holds {context}",
            "messages",
            "context_length_exceeded",
        )


def _check_call_arguments(messages: Any) -> None:
    """Tool-call arguments sent as JSON strings (OpenAI's form), read now as the template will read them:
    JSON, within `MAX_NESTING` levels, without lone surrogates."""
    for index, message in enumerate(messages if isinstance(messages, list) else ()):
        calls = message.get("tool_calls") if isinstance(message, dict) else None
        for number, call in enumerate(calls if isinstance(calls, list) else ()):
            function = call.get("function") if isinstance(call, dict) else None
            arguments = function.get("arguments") if isinstance(function, dict) else None
            if not isinstance(arguments, str) or not arguments:
                continue
            where = f"messages[{index}].tool_calls[{number}].function.arguments"
            try:
                fault = json_fault(json.loads(arguments, object_pairs_hook=CountedObjects(param=where)), MAX_NESTING)
            except RecursionError:
                fault = ("", f"nested more than {MAX_NESTING} levels deep")
            except ValueError as error:
                raise bad_request(f"{where}: not JSON ({error})", where) from error
            if fault is not None:
                raise bad_request(f"{where}{fault[0]}: {fault[1]}", where)


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
    if isinstance(tools, list) and len(tools) > MAX_TOOLS:
        raise bad_request(f"tools: {len(tools)} tool definitions; at most {MAX_TOOLS} are taken", "tools")
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
    """The job that answers one chat request on the worker thread. The prompt is templated and tokenized
    first (bounded by the request's limits, `parse_chat_request`), then a client that has left ends the job
    before the model runs; after that, at the next prefill chunk or token (`Job`)."""
    from ..generation import stream_generate, template_settings

    def work(job: Job) -> None:
        settings = template_settings(request.enable_thinking, request.tools, request.chat_template_kwargs)
        inputs = service.processor(messages, chat_template_kwargs=settings)
        job.checkpoint()
        replies = stream_generate(
            service.model,
            service.processor,
            inputs,
            prefill_progress=job.prefill_progress,
            logits_processors=processors,
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
