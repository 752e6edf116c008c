"""Generation, in mlx-lm's shape: `generate_step` yields tokens one at a time after a chunked prefill;
`stream_generate` adds the chat template, the prefix cache, detokenizing and statistics; `generate`
collects a whole reply. Sampling filters and logits processors are mlx-lm's (`sampling` builds the sampler)."""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.sample_utils import greedy_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .budgets import wired_limit
from .cache import LayerCache, maybe_quantize
from .drafter import Drafter
from .emphasis import SpanBias, audio_emphasis_bias
from .generation_params import (
    GenerationParams,
    ParameterError,
    check_template_variables,
    parse_num_draft_tokens,
)
from .kv_quantization import (
    DEFAULT_KV_GROUP_SIZE,
    DEFAULT_QUANTIZED_KV_START,
    KVQuantization,
    kv_quantization,
)
from .model import Model
from .prefill import ProgressCallback, SnapshotCallback, prefill
from .prefix_cache import PrefixCache, default_prefix_cache, plan_prefix
from .processing import build_messages
from .processing.chat import TOOL_RESPONSE, TURN_END
from .reply_parser import parse_reply
from .speculative import (
    AUTO_MAX_DRAFTS,
    Speculation,
    SpeculativeStats,
    prepare_cache,
    speculative_decode,
)
from .stop_strings import StopStrings
from .tool_calls import ToolCall, check_tools

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
    # Speculative decoding (with a draft model): drafts made and accepted so far, the share accepted,
    # and tokens emitted per verifying target pass (accepted drafts + 1); 0 without drafts.
    draft_rounds: int = 0
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0
    acceptance_rate: float = 0.0
    mean_accepted_length: float = 0.0

    @property
    def peak_memory(self) -> float:
        """mlx-lm's and mlx-vlm's name for `peak_memory_gb` (also in GB)."""
        return self.peak_memory_gb


@dataclass
class GenerationResponse(GenerationStats):
    """One streamed step: the new text and the running statistics."""

    text: str = ""
    token: int | None = None
    # The log-probabilities [vocab] the token was drawn from (after the logits processors), as mlx-lm's
    # GenerationResponse has them: lazy, computed only when read (greedy decoding never needs them).
    logprobs: mx.array | None = None
    logprob: float | None = None  # the token's log-probability (float32), when `logprobs=True` was asked
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
    draft_model: Drafter | None = None,
    num_draft_tokens: int | str = "auto",
    draft_stats: SpeculativeStats | None = None,
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

    draft_model: an MTP drafter (`drafter.load_drafter`) for speculative decoding (`speculative`):
    the same tokens as without it when greedy, the same distribution when sampling (mlx-unified's
    `sampling.make_sampler` samplers by the rejection rule, any other sampler by matching its own
    samples). num_draft_tokens: "auto" (chosen round by round, down to plain decoding) or a fixed
    count. draft_stats: filled in with the rounds, drafts and acceptances.
    kv_bits / kv_group_size / quantized_kv_start: mlx-lm's KV-cache quantization (`kv_quantization.KVQuantization`):
    once the cache holds quantized_kv_start positions, every layer's cache is quantized to kv_bits
    (4 or 8) in groups of kv_group_size, in `prompt_cache` itself; None keeps it in float.
    """
    input_ids = np.asarray(inputs["input_ids"])
    kv = model_kv_quantization(model, kv_bits, kv_group_size, quantized_kv_start)
    cache = model.make_cache() if prompt_cache is None else prompt_cache
    drafts = None
    if draft_model is not None:
        draft_model.config.check_target(model.config.text)
        drafts = parse_num_draft_tokens(num_draft_tokens)
        prepare_cache(cache, AUTO_MAX_DRAFTS if drafts is None else drafts)
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

    # Wired on a Mac while generating, as the peers do: macOS does not page the weights out between steps.
    with wired_limit():
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
            return_hidden=draft_model is not None,
            kv_quantization=kv,
        )
        if draft_model is not None:
            logits, hidden = logits
        token, logprobs = sample(logits)
        # Evaluated alone: scheduled together with the next step, the first token would wait for that step.
        mx.eval(token)
        if draft_model is not None:
            speculation = Speculation(
                model, draft_model, cache, token, hidden[:, -1], history,
                sampler=sampler, logits_processors=logits_processors, key_bias=key_bias, kv_quantization=kv,
            )  # fmt: skip
            first = (int(token.item()), logprobs)
            yield from speculative_decode(
                speculation, first, max_tokens=max_tokens, num_draft_tokens=drafts, stats=draft_stats
            )
            return
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


def stop_token_ids(model: Model, tokenizer: Any, extra_eos_tokens: Sequence[str | int] = ()) -> set[int]:
    """eos ids from the config, plus the chat template's end of turn and the token that ends a function
    call (the released `generation_config.json` lists both), plus `extra_eos_tokens`: tokens (their
    text, or ids) that also end a reply, as mlx-lm's `--extra-eos-token` adds them."""
    stops = set(model.config.text.eos_token_ids)
    for marker in (TURN_END, TOOL_RESPONSE):
        token = _token_id(tokenizer, marker)
        if token is not None:
            stops.add(token)
    if isinstance(extra_eos_tokens, (str, int)):
        extra_eos_tokens = [extra_eos_tokens]
    vocab_size = model.config.text.vocab_size
    for extra in extra_eos_tokens:
        token = extra if _is_id(extra) else _token_id(tokenizer, extra) if isinstance(extra, str) else None
        if token is None or not 0 <= token < vocab_size:
            raise ParameterError(
                "extra_eos_tokens", f"{extra!r} is not a token of this model (give a token's text or its id)"
            )
        stops.add(token)
    return stops


