"""Generation: chunked prefill, then token-by-token decoding with mlx-lm's sampler and detokenizer."""

from __future__ import annotations

import math
import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .cache import LayerCache
from .generation_params import GenerationParams, ParameterError
from .kernels import SpanBias
from .masks import inside_block, unsplit_spans, vision_block_ids
from .memory import PREFILL_CHUNK, prefill_score_bytes, prefix_store_bytes
from .model import Model
from .processing import system_turn, user_turn
from .prompt_cache import (
    PrefixKeys,
    PrefixState,
    PromptCache,
    last_user_turn_start,
    matches_model,
    media_rows,
    restore_cache,
    snapshot_cache,
)
from .reply_parser import parse_reply
from .stop_strings import StopStrings
from .tool_calls import ToolCall, check_tools

TURN_END = "<turn|>"
TURN_START = "<|turn>"
TOOL_RESPONSE = "<|tool_response>"  # a model ends its output with it after a function call
AUDIO_TYPE = 3  # mm_token_type_ids value of audio soft tokens
ProgressCallback = Callable[[int, int], None]
SnapshotCallback = Callable[[int, list[LayerCache]], None]


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
    logprob: float | None = None  # the token's log-probability, when `logprobs` was asked
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)  # likeliest (token, logprob)


@dataclass
class GenerationResult(GenerationStats):
    """A whole reply and its statistics. `text` is everything the model wrote; `content` the answer,
    `reasoning` its thought channel, `tool_calls` the function calls it made (see `reply_parser`)."""

    text: str = ""
    tokens: list[int] = field(default_factory=list)
    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)


def peak_memory_gb() -> float:
    """MLX's peak allocation; on backends that do not track it, the process's peak resident size."""
    peak = mx.get_peak_memory()
    if peak == 0:
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    return peak / 1e9


def prefill_chunks(
    mm_token_type_ids: np.ndarray | None,
    length: int,
    chunk_size: int,
    start: int = 0,
    boundaries: Sequence[int] = (),
) -> list[tuple[int, int]]:
    """Split [start, length) into passes of about chunk_size tokens, never cutting an image/video
    block (its tokens attend to each other both ways, so a block must be seen whole). A pass also
    ends at each of `boundaries` that is not inside a block (where prefix snapshots are taken)."""
    blocks = None if mm_token_type_ids is None else vision_block_ids(np.asarray(mm_token_type_ids)[:1])
    spans: list[tuple[int, int]] = []
    for stop in sorted({b for b in boundaries if start < b < length and not inside_block(blocks, b)} | {length}):
        spans += unsplit_spans(blocks, start, stop, chunk_size)
        start = stop
    return spans


def prefill(
    model: Model,
    inputs: dict[str, Any],
    cache: list[LayerCache],
    chunk_size: int | None = None,
    progress: ProgressCallback | None = None,
    logits_to_keep: int = 1,
    *,
    embeddings: mx.array | None = None,
    key_bias: SpanBias | None = None,
    snapshot_at: Sequence[int] = (),
    on_snapshot: SnapshotCallback | None = None,
) -> mx.array:
    """Run the prompt through the model in bounded-memory chunks; logits of the last positions only.

    Starts at the cache's offset (a restored prefix is not run again). `embeddings`: the prompt's
    embeddings when already computed. A chunk ends at each of `snapshot_at`, where
    `on_snapshot(position, cache)` is called.

    Passes are at most `chunk_size` tokens (default: `memory.PREFILL_CHUNK`). Attention
    runs a block of queries at a time, sized so that one block's scores fit a quarter of the memory
    left beside the weights (`memory.prefill_score_bytes`, `memory.query_block`).
    """
    input_ids = np.asarray(inputs["input_ids"])
    if embeddings is None:
        embeddings = model.embed_inputs(mx.array(input_ids), inputs)
    mm = inputs.get("mm_token_type_ids")
    mm = None if mm is None else np.asarray(mm)
    length = input_ids.shape[1]
    start = cache[0].offset
    if not 0 <= start < length:
        raise ValueError(
            f"the cache holds {start} positions; the prompt has {length}: nothing left to prefill"
        )
    logits = None
    chunk_size = chunk_size or PREFILL_CHUNK
    score_bytes = prefill_score_bytes(model.nbytes)
    for begin, end in prefill_chunks(mm, length, chunk_size, start, snapshot_at):
        last = end == length
        logits = model.forward_embeddings(
            embeddings[:, begin:end],
            cache=cache,
            mm_token_type_ids=None if mm is None else mm[:, begin:end],
            logits_to_keep=logits_to_keep if last else 1,
            key_bias=key_bias,
            score_bytes=score_bytes,
        )
        mx.eval(logits, [c.state for c in cache])
        mx.clear_cache()
        if on_snapshot is not None and end in snapshot_at:
            on_snapshot(end, cache)
        if progress is not None:
            progress(end, length)
    return logits


