"""Generation, in mlx-lm's shape: `generate_step` yields tokens one at a time after a chunked prefill;
`stream_generate` adds the chat template, the prefix cache, detokenizing and statistics; `generate`
collects a whole reply. Sampling and logits processors are mlx-lm's."""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.sample_utils import greedy_sampler, make_logits_processors, make_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .cache import LayerCache, maybe_quantize
from .emphasis import SpanBias, audio_emphasis_bias
from .kv_quantization import (
    DEFAULT_KV_GROUP_SIZE,
    DEFAULT_QUANTIZED_KV_START,
    KVQuantization,
    kv_quantization,
)
from .model import Model
from .prefill import ProgressCallback, SnapshotCallback, prefill
from .prefix_cache import PrefixCache, default_prefix_cache, plan_prefix
from .processing import TURN_END, build_messages

# sampler(logprobs [B, vocab]) -> tokens [B]; processor(tokens so far, logits [B, vocab]) -> logits.
Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


@dataclass
class GenerationStats:
    prompt_tokens: int
    prompt_tps: float  # prompt tokens / time to first token
    generation_tokens: int
    generation_tps: float  # tokens after the first / their decoding time
    ttft_s: float  # time to first token, prompt processing included
    peak_memory_gb: float
    finish_reason: str | None = None  # "stop", "length" or None while running
    cached_tokens: int = 0  # prompt tokens whose KV state came from the prefix cache


@dataclass
class GenerationResponse(GenerationStats):
    """One streamed step: the new text and the running statistics."""

    text: str = ""
    token: int | None = None


@dataclass
class GenerationResult(GenerationStats):
    """A whole reply and its statistics."""

    text: str = ""
    tokens: list[int] = field(default_factory=list)


def peak_memory_gb() -> float:
    """MLX's peak allocation; on backends that do not track it, the process's peak resident size."""
    peak = mx.get_peak_memory()
    if peak == 0:
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    return peak / 1e9