def _is_id(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _token_id(tokenizer: Any, text: str) -> int | None:
    """The id of the token spelled `text` (a number is taken as the id itself); None when there is none."""
    if text.strip().isdigit():
        return int(text)
    token = tokenizer.convert_tokens_to_ids(text)
    return token if isinstance(token, int) and token != getattr(tokenizer, "unk_token_id", None) else None


def prompt_token_ids(prompt: Any) -> list[int] | None:
    """`prompt` as token ids when it is given as them (a list of ints, or a 1-D or [1, L] integer
    array, numpy or MLX); None for the other prompt forms."""
    if isinstance(prompt, mx.array):
        prompt = np.asarray(prompt)
    if isinstance(prompt, np.ndarray):
        one_row = prompt.ndim == 1 or (prompt.ndim == 2 and prompt.shape[0] == 1)
        if not np.issubdtype(prompt.dtype, np.integer) or not one_row or prompt.size == 0:
            raise ParameterError(
                "prompt", f"token ids must be integers of shape [L] or [1, L], got {prompt.dtype} {prompt.shape}"
            )
        return prompt.reshape(-1).tolist()
    if isinstance(prompt, (list, tuple)) and prompt and all(_is_id(t) for t in prompt):
        return [int(t) for t in prompt]
    return None


def prepare_inputs(
    processor: Any,
    prompt: Any,
    image_tokens: int | None = None,
    media_first: bool = True,
    chat_template_kwargs: dict[str, Any] | None = None,
    templated: bool = False,
    **media: Any,
) -> dict[str, Any]:
    """Arrays for the model from a prompt in any of `stream_generate`'s forms: the user's text, chat
    messages, an already-templated text (`templated=True`), token ids, or ready-made arrays.

    `media_first` (default): media items move before the text of their turn; False keeps each turn's
    content in the order given (text, then media, then e.g. a task reminder). `chat_template_kwargs`
    go to the chat template (they need messages or the user's text). `media`: `build_messages`'s
    system/images/audios/videos/task_reminder; a templated prompt takes only the media of its
    placeholders, token ids and arrays none."""
    ids = prompt_token_ids(prompt)
    if templated and not isinstance(prompt, str):
        raise ParameterError("templated", "applies to a prompt given as text")
    if ids is not None or templated or isinstance(prompt, dict):
        form = "token ids" if ids is not None else "a templated prompt" if templated else "ready-made arrays"
        # Settings that leave the template as it is (thinking off, no tools) are fine without one.
        if any(value not in (None, False, [], {}) for value in (chat_template_kwargs or {}).values()):
            raise ParameterError(", ".join(chat_template_kwargs), f"needs chat messages or the user's text, not {form}")
        allowed = ("images", "audios", "videos") if templated else ()
        for name, value in media.items():
            if name not in allowed and value:
                raise ParameterError(name, f"{form} already hold the whole prompt; put it there")
    if ids is not None:
        return processor.encode_ids(ids)
    if templated:
        return processor.encode_prompt(
            prompt, images=media["images"], audios=media["audios"], videos=media["videos"], image_tokens=image_tokens
        )
    if isinstance(prompt, dict):
        return prompt
    messages = build_messages(prompt, **media) if isinstance(prompt, str) else prompt
    return processor(
        messages, image_tokens=image_tokens, media_first=media_first, chat_template_kwargs=chat_template_kwargs
    )


def template_settings(
    enable_thinking: bool | None, tools: Sequence[dict[str, Any]] | None, chat_template_kwargs: dict[str, Any] | None
) -> dict[str, Any]:
    """What the chat template is rendered with: `chat_template_kwargs`, then thinking on or off and the
    tool definitions (Gemma 4's template reads `enable_thinking` and `tools`). The variables are checked
    (`check_template_variables`): no template of the caller's, no tokenizing or framing switches."""
    settings = check_template_variables(chat_template_kwargs)
    if enable_thinking is not None:
        if not isinstance(enable_thinking, bool):
            raise ParameterError("enable_thinking", f"must be true or false, got {enable_thinking!r}")
        settings["enable_thinking"] = enable_thinking
    if tools and settings.get("tools"):
        raise ParameterError("chat_template_kwargs.tools", "tools are given as tools=; give them once")
    if tools or settings.get("tools"):
        settings["tools"] = check_tools(tools or settings["tools"])
    return settings


def token_logprobs(logprobs: mx.array, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """The log-probability of `token` in the float32 row `logprobs`, and the `top` likeliest (token,
    log-probability) pairs, likeliest first."""
    likeliest: list[tuple[int, float]] = []
    if top:
        ids = mx.argpartition(-logprobs, top - 1)[:top]
        likeliest = sorted(zip(ids.tolist(), logprobs[ids].tolist(), strict=True), key=lambda pair: -pair[1])
    return logprobs[token].item(), likeliest


def stream_generate(
    model: Model,
    processor: Any,
    prompt: str | list[dict[str, Any]] | list[int] | np.ndarray | mx.array | dict[str, Any],
    *,
    templated: bool = False,
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
    extra_eos_tokens: Sequence[str | int] = (),
    logprobs: bool = False,
    top_logprobs: int = 0,
    prefill_chunk_size: int | None = None,
    max_kv_size: int | None = None,
    prefill_progress: ProgressCallback | None = None,
    sampler: Sampler | None = None,
    logits_processors: list[LogitsProcessor] | None = None,
    audio_emphasis: float = 1.0,
    media_first: bool = True,
    task_reminder: str | None = None,
    enable_thinking: bool | None = None,
    tools: Sequence[dict[str, Any]] | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
    prefix_cache: PrefixCache | None = None,
    use_prefix_cache: bool = True,
    draft_model: Drafter | None = None,
    num_draft_tokens: int | str = "auto",
    kv_bits: int | None = None,
    kv_group_size: int = DEFAULT_KV_GROUP_SIZE,
    quantized_kv_start: int = DEFAULT_QUANTIZED_KV_START,
) -> Iterator[GenerationResponse]:
    """Yield the reply piece by piece. `prompt` is one of:
    - the user's text (str), with `system`, `images`, `audios`, `videos`: templated here;
    - chat messages (a list of {"role", "content"} dicts): templated here;
    - with `templated=True`, a text already rendered by the chat template (mlx-lm's and mlx-vlm's
      str prompt, e.g. `processor.apply_chat_template(messages)`), taken as it is: its media
      placeholders are filled with `images`/`audios`/`videos`, in order;
    - token ids (a list of ints, or an integer array): the whole prompt, already templated;
    - the processor's output dict (`processor(messages)`).

    audio_emphasis: in (0, 1]; below 1, global layers scale the attention paid outside the audio
    span by this factor (renormalized), see `emphasis.audio_emphasis_bias`. 1 = off (exactly the
    plain model). media_first / task_reminder: prompt placement, see `prepare_inputs` and
    `processing.build_messages`. prefix_cache: the prefix cache to reuse and fill (default: the model's
    own in-memory one, see `prefix_cache.default_prefix_cache`); use_prefix_cache=False runs the whole
    prompt and stores nothing. Output is identical with and without the prefix cache.
    enable_thinking / tools / chat_template_kwargs: rendered by the checkpoint's chat template (see
    `template_settings`); `reply_parser.ReplyParser` splits the streamed text into answer, thought and calls.
    Sampling and penalties: see `GenerationParams` (validated there; `logits_processors` run after
    the penalties). `stop`: strings that end the reply, left out of it. `extra_eos_tokens`: tokens
    (their text or ids) that also end it, as the end of turn does. Every response carries the
    log-probabilities its token was drawn from (`logprobs`, an array over the vocabulary, as mlx-lm's);
    with `logprobs=True` also its token's log-probability as a float and, with `top_logprobs`, the
    likeliest alternatives. The reply also ends where the model's context is full, or the KV cache holds
    `max_kv_size` positions (prompt and reply; finish_reason "length"): positions are never dropped.
    draft_model / num_draft_tokens: speculative decoding with an MTP drafter (`load_drafter`), see
    `generate_step`; the responses then count its drafts and acceptance.
    kv_bits / kv_group_size / quantized_kv_start: quantize the KV cache, as mlx-lm (see
    `generate_step`); prefixes computed with these settings are stored and reused only with them."""
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
        max_kv_size=max_kv_size,
        num_draft_tokens=num_draft_tokens,
        kv_bits=kv_bits,
        kv_group_size=kv_group_size,
        quantized_kv_start=quantized_kv_start,
    ).validate(vocab_size=model.config.text.vocab_size)
    kv = model_kv_quantization(model, params.kv_bits, params.kv_group_size, params.quantized_kv_start)
    settings = template_settings(enable_thinking, tools, chat_template_kwargs)
    if params.seed is not None:
        mx.random.seed(params.seed)
    tokenizer = processor.tokenizer
    detokenizer = TokenizerWrapper(tokenizer).detokenizer
    stops = stop_token_ids(model, tokenizer, extra_eos_tokens)
    stop_text = StopStrings(params.stop)
    sampler = sampler or params.make_sampler()
    logits_processors = [*params.make_logits_processors(), *(logits_processors or [])]
    mx.reset_peak_memory()
    started = time.perf_counter()
    media_items = dict(system=system, images=images, audios=audios, videos=videos)
    if task_reminder is not None and isinstance(prompt, str):
        media_items["task_reminder"] = task_reminder
    inputs = prepare_inputs(processor, prompt, image_tokens, media_first, settings or None, templated, **media_items)
    input_ids = np.asarray(inputs["input_ids"])
    num_prompt = input_ids.shape[1]
    vocab_size = model.config.text.vocab_size
    if num_prompt == 0 or input_ids.min() < 0 or input_ids.max() >= vocab_size:
        raise ParameterError("prompt", f"token ids must be at least one, each in 0..{vocab_size - 1}")
    max_tokens = params.check_prompt(num_prompt, model.config.text.max_position_embeddings)
    key_bias = audio_emphasis_bias(
        input_ids, inputs.get("mm_token_type_ids"), model.config.audio_token_id, audio_emphasis
    )
    embeddings = model.embed_inputs(mx.array(input_ids), inputs)
    if not use_prefix_cache:
        prefix_cache = None
    elif prefix_cache is None:
        prefix_cache = default_prefix_cache(model)
    plan = plan_prefix(model, tokenizer, prefix_cache, input_ids, embeddings, key_bias, kv)
    drafts = SpeculativeStats()
    tokens = generate_step(
        model,
        inputs,
        prompt_cache=plan.prompt_cache,
        max_tokens=max_tokens,
        sampler=sampler,
        logits_processors=logits_processors,
        key_bias=key_bias,
        prefill_chunk_size=params.prefill_chunk_size,
        prefill_progress=prefill_progress,
        embeddings=embeddings,
        snapshot_at=plan.snapshot_at,
        on_snapshot=plan.on_snapshot,
        draft_model=draft_model,
        num_draft_tokens=params.num_draft_tokens,
        draft_stats=drafts,
        kv_bits=params.kv_bits,
        kv_group_size=params.kv_group_size,
        quantized_kv_start=params.quantized_kv_start,
    )
    for generated, (token, logprobs_row) in enumerate(tokens, start=1):
        if generated == 1:
            prompt_time = time.perf_counter() - started
            decode_started = time.perf_counter()
        finish = "stop" if token in stops else ("length" if generated >= max_tokens else None)
        if finish != "stop":
            detokenizer.add_token(token)
        if finish:
            detokenizer.finalize()
        text, reached = stop_text.feed(detokenizer.last_segment)
        if reached:
            finish = "stop"
        elif finish:
            text += stop_text.finish()
        logprob, top = (
            token_logprobs(logprobs_row.astype(mx.float32), token, params.top_logprobs)
            if params.logprobs
            else (None, [])
        )
        elapsed = time.perf_counter() - decode_started
        yield GenerationResponse(
            text=text,
            token=token,
            logprobs=logprobs_row,
            logprob=logprob,
            top_logprobs=top,
            prompt_tokens=num_prompt,
            prompt_tps=num_prompt / prompt_time,
            generation_tokens=generated,
            generation_tps=(generated - 1) / elapsed if generated > 1 and elapsed > 0 else 0.0,
            ttft_s=prompt_time,
            peak_memory_gb=peak_memory_gb(),
            finish_reason=finish,
            cached_tokens=plan.reused,
            draft_rounds=drafts.rounds,
            draft_tokens=drafts.drafted,
            accepted_draft_tokens=drafts.accepted,
            acceptance_rate=drafts.acceptance_rate,
            mean_accepted_length=drafts.mean_accepted_length,
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