def prefill_progress_bar(min_tokens: int = 2048, file: Any = None) -> ProgressCallback:
    """A `prefill_progress` callback drawing a tqdm bar (on stderr) for prompts of at least
    `min_tokens` tokens; a new bar starts with each prefill (it opens at the restored prefix)."""
    from tqdm import tqdm

    bar: tqdm | None = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(
                total=total,
                initial=done,
                unit="tok",
                desc="prefill",
                file=file or sys.stderr,
                leave=False,
                disable=total < min_tokens,
            )
        else:
            bar.update(done - bar.n)
        if done >= total:
            bar.close()
            bar = None

    return update


def audio_emphasis_bias(
    input_ids: np.ndarray, mm_token_type_ids: np.ndarray | None, audio_token_id: int, emphasis: float
) -> SpanBias | None:
    """The global-layer key bias for `audio_emphasis = emphasis`, or None when off.

    Scaling the attention probabilities outside the audio span by `emphasis` and renormalizing equals
    adding -log(emphasis) to the scores of the span's keys (post-hoc attention steering). With several
    clips the span runs from the first audio token to the last (text between clips is emphasized
    too). 1.0 (the default) builds no bias at all, so the model runs exactly as without the option.
    """
    try:
        value = float(emphasis)
    except (TypeError, ValueError):
        value = math.nan
    if not 0 < value <= 1:  # also refuses NaN
        raise ValueError(
            f"audio_emphasis must be a number in (0, 1] (1 = off, smaller = more attention to the audio), "
            f"got {emphasis!r}"
        )
    if value == 1.0:
        return None
    ids = np.asarray(input_ids).reshape(-1)
    is_audio = (
        ids == audio_token_id
        if mm_token_type_ids is None
        else np.asarray(mm_token_type_ids).reshape(-1) == AUDIO_TYPE
    )
    positions = np.nonzero(is_audio)[0]
    if len(positions) == 0:
        return None  # no audio: nothing to emphasize
    return SpanBias(int(positions[0]), int(positions[-1]) + 1, -math.log(value))


def stop_token_ids(model: Model, tokenizer: Any) -> set[int]:
    """eos ids from the config, plus the chat template's end of turn and the token that ends a function
    call (the released `generation_config.json` lists both)."""
    stops = set(model.config.text.eos_token_ids)
    for marker in (TURN_END, TOOL_RESPONSE):
        token = tokenizer.convert_tokens_to_ids(marker)
        if isinstance(token, int) and token != getattr(tokenizer, "unk_token_id", None):
            stops.add(token)
    return stops


def build_messages(
    prompt: str,
    system: str | None = None,
    images: Sequence[Any] = (),
    audios: Sequence[Any] = (),
    videos: Sequence[Any] = (),
    task_reminder: str | None = None,
) -> list[dict[str, Any]]:
    """A one-turn conversation (see `processing.user_turn` for the placement of media and reminder)."""
    messages = [system_turn(system)] if system else []
    return [*messages, user_turn(prompt, images, audios, videos, task_reminder)]


