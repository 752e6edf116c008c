"""The HTTP application: OpenAI's endpoints over one loaded model.

`create_app(service)` builds a FastAPI app. Every request is checked (size, API key, JSON, fields,
media) before it takes a place in the worker's queue; answers and refusals use OpenAI's shapes
(`errors`). A client that disconnects cancels its job: a streamed reply is cancelled by Starlette's
disconnect listener, a waiting or non-streamed one by polling the connection between events.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import InputError
from ..generation import GenerationResponse
from .chat import (
    CompletionMeta,
    CountedObjects,
    ReplyAssembler,
    RequestLimits,
    ServerDefaults,
    generation_work,
    parse_chat_request,
)
from .errors import APIError, bad_request, from_input_error, internal_error
from .media import MediaPolicy, convert_messages
from .transcription import FORM_FIELDS, form_settings, instruction, transcription_body, transcription_work
from .worker import DONE, Failure, Job, QueueFull, Result, Worker

log = logging.getLogger("mlx_unified.server")
POLL_SECONDS = 0.25  # how often a waiting request checks that its client is still there
RETRY_AFTER_SECONDS = 1


@dataclass
class Service:
    """Everything the endpoints share: the model, its queue, the limits and defaults."""

    model: Any
    processor: Any
    name: str  # the model id clients send
    worker: Worker
    stop_ids: set[int]
    prefix_cache: Any = None  # the prefix cache shared by every request; None: off
    draft_model: Any = None  # the MTP drafter every reply speculates with (--draft-model); None: off
    policy: MediaPolicy = field(default_factory=MediaPolicy)
    defaults: ServerDefaults = field(default_factory=ServerDefaults)
    max_request_bytes: int = 64 << 20
    api_key: str | None = None
    created: int = 0


class BodyTooLarge(Exception):
    pass


class ClientGone(Exception):
    pass


class Guard:
    """ASGI middleware: the API key and the body size limit, before any endpoint runs."""

    def __init__(self, app: Any, service: Service) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        refusal = self._refusal(scope["path"], headers)
        if refusal is not None:
            await JSONResponse(refusal.body(), refusal.status, refusal.headers)(scope, receive, send)
            return
        limit, received = self.service.max_request_bytes, 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge
            return message

        await self.app(scope, limited_receive, send)

    def _refusal(self, path: str, headers: dict[str, str]) -> APIError | None:
        key = self.service.api_key
        if key and path != "/health":
            given = headers.get("authorization", "")
            token = given[len("Bearer ") :] if given.startswith("Bearer ") else ""
            if not hmac.compare_digest(token.encode(), key.encode()):
                return APIError(
                    401,
                    "missing or wrong API key (send it as 'Authorization: Bearer KEY')",
                    type="authentication_error",
                    code="invalid_api_key",
                )
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return bad_request("Content-Length: not a number")
            if int(length) > self.service.max_request_bytes:
                return too_large(self.service.max_request_bytes)
        return None


def too_large(limit: int) -> APIError:
    return APIError(
        413, f"request body larger than this server's limit of {limit} bytes (--max-request-mb)", code="request_too_large"
    )


def create_app(service: Service) -> FastAPI:
    app = FastAPI(title="mlx-unified", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, service=service)

    @app.exception_handler(APIError)
    async def api_error(_: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), error.status, error.headers)

    @app.exception_handler(InputError)
    async def input_error(_: Request, error: InputError) -> JSONResponse:
        failure = from_input_error(error)
        return JSONResponse(failure.body(), failure.status)

    @app.exception_handler(BodyTooLarge)
    async def body_too_large(_: Request, __: BodyTooLarge) -> JSONResponse:
        error = too_large(service.max_request_bytes)
        return JSONResponse(error.body(), error.status)

    @app.exception_handler(ClientGone)
    async def client_gone(_: Request, __: ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it: the connection is closed

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no endpoint {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        body = APIError(error.status_code, message.get(error.status_code, str(error.detail))).body()
        return JSONResponse(body, error.status_code)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, error: Exception) -> JSONResponse:
        log.error("unexpected error", exc_info=error)
        failure = internal_error()
        return JSONResponse(failure.body(), failure.status)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        worker, counters = service.worker, service.worker.counters
        return {
            "status": "ok",
            "model": service.name,
            "queue": {
                "waiting": worker.waiting,
                "running": worker.running is not None,
                "max_waiting": worker.max_waiting,
                "peak_waiting": counters.peak_waiting,
            },
            "requests": {
                "completed": counters.completed,
                "cancelled": counters.cancelled,
                "failed": counters.failed,
                "refused": counters.refused,
            },
            "cancellation": {
                "max_tokens_after_cancel": counters.max_tokens_after_cancel,
                "max_prefill_chunks_after_cancel": counters.max_chunks_after_cancel,
                "max_seconds_to_free": counters.max_seconds_to_free,
            },
        }

    def model_card() -> dict[str, Any]:
        return {"id": service.name, "object": "model", "created": service.created, "owned_by": "mlx-unified"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        check_model(service, model_id)
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await read_json(request, CountedObjects())
        check_model(service, body.get("model"))
        limits = RequestLimits.of(service.model, service.processor)
        chat = parse_chat_request(body, service.defaults, service.model.config.text.vocab_size, limits)
        queued(service, service.worker.check_room)
        messages = await decoded(convert_messages, chat.messages, service.policy)
        processors = []
        if chat.json_output:
            from ..structured import json_schema_processor

            processor = await decoded(
                json_schema_processor,
                service.processor.tokenizer,
                chat.json_schema,
                service.model.config.text.vocab_size,
                chat.enable_thinking,
            )
            processors.append(processor)
        job = submit(service, generation_work(service, chat, messages, processors))
        first = await next_event(job, request)  # queued, then the prompt is read
        meta = CompletionMeta(service.name)
        assembler = ReplyAssembler(service.processor.tokenizer, service.stop_ids, chat.parallel_tool_calls)
        if chat.stream:
            stream = stream_chat(job, first, meta, assembler, chat.include_usage)
            return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        logprobs: list[dict[str, Any]] = []
        event = first
        while event is not DONE:
            if isinstance(event, GenerationResponse):
                logprobs += assembler.add(event)[1]
            event = await next_event(job, request)
        return JSONResponse(meta.completion(assembler, logprobs if chat.params.logprobs else None))

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request) -> Response:
        try:
            form = await request.form(max_files=1, max_fields=len(FORM_FIELDS))
        except BodyTooLarge:
            raise
        except Exception as error:  # malformed multipart: python-multipart's or Starlette's own error
            raise bad_request(f"not a readable multipart/form-data body ({error})") from error
        check_model(service, form.get("model"))
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise bad_request("file: an audio file upload is required", "file")
        response_format, params = form_settings(form, service.defaults)
        queued(service, service.worker.check_room)
        data = await upload.read()
        from ..processing.limits import SAMPLING_RATE
        from .transcription import decode_upload

        wave = await decoded(decode_upload, data)
        text = instruction(form.get("language"), form.get("prompt"))
        job = submit(service, transcription_work(service, wave, text, params))
        event = await next_event(job, request)
        while not isinstance(event, Result):
            if event is DONE:
                raise internal_error()  # a job ends with its result or its failure
            event = await next_event(job, request)
        body = transcription_body(event.value, response_format, form.get("language"), len(wave) / SAMPLING_RATE)
        return PlainTextResponse(body) if response_format == "text" else JSONResponse(body)

    return app


async def read_json(request: Request, object_pairs_hook: Any = None) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw, object_pairs_hook=object_pairs_hook)
    except (UnicodeDecodeError, ValueError) as error:
        raise bad_request(f"the request body is not valid JSON ({error})", code="invalid_json") from error
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", code="invalid_json")
    return body


def check_model(service: Service, name: Any) -> None:
    if name != service.name:
        raise APIError(
            404,
            f"the model {name!r} does not exist; this server serves {service.name!r}",
            type="invalid_request_error",
            param="model",
            code="model_not_found",
        )


async def decoded(function: Any, *args: Any, param: str | None = None) -> Any:
    """Run decoding work off the event loop; a bad input is a 400."""
    try:
        return await run_in_threadpool(function, *args)
    except InputError as error:
        failure = from_input_error(error)
        failure.param = failure.param or param
        raise failure from error


def queued(service: Service, action: Any, *args: Any) -> Any:
    """`action(*args)` of the worker (`check_room`, `submit`); a full queue is a 503."""
    try:
        return action(*args)
    except QueueFull as error:
        raise APIError(
            503,
            f"the server is busy: {service.worker.max_waiting} requests are already waiting; retry shortly",
            type="server_error",
            code="queue_full",
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        ) from error


def submit(service: Service, work: Any) -> Job:
    return queued(service, service.worker.submit, work)


async def next_event(job: Job, request: Request) -> Any:
    """The job's next event; cancels the job and raises ClientGone if the client has left. A failure
    is raised as the APIError it answers to."""
    while True:
        try:
            event = await asyncio.wait_for(job.events.get(), POLL_SECONDS)
        except TimeoutError:
            event = None
        if await request.is_disconnected():
            job.cancel()
            raise ClientGone
        if isinstance(event, Failure):
            raise failure_error(event.error)
        if event is not None:
            return event


def failure_error(error: BaseException) -> APIError:
    if isinstance(error, APIError):
        return error
    if isinstance(error, InputError):
        return from_input_error(error)
    return internal_error()


async def stream_chat(
    job: Job, first: Any, meta: CompletionMeta, assembler: ReplyAssembler, include_usage: bool
) -> AsyncIterator[str]:
    """The SSE stream: a role chunk, a chunk per visible piece, the finish chunk, usage, [DONE]."""
    usage = {"usage": None} if include_usage else {}
    calls_sent = 0
    pending: list[dict[str, Any]] = []  # logprobs entries not yet sent (their text was held back)
    try:
        yield sse({**meta.chunk({"role": "assistant", "content": ""}), **usage})
        event = first
        while event is not DONE:
            if isinstance(event, Failure):
                yield sse(failure_error(event.error).body())
                return
            if isinstance(event, GenerationResponse):
                delta, entries = assembler.add(event)
                pending += entries
                fields = assembler.delta_fields(delta, calls_sent)
                calls_sent += len(delta.tool_calls)
                if fields:
                    yield sse({**meta.chunk(fields, logprobs=pending), **usage})
                    pending = []
            event = await job.events.get()
        yield sse({**meta.chunk({}, assembler.finish_reason, logprobs=pending), **usage})
        if include_usage:
            yield sse(meta.usage_chunk(assembler))
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()  # the client went away (or the stream ended: then this does nothing)


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