def generate_step(
    model: Model,
    inputs: dict[str, Any],
    *,
    prompt_cache: list[LayerCache] | None = None,
    max_tokens: int = 256,
    sampler: Sampler | None = None,
    logits_processors: Sequence[LogitsProcessor] = (),
    key_bias: SpanBias | None = None,
    prefill_chunk_size: int | None = None,
    prefill_progress: ProgressCallback | None = None,
    embeddings: mx.array | None = None,
    snapshot_at: Sequence[int] = (),
    on_snapshot: SnapshotCallback | None = None,
    kv_bits: int | None = None,
    kv_group_size: int = DEFAULT_KV_GROUP_SIZE,
    quantized_kv_start: int = DEFAULT_QUANTIZED_KV_START,
) -> Iterator[tuple[int, mx.array]]:
    """Yield (token, logprobs [vocab]) for the prompt `inputs` (the processor's arrays, batch 1): the
    first after a chunked prefill (`prefill.prefill`), then one per decode step, max(max_tokens, 1) in
    all. The caller stops it at a stop token; each step is scheduled before the previous token is
    handed out, so the device works while the caller reads it.

    prompt_cache: the model's per-layer caches to extend (default: fresh ones); prefill starts at their
    offset, and they hold the whole sequence afterwards. sampler: takes log-probabilities (mlx-lm's
    `make_sampler`); None is greedy, the argmax of the logits themselves, which the log-softmax would
    not move (the yielded logprobs are then computed only if the caller evaluates them).
    key_bias: the global layers' score bias (audio emphasis). embeddings: the prompt's, when already
    computed. snapshot_at / on_snapshot: where prefill ends a chunk to hand its cache out.
    kv_bits / kv_group_size / quantized_kv_start: mlx-lm's KV-cache quantization (`kv_quantization.KVQuantization`):
    once the cache holds quantized_kv_start positions, every layer's cache is quantized to kv_bits
    (4 or 8) in groups of kv_group_size, in `prompt_cache` itself; None keeps it in float.
    """
    input_ids = np.asarray(inputs["input_ids"])
    kv = model_kv_quantization(model, kv_bits, kv_group_size, quantized_kv_start)
    cache = model.make_cache() if prompt_cache is None else prompt_cache
    history = mx.array(input_ids[0].astype(np.int32))

    def sample(logits: mx.array) -> tuple[mx.array, mx.array]:
        nonlocal history
        logits = logits[:, -1, :]
        for processor in logits_processors:
            logits = processor(history, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        token = greedy_sampler(logits) if sampler is None else sampler(logprobs)
        history = mx.concatenate([history, token])
        return token, logprobs.squeeze(0)

    def step(token: mx.array) -> tuple[mx.array, mx.array]:
        maybe_quantize(cache, kv)
        return sample(model.forward_embeddings(model.embed_text(token[None]), cache=cache, key_bias=key_bias))

    logits = prefill(
        model,
        inputs,
        cache,
        prefill_chunk_size,
        prefill_progress,
        embeddings=embeddings,
        key_bias=key_bias,
        snapshot_at=snapshot_at,
        on_snapshot=on_snapshot,
        kv_quantization=kv,
    )
    token, logprobs = sample(logits)
    # Evaluated alone: scheduled together with the next step, the first token would wait for that step.
    mx.eval(token)
    for generated in range(1, max(max_tokens, 1) + 1):
        upcoming = step(token) if generated < max_tokens else None
        if upcoming is not None:
            mx.async_eval(upcoming[0])
        yield int(token.item()), logprobs
        if upcoming is None:
            return
        token, logprobs = upcoming


def model_kv_quantization(
    model: Model, kv_bits: int | None, kv_group_size: int, quantized_kv_start: int
) -> KVQuantization | None:
    """The KV quantization these arguments ask for, checked against the model's head dims."""
    kv = kv_quantization(kv_bits, kv_group_size, quantized_kv_start)
    if kv is not None:
        kv.check([layer.self_attn.shape.head_dim for layer in model.language_model.layers])
    return kv


def stop_token_ids(model: Model, tokenizer: Any) -> set[int]:
    """eos ids from the config, plus the end-of-turn token of the chat template."""
    stops = set(model.config.text.eos_token_ids)
    turn_end = tokenizer.convert_tokens_to_ids(TURN_END)
    if isinstance(turn_end, int) and turn_end != getattr(tokenizer, "unk_token_id", None):
        stops.add(turn_end)
    return stops


def prepare_inputs(
    processor: Any,
    prompt: Any,
    image_tokens: int | None = None,
    media_first: bool = True,
    **media: Any,
) -> dict[str, Any]:
    """Arrays for the model from a text prompt, a list of chat messages, or ready-made arrays.

    `media_first` (default): media items move before the text of their turn; False keeps each turn's
    content in the order given (text, then media, then e.g. a task reminder)."""
    if isinstance(prompt, dict):
        return prompt
    messages = build_messages(prompt, **media) if isinstance(prompt, str) else prompt
    return processor(messages, image_tokens=image_tokens, media_first=media_first)


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
    prefill_chunk_size: int | None = None,
    prefill_progress: ProgressCallback | None = None,
    sampler: Sampler | None = None,
    logits_processors: list[LogitsProcessor] | None = None,
    audio_emphasis: float = 1.0,
    media_first: bool = True,
    task_reminder: str | None = None,
    prefix_cache: PrefixCache | None = None,
    use_prefix_cache: bool = True,
    kv_bits: int | None = None,
    kv_group_size: int = DEFAULT_KV_GROUP_SIZE,
    quantized_kv_start: int = DEFAULT_QUANTIZED_KV_START,
) -> Iterator[GenerationResponse]:
    """Yield the reply piece by piece. `prompt`: user text (with `system`/`images`/`audios`/`videos`),
    chat messages, or the processor's output dict.

    audio_emphasis: in (0, 1]; below 1, global layers scale the attention paid outside the audio
    span by this factor (renormalized), see `emphasis.audio_emphasis_bias`. 1 = off (exactly the
    plain model). media_first / task_reminder: prompt placement, see `prepare_inputs` and
    `processing.build_messages`. prefix_cache: the prefix cache to reuse and fill (default: the model's
    own in-memory one, see `prefix_cache.default_prefix_cache`); use_prefix_cache=False runs the whole
    prompt and stores nothing. Output is identical with and without the prefix cache.
    kv_bits / kv_group_size / quantized_kv_start: quantize the KV cache, as mlx-lm (see
    `generate_step`); prefixes computed with these settings are stored and reused only with them."""
    kv = model_kv_quantization(model, kv_bits, kv_group_size, quantized_kv_start)
    if seed is not None:
        mx.random.seed(seed)
    tokenizer = processor.tokenizer
    detokenizer = TokenizerWrapper(tokenizer).detokenizer
    stops = stop_token_ids(model, tokenizer)
    if sampler is None and temperature != 0:
        sampler = make_sampler(temp=temperature, top_p=top_p, min_p=min_p, top_k=top_k)
    if logits_processors is None:
        logits_processors = make_logits_processors(
            repetition_penalty=repetition_penalty, repetition_context_size=repetition_context_size
        )
    mx.reset_peak_memory()
    started = time.perf_counter()
    media_items = dict(system=system, images=images, audios=audios, videos=videos)
    if task_reminder is not None and isinstance(prompt, str):
        media_items["task_reminder"] = task_reminder
    inputs = prepare_inputs(processor, prompt, image_tokens, media_first, **media_items)
    input_ids = np.asarray(inputs["input_ids"])
    num_prompt = input_ids.shape[1]
    key_bias = audio_emphasis_bias(
        input_ids, inputs.get("mm_token_type_ids"), model.config.audio_token_id, audio_emphasis
    )
    embeddings = model.embed_inputs(mx.array(input_ids), inputs)
    if not use_prefix_cache:
        prefix_cache = None
    elif prefix_cache is None:
        prefix_cache = default_prefix_cache(model)
    plan = plan_prefix(model, tokenizer, prefix_cache, input_ids, embeddings, key_bias, kv)
    tokens = generate_step(
        model,
        inputs,
        prompt_cache=plan.prompt_cache,
        max_tokens=max_tokens,
        sampler=sampler,
        logits_processors=logits_processors,
        key_bias=key_bias,
        prefill_chunk_size=prefill_chunk_size,
        prefill_progress=prefill_progress,
        embeddings=embeddings,
        snapshot_at=plan.snapshot_at,
        on_snapshot=plan.on_snapshot,
        kv_bits=kv_bits,
        kv_group_size=kv_group_size,
        quantized_kv_start=quantized_kv_start,
    )
    for generated, (token, _) in enumerate(tokens, start=1):
        if generated == 1:
            prompt_time = time.perf_counter() - started
            decode_started = time.perf_counter()
        finish = "stop" if token in stops else ("length" if generated >= max_tokens else None)
        if finish != "stop":
            detokenizer.add_token(token)
        if finish:
            detokenizer.finalize()
        elapsed = time.perf_counter() - decode_started
        yield GenerationResponse(
            text=detokenizer.last_segment,
            token=token,
            prompt_tokens=num_prompt,
            prompt_tps=num_prompt / prompt_time,
            generation_tokens=generated,
            generation_tps=(generated - 1) / elapsed if generated > 1 and elapsed > 0 else 0.0,
            ttft_s=prompt_time,
            peak_memory_gb=peak_memory_gb(),
            finish_reason=finish,
            cached_tokens=plan.reused,
        )
        if finish:
            return


def generate(model: Model, processor: Any, prompt: Any, **kwargs: Any) -> GenerationResult:
    """The whole reply at once, with its statistics. Takes the arguments of `stream_generate`."""
    text, tokens, last = [], [], None
    for last in stream_generate(model, processor, prompt, **kwargs):
        text.append(last.text)
        tokens.append(last.token)
    stats = {f.name: getattr(last, f.name) for f in fields(GenerationStats)}
    return GenerationResult(**stats, text="".join(text), tokens=tokens)