def prepare_inputs(
    processor: Any,
    prompt: Any,
    image_tokens: int | None = None,
    media_first: bool = True,
    chat_template_kwargs: dict[str, Any] | None = None,
    **media: Any,
) -> dict[str, Any]:
    """Arrays for the model from a text prompt, a list of chat messages, or ready-made arrays.

    `media_first` (default): media items move before the text of their turn; False keeps each turn's
    content in the order given (text, then media, then e.g. a task reminder). `chat_template_kwargs`
    go to the chat template (they need messages or a text prompt)."""
    if isinstance(prompt, dict):
        # Settings that leave the template as it is (thinking off, no tools) are fine without one.
        if any(value not in (None, False, [], {}) for value in (chat_template_kwargs or {}).values()):
            raise ParameterError(
                ", ".join(chat_template_kwargs), "needs chat messages or a text prompt, not ready-made arrays"
            )
        return prompt
    messages = build_messages(prompt, **media) if isinstance(prompt, str) else prompt
    return processor(
        messages, image_tokens=image_tokens, media_first=media_first, chat_template_kwargs=chat_template_kwargs
    )


def template_settings(
    enable_thinking: bool | None, tools: Sequence[dict[str, Any]] | None, chat_template_kwargs: dict[str, Any] | None
) -> dict[str, Any]:
    """What the chat template is rendered with: `chat_template_kwargs`, then thinking on or off and the
    tool definitions (Gemma 4's template reads `enable_thinking` and `tools`)."""
    if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, dict):
        raise ParameterError("chat_template_kwargs", "must be a mapping of template variables")
    settings = dict(chat_template_kwargs or {})
    if enable_thinking is not None:
        if not isinstance(enable_thinking, bool):
            raise ParameterError("enable_thinking", f"must be true or false, got {enable_thinking!r}")
        settings["enable_thinking"] = enable_thinking
    if tools:
        settings["tools"] = check_tools(tools)
    return settings


def default_prompt_cache(model: Model) -> PromptCache:
    """The in-memory prefix cache that belongs to `model` (made on first use, sized to the memory
    left beside its weights: `memory.prefix_store_bytes`)."""
    store = getattr(model, "_prompt_cache", None)
    if store is None:
        store = PromptCache(prefix_store_bytes(model.nbytes))
        object.__setattr__(model, "_prompt_cache", store)  # a plain attribute, not a module parameter
    return store


@dataclass
class _PrefixPlan:
    """How one prompt uses the prefix cache: what was reused and where to take snapshots."""

    cache: list[LayerCache]
    snapshot_at: tuple[int, ...]
    on_snapshot: SnapshotCallback | None
    reused: int


