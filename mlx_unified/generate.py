"""Generation: chunked prefill, then token-by-token decoding with mlx-lm's sampler and detokenizer."""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.sample_utils import make_logits_processors, make_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .cache import LayerCache
from .masks import vision_block_ids
from .model import Model

MEDIA_KEYS = (
    "pixel_values",
    "image_position_ids",
    "pixel_values_videos",
    "video_position_ids",
    "input_features",
    "input_features_mask",
)
TURN_END = "<turn|>"
ProgressCallback = Callable[[int, int], None]


@dataclass
class GenerationResponse:
    """One streamed step: the new text and the running statistics."""

    text: str
    token: int | None
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    ttft_s: float
    peak_memory_gb: float
    finish_reason: str | None = None  # "stop", "length" or None while running


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    ttft_s: float
    peak_memory_gb: float
    finish_reason: str
    stats: dict[str, float] = field(default_factory=dict)


def peak_memory_gb() -> float:
    """MLX's peak allocation; on backends that do not track it, the process's peak resident size."""
    peak = mx.get_peak_memory()
    if peak == 0:
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    return peak / 1e9


def prefill_chunks(mm_token_type_ids: np.ndarray | None, length: int, chunk_size: int) -> list[tuple[int, int]]:
    """Split [0, length) into chunks of about chunk_size tokens, never cutting an image/video block
    (its tokens attend to each other both ways, so a block must be seen whole)."""
    blocks = None if mm_token_type_ids is None else vision_block_ids(np.asarray(mm_token_type_ids)[:1])[0]
    spans, start = [], 0
    while start < length:
        end = min(start + chunk_size, length)
        if blocks is not None and end < length and blocks[end] >= 0 and blocks[end] == blocks[end - 1]:
            block = blocks[end]
            first = int(np.argmax(blocks == block))
            last = int(len(blocks) - np.argmax(blocks[::-1] == block))
            end = first if first > start else last
        spans.append((start, end))
        start = end
    return spans


def prefill(
    model: Model,
    inputs: dict[str, Any],
    cache: list[LayerCache],
    chunk_size: int = 512,
    progress: ProgressCallback | None = None,
    logits_to_keep: int = 1,
) -> mx.array:
    """Run the prompt through the model in bounded-memory chunks; logits of the last positions only.

    Chunks also bound the sliding layers' work: a chunk of C queries attends to at most W - 1 + C keys,
    where a whole-prompt pass computes L x L scores for every layer.
    """
    input_ids = np.asarray(inputs["input_ids"])
    media = {k: inputs[k] for k in MEDIA_KEYS if inputs.get(k) is not None}
    h = model.embed(mx.array(input_ids), **media)
    mm = inputs.get("mm_token_type_ids")
    mm = None if mm is None else np.asarray(mm)
    length = input_ids.shape[1]
    spans = prefill_chunks(mm, length, chunk_size)
    logits = None
    for start, end in spans:
        last = end == length
        logits = model.forward_embeddings(
            h[:, start:end],
            cache=cache,
            mm_token_type_ids=None if mm is None else mm[:, start:end],
            logits_to_keep=logits_to_keep if last else 1,
        )
        mx.eval(logits, [c.state for c in cache])
        mx.clear_cache()
        if progress is not None:
            progress(end, length)
    return logits


def stop_token_ids(model: Model, tokenizer: Any) -> set[int]:
    """eos ids from the config, plus the end-of-turn token of the chat template."""
    stops = set(model.config.text.eos_token_ids)
    turn_end = tokenizer.convert_tokens_to_ids(TURN_END)
    if isinstance(turn_end, int) and turn_end != getattr(tokenizer, "unk_token_id", None):
        stops.add(turn_end)
    return stops


def build_messages(
    prompt: str,
    system: str | None = None,
    images: Sequence[Any] = (),
    audios: Sequence[Any] = (),
    videos: Sequence[Any] = (),
) -> list[dict[str, Any]]:
    """A one-turn conversation; media go before the text of the turn (the model's trained order)."""
    content = [{"type": "image", "image": x} for x in images]
    content += [{"type": "video", "video": x} for x in videos]
    content += [{"type": "audio", "audio": x} for x in audios]
    content.append({"type": "text", "text": prompt})
    messages = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
    return [*messages, {"role": "user", "content": content}]


def prepare_inputs(processor: Any, prompt: Any, image_tokens: int | None = None, **media: Any) -> dict[str, Any]:
    """Arrays for the model from a text prompt, a list of chat messages, or ready-made arrays."""
    if isinstance(prompt, dict):
        return prompt
    messages = build_messages(prompt, **media) if isinstance(prompt, str) else prompt
    return processor(messages, image_tokens=image_tokens)


