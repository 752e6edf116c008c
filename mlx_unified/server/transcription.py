"""`/v1/audio/transcriptions`: a recording of any length, cut on speech pauses and transcribed in order.

The upload is decoded before the request is queued; on the worker it goes through the long-audio path
(`processing.run_long_audio`: voice-activity detection, cuts in the pauses, segments of at most 30 s),
each segment answered by the model with the transcription instruction.

Recordings of up to `MAX_RECORDING_SECONDS` (three hours) are taken: a longer one is refused from its
header or as soon as decoding passes the limit, and decoding keeps only the 16 kHz mono waveform, so an
upload that expands to far more audio than its size suggests costs neither memory nor time.
"""

from __future__ import annotations

from contextlib import closing
from dataclasses import asdict
from typing import Any

from ..generation_params import GenerationParams
from ..processing.errors import MediaError
from ..processing.limits import MAX_RECORDING_SECONDS
from ..reply_parser import parse_reply
from .errors import bad_request
from .worker import Job, Result

INSTRUCTION = "Transcribe the speech in this recording, word for word."
RESPONSE_FORMATS = ("json", "text", "verbose_json")
FORM_FIELDS = {"file", "model", "response_format", "language", "prompt", "temperature", "stream"}


def instruction(language: str | None, prompt: str | None) -> str:
    """The request's instruction: the language and the client's context prompt added when given."""
    text = INSTRUCTION
    if language:
        text += f" The speech is in the language with code {language!r}."
    if prompt:
        text += f" Context (names, spelling, style): {prompt}"
    return text


def form_settings(form: Any, defaults: Any) -> tuple[str, GenerationParams]:
    """(response_format, generation parameters) from the multipart form (the rest from the server's
    `ServerDefaults`); APIError for bad fields."""
    unknown = sorted(set(form.keys()) - FORM_FIELDS)
    if unknown:
        raise bad_request(f"unrecognized form field: {unknown[0]}", unknown[0], "unknown_parameter")
    if form.get("stream") not in (None, "false", "False"):
        raise bad_request("stream: streamed transcription is not supported", "stream", "unsupported_value")
    response_format = form.get("response_format") or "json"
    if response_format not in RESPONSE_FORMATS:
        raise bad_request(
            f"response_format: expected one of {', '.join(RESPONSE_FORMATS)}, got {response_format!r}",
            "response_format",
            "unsupported_value",
        )
    temperature = form.get("temperature") or "0"
    try:
        value = float(temperature)
    except ValueError as error:
        raise bad_request(f"temperature: not a number: {temperature!r}", "temperature") from error
    params = GenerationParams(
        max_tokens=defaults.params.max_tokens,
        temperature=value,
        prefill_chunk_size=defaults.params.prefill_chunk_size,
        max_kv_size=defaults.params.max_kv_size,
        kv_bits=defaults.params.kv_bits,
        kv_group_size=defaults.params.kv_group_size,
        quantized_kv_start=defaults.params.quantized_kv_start,
    )
    return response_format, params.validate()


def decode_upload(data: bytes) -> Any:
    """The uploaded recording as 16 kHz mono float32; a file that cannot be used (unreadable, empty,
    corrupt, longer than `MAX_RECORDING_SECONDS`) is a 400 `invalid_media` naming the `file` field."""
    from ..processing import load_audio

    try:
        return load_audio(data, max_seconds=MAX_RECORDING_SECONDS)
    except MediaError as error:
        raise bad_request(f"file: {error}", "file", "invalid_media") from error


def transcription_work(service: Any, wave: Any, text: str, params: GenerationParams) -> Any:
    """The job: every segment through `stream_generate`, the joined text as the result."""
    from ..generation import stream_generate
    from ..processing import run_long_audio, user_turn

    def work(job: Job) -> None:
        def run_segment(samples: Any) -> str:
            replies = stream_generate(
                service.model,
                service.processor,
                [user_turn(text, audios=[samples])],
                prefill_progress=job.prefill_progress,
                prefix_cache=service.prefix_cache,
                use_prefix_cache=service.prefix_cache is not None,
                **asdict(params),
            )
            pieces = []
            with closing(replies):
                for response in replies:
                    job.token_done()
                    pieces.append(response.text)
            return parse_reply("".join(pieces), service.processor.tokenizer).content

        job.emit(Result(run_long_audio(wave, run_segment, progress=False)))

    return work


def transcription_body(result: Any, response_format: str, language: str | None, duration: float) -> Any:
    """OpenAI's `json` / `verbose_json` body (segments with start and end seconds), or the `text`."""
    if response_format == "text":
        return result.text
    if response_format == "json":
        return {"text": result.text}
    segments = [
        {"id": i, "start": segment.start, "end": segment.end, "text": text}
        for i, (segment, text) in enumerate(zip(result.segments, result.texts, strict=True))
    ]
    return {
        "task": "transcribe",
        "language": language or "unknown",
        "duration": duration,
        "text": result.text,
        "segments": segments,
    }