def _plan_prefix(
    model: Model,
    tokenizer: Any,
    store: PromptCache | None,
    input_ids: np.ndarray,
    embeddings: mx.array,
    key_bias: SpanBias | None,
) -> _PrefixPlan:
    fresh = model.make_cache()
    if store is None or input_ids.shape[0] != 1:
        return _PrefixPlan(fresh, (), None, 0)
    ids = input_ids[0]
    media = np.nonzero(np.isin(ids, model.config.media_token_ids))[0]
    keys = PrefixKeys(
        ids,
        model=store.identity or f"model-object-{id(model)}",
        media_positions=media,
        media_rows=media_rows(embeddings, media),
        key_bias=key_bias,
    )
    turn_start = tokenizer.convert_tokens_to_ids(TURN_START)
    user = tokenizer.encode("user", add_special_tokens=False)
    system_end = last_user_turn_start(ids, turn_start, user) if isinstance(turn_start, int) else None
    hit = store.lookup(keys, disk_lengths=() if system_end is None else (system_end,))
    cache, reused = fresh, 0
    if hit is not None and matches_model(hit.layers, fresh):
        cache, reused = restore_cache(hit.layers), hit.length
    boundaries = tuple(b for b in (system_end, len(ids)) if b is not None and b > reused)

    def on_snapshot(end: int, live: list[LayerCache]) -> None:
        state = PrefixState(keys.name(end), ids[:end].copy(), snapshot_cache(live))
        store.store(state, persist=end == system_end)

    return _PrefixPlan(cache, boundaries, on_snapshot, reused)


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
    presence_penalty: float = 0.0,
    presence_context_size: int = 20,
    frequency_penalty: float = 0.0,
    frequency_context_size: int = 20,
    logit_bias: dict[int, float] | None = None,
    seed: int | None = None,
    stop: str | Sequence[str] = (),
    logprobs: bool = False,
    top_logprobs: int = 0,
    prefill_chunk_size: int | None = None,
    prefill_progress: ProgressCallback | None = None,
    sampler: Callable[[mx.array], mx.array] | None = None,
    logits_processors: list[Callable[[mx.array, mx.array], mx.array]] | None = None,
    audio_emphasis: float = 1.0,
    media_first: bool = True,
    task_reminder: str | None = None,
    enable_thinking: bool | None = None,
    tools: Sequence[dict[str, Any]] | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
    prompt_cache: PromptCache | None = None,
    use_prompt_cache: bool = True,
) -> Iterator[GenerationResponse]:
    """Yield the reply piece by piece. `prompt`: user text (with `system`/`images`/`audios`/`videos`),
    chat messages, or the processor's output dict.

    audio_emphasis: in (0, 1]; below 1, global layers scale the attention paid outside the audio
    span by this factor (renormalized), see `audio_emphasis_bias`. 1 = off (exactly the plain model).
    media_first / task_reminder: prompt placement, see `prepare_inputs` and `build_messages`.
    prompt_cache: the prefix cache to reuse and fill (default: the model's own in-memory one, see
    `default_prompt_cache`); use_prompt_cache=False runs the whole prompt and stores nothing.
    Output is identical with and without the prefix cache.
    enable_thinking / tools / chat_template_kwargs: rendered by the checkpoint's chat template (see
    `template_settings`); `reply_parser.ReplyParser` splits the streamed text into answer, thought and calls.
    Sampling and penalties: see `GenerationParams` (validated there; `logits_processors` run after
    the penalties). `stop`: strings that end the reply, left out of it. `logprobs`/`top_logprobs`: each
    response carries its token's log-probability (after the logits processors) and the likeliest
    alternatives. The reply also ends where the model's context is full (finish_reason "length")."""
    params = GenerationParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        repetition_context_size=repetition_context_size,
        presence_penalty=presence_penalty,
        presence_context_size=presence_context_size,
        frequency_penalty=frequency_penalty,
        frequency_context_size=frequency_context_size,
        logit_bias=logit_bias,
        seed=seed,
        stop=stop,
        prefill_chunk_size=prefill_chunk_size,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    ).validate(vocab_size=model.config.text.vocab_size)
    settings = template_settings(enable_thinking, tools, chat_template_kwargs)
    if params.seed is not None:
        mx.random.seed(params.seed)
    tokenizer = processor.tokenizer
    detokenizer = TokenizerWrapper(tokenizer).detokenizer
    stops = stop_token_ids(model, tokenizer)
    stop_text = StopStrings(params.stop)
    # mlx-lm's temperature-0 sampler takes the maximum, which normalizing the logits would not move:
    # it gets them as they are, without the logsumexp over the whole vocabulary (3% of a CPU decode step).
    normalize = sampler is not None or params.temperature != 0
    sampler = sampler or params.make_sampler()
    logits_processors = [*params.make_logits_processors(), *(logits_processors or [])]
    mx.reset_peak_memory()
    started = time.perf_counter()
    media_items = dict(system=system, images=images, audios=audios, videos=videos)
    if task_reminder is not None and isinstance(prompt, str):
        media_items["task_reminder"] = task_reminder
    inputs = prepare_inputs(processor, prompt, image_tokens, media_first, settings or None, **media_items)
    input_ids = np.asarray(inputs["input_ids"])
    prompt_ids = mx.array(input_ids.astype(np.int32))
    num_prompt = prompt_ids.shape[1]
    max_tokens = params.check_prompt(num_prompt, model.config.text.max_position_embeddings)
    mm = inputs.get("mm_token_type_ids")
    key_bias = audio_emphasis_bias(input_ids, mm, model.config.audio_token_id, audio_emphasis)
    embeddings = model.embed_inputs(mx.array(input_ids), inputs)
    store = None
    if use_prompt_cache:
        store = default_prompt_cache(model) if prompt_cache is None else prompt_cache
    plan = _plan_prefix(model, tokenizer, store, input_ids, embeddings, key_bias)
    cache = plan.cache
    logits = prefill(
        model,
        inputs,
        cache,
        params.prefill_chunk_size,
        prefill_progress,
        embeddings=embeddings,
        key_bias=key_bias,
        snapshot_at=plan.snapshot_at,
        on_snapshot=plan.on_snapshot,
    )
    history = prompt_ids[0]

    def sample(logits: mx.array) -> tuple[mx.array, mx.array | None]:
        """The next token, and the float32 log-probabilities after the logits processors when asked."""
        nonlocal history
        logits = logits[:, -1, :]
        for processor_fn in logits_processors:
            logits = processor_fn(history, logits)
        scores = None
        if params.logprobs:
            scores = logits.astype(mx.float32)
            scores = scores - mx.logsumexp(scores, axis=-1, keepdims=True)
        if normalize:
            logits = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        token = sampler(logits)
        history = mx.concatenate([history, token])
        return token, scores

    def step(token: mx.array) -> tuple[mx.array, mx.array | None]:
        return sample(model.forward_embeddings(model.embed_text(token[None]), cache=cache, key_bias=key_bias))

    def token_logprobs(value: int, scores: mx.array | None) -> tuple[float | None, list[tuple[int, float]]]:
        if scores is None:
            return None, []
        row = scores[0]
        top: list[tuple[int, float]] = []
        if params.top_logprobs:
            ids = mx.argpartition(-row, params.top_logprobs - 1)[: params.top_logprobs]
            top = sorted(zip(ids.tolist(), row[ids].tolist(), strict=True), key=lambda pair: -pair[1])
        return row[value].item(), top

    token, scores = sample(logits)
    mx.eval(token)
    prompt_time = time.perf_counter() - started
    prompt_tps = num_prompt / prompt_time
    decode_started = time.perf_counter()
    generated = 0
    while True:
        following = step(token) if generated + 1 < max_tokens else None
        if following is not None:
            mx.async_eval(following[0])
        value = int(token.item())
        generated += 1
        finish = "stop" if value in stops else ("length" if generated >= max_tokens else None)
        if finish != "stop":
            detokenizer.add_token(value)
        if finish:
            detokenizer.finalize()
        text, reached = stop_text.feed(detokenizer.last_segment)
        if reached:
            finish = "stop"
        elif finish:
            text += stop_text.finish()
        logprob, top = token_logprobs(value, scores)
        elapsed = time.perf_counter() - decode_started
        yield GenerationResponse(
            text=text,
            token=value,
            logprob=logprob,
            top_logprobs=top,
            prompt_tokens=num_prompt,
            prompt_tps=prompt_tps,
            generation_tokens=generated,
            generation_tps=(generated - 1) / elapsed if generated > 1 and elapsed > 0 else 0.0,
            ttft_s=prompt_time,
            peak_memory_gb=peak_memory_gb(),
            finish_reason=finish,
            cached_tokens=plan.reused,
        )
        if finish:
            return
        token, scores = following


def generate(model: Model, processor: Any, prompt: Any, **kwargs: Any) -> GenerationResult:
    """The whole reply at once, with its statistics. Takes the arguments of `stream_generate`."""
    text, tokens, last = [], [], None
    for last in stream_generate(model, processor, prompt, **kwargs):
        text.append(last.text)
        tokens.append(last.token)
    stats = {f.name: getattr(last, f.name) for f in fields(GenerationStats)}
    whole = "".join(text)
    parts = parse_reply(whole, processor.tokenizer)
    return GenerationResult(
        **stats,
        text=whole,
        tokens=tokens,
        content=parts.content,
        reasoning=parts.reasoning,
        tool_calls=parts.tool_calls,
    )