def stream_generate(
    model: Model,
    processor: Any,
    prompt: str | list[dict[str, Any]] | dict[str, Any],
    *,
    system: str | None = None,
    images: Sequence[Any] = (),
    audios: Sequence[Any] = (),
    videos: Sequence[Any] = (),
    image_tokens: int | None = None,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float | None = None,
    repetition_context_size: int = 20,
    seed: int | None = None,
    prefill_chunk_size: int = 512,
    prefill_progress: ProgressCallback | None = None,
    sampler: Callable[[mx.array], mx.array] | None = None,
    logits_processors: list[Callable[[mx.array, mx.array], mx.array]] | None = None,
) -> Iterator[GenerationResponse]:
    """Yield the reply piece by piece. `prompt`: user text (with `system`/`images`/`audios`/`videos`),
    chat messages, or the processor's output dict."""
    if seed is not None:
        mx.random.seed(seed)
    tokenizer = processor.tokenizer
    detokenizer = TokenizerWrapper(tokenizer).detokenizer
    stops = stop_token_ids(model, tokenizer)
    sampler = sampler or make_sampler(temp=temperature, top_p=top_p, min_p=min_p, top_k=top_k)
    if logits_processors is None:
        logits_processors = make_logits_processors(
            repetition_penalty=repetition_penalty, repetition_context_size=repetition_context_size
        )
    mx.reset_peak_memory()
    started = time.perf_counter()
    inputs = prepare_inputs(processor, prompt, image_tokens, system=system, images=images, audios=audios, videos=videos)
    prompt_ids = mx.array(np.asarray(inputs["input_ids"]).astype(np.int32))
    num_prompt = prompt_ids.shape[1]
    cache = model.make_cache()
    logits = prefill(model, inputs, cache, prefill_chunk_size, prefill_progress)
    history = prompt_ids[0]
    media_ids = mx.array(model.config.media_token_ids)
    pad = model.config.text.pad_token_id

    def sample(logits: mx.array) -> mx.array:
        nonlocal history
        logits = logits[:, -1, :]
        for processor_fn in logits_processors:
            logits = processor_fn(history, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        token = sampler(logprobs)
        history = mx.concatenate([history, token])
        return token

    def step(token: mx.array) -> mx.array:
        # As the reference: a placeholder id is embedded as padding.
        token = mx.where((token[:, None] == media_ids).any(axis=-1), pad, token)
        h = model.language_model.embed(token[None])
        return sample(model.forward_embeddings(h, cache=cache))

    token = sample(logits)
    mx.eval(token)
    prompt_time = time.perf_counter() - started
    prompt_tps = num_prompt / prompt_time
    decode_started = time.perf_counter()
    generated = 0
    while True:
        next_token = step(token) if generated + 1 < max_tokens else None
        if next_token is not None:
            mx.async_eval(next_token)
        value = int(token.item())
        generated += 1
        finish = "stop" if value in stops else ("length" if generated >= max_tokens else None)
        if finish != "stop":
            detokenizer.add_token(value)
        if finish:
            detokenizer.finalize()
        elapsed = time.perf_counter() - decode_started
        yield GenerationResponse(
            text=detokenizer.last_segment,
            token=value,
            prompt_tokens=num_prompt,
            prompt_tps=prompt_tps,
            generation_tokens=generated,
            generation_tps=(generated - 1) / elapsed if generated > 1 and elapsed > 0 else 0.0,
            ttft_s=prompt_time,
            peak_memory_gb=peak_memory_gb(),
            finish_reason=finish,
        )
        if finish:
            return
        token = next_token


def generate(model: Model, processor: Any, prompt: Any, **kwargs: Any) -> GenerationResult:
    """The whole reply at once, with its statistics. Takes the arguments of `stream_generate`."""
    text, tokens, last = [], [], None
    for last in stream_generate(model, processor, prompt, **kwargs):
        text.append(last.text)
        tokens.append(last.token)
    return GenerationResult(
        text="".join(text),
        tokens=tokens,
        prompt_tokens=last.prompt_tokens,
        prompt_tps=last.prompt_tps,
        generation_tokens=last.generation_tokens,
        generation_tps=last.generation_tps,
        ttft_s=last.ttft_s,
        peak_memory_gb=last.peak_memory_gb,
        finish_reason=last.finish_reason,
    )
