"""Generation parameters: one dataclass and one validation shared by every surface.

The Python API (`stream_generate`), the CLI, the app and the server all describe a request with
`GenerationParams` and call `validate`, so a value is refused the same way everywhere: a
`ParameterError` naming the argument (the server answers it as a 400 with that `param`). Sampling and
logits processing are mlx-lm's (its filters, through `sampling.make_sampler`; `make_logits_processors`).
This module imports MLX and mlx-lm only when a sampler is made, so front ends can validate before
loading them.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ParameterError
from .kv_quantization import (
    DEFAULT_KV_GROUP_SIZE,
    DEFAULT_QUANTIZED_KV_START,
    check_kv_quantization,
)

SEED_LIMIT = 2**64  # mx.random.seed takes an unsigned 64-bit integer
MAX_TOP_LOGPROBS = 20  # OpenAI's bound on alternatives per token
PENALTY_RANGE = (-2.0, 2.0)  # OpenAI's range for presence/frequency penalties
LOGIT_BIAS_RANGE = (-100.0, 100.0)
# Stop strings are searched for in the held-back tail of the reply at every token, a cost that grows with
# their number and length: far more than any stop list needs.
MAX_STOP_STRINGS, MAX_STOP_CHARS = 64, 1024
MAX_DRAFTS = 16  # a fixed draft length beyond this only wastes verification
# A token id as a JSON object key: OpenAI's `logit_bias` keys are strings; ten digits cover any vocabulary.
_TOKEN_KEY = re.compile(r"[0-9]{1,10}")

# Names a caller's template variables may not take. apply_chat_template's own parameters choose the template,
# tokenize, and frame the prompt (the generation prompt, a continued last message); the names it renders the
# template with (messages, documents, the tokenizer's special tokens) and the template's globals would be
# replaced. These are the runtime's to set, so a request cannot bring its own template or framing.
FRAMING_ARGUMENTS = frozenset({
    "chat_template", "tokenize", "add_generation_prompt", "continue_final_message", "return_dict",
    "return_tensors", "return_assistant_tokens_mask", "padding", "truncation", "max_length", "tokenizer_kwargs",
    "processor_kwargs", "conversation", "messages", "documents",
})  # fmt: skip
TEMPLATE_GLOBALS = frozenset({
    "raise_exception", "strftime_now", "range", "dict", "lipsum", "cycler", "joiner", "namespace", "loop",
    "self", "caller", "varargs", "kwargs",
})  # fmt: skip
MAX_TEMPLATE_VARIABLES = 64


class ContextLengthError(ParameterError):
    """The prompt leaves no room to generate within the model's context."""


class DraftLengthError(ParameterError):
    """A number of draft tokens that is neither 'auto' nor a count in range."""


def check_template_variables(
    variables: Any, param: str = "chat_template_kwargs", *, tools_allowed: bool = True
) -> dict[str, Any]:
    """`variables` as chat-template variables (a copy), checked: plain names the template reads, such as
    `enable_thinking` (true or false). ParameterError naming the key (`param.key`) for a template,
    a tokenizing or framing switch (`FRAMING_ARGUMENTS`), a special token or a template global;
    `tools` only where `tools_allowed` (the server's requests carry their own `tools` field)."""
    if variables is None:
        return {}
    if not isinstance(variables, Mapping):
        raise ParameterError(param, f"must be a mapping of template variables, got {type(variables).__name__}")
    if len(variables) > MAX_TEMPLATE_VARIABLES:
        raise ParameterError(param, f"{len(variables)} variables; at most {MAX_TEMPLATE_VARIABLES} are taken")
    for key in variables:
        if not isinstance(key, str) or not key.isidentifier() or not key.isascii():
            raise ParameterError(param, f"{key!r} is not a template variable name")
        where = f"{param}.{key}"
        if key == "chat_template":
            raise ParameterError(where, "the checkpoint's chat template renders every prompt; none may be supplied")
        if key in FRAMING_ARGUMENTS or key in TEMPLATE_GLOBALS or key.endswith(("_token", "_tokens")):
            raise ParameterError(where, "sets how the prompt is framed or tokenized, not a template variable")
        if key == "tools" and not tools_allowed:
            raise ParameterError(where, "give tool definitions in the request's tools field")
    if "enable_thinking" in variables and not isinstance(variables["enable_thinking"], bool):
        raise ParameterError(f"{param}.enable_thinking", f"must be true or false, got {variables['enable_thinking']!r}")
    return dict(variables)


def parse_num_draft_tokens(value: int | str) -> int | None:
    """`num_draft_tokens` as the CLI, the app and the API take it: "auto" (None: adaptive, see
    `speculative.DraftLength`) or a fixed count 0..MAX_DRAFTS (0 is plain decoding)."""
    if isinstance(value, str):
        if value.strip().lower() == "auto":
            return None
        try:
            value = int(value)
        except ValueError:
            raise DraftLengthError("num_draft_tokens", f"expected 'auto' or a count, got {value!r}") from None
    if not _is_int(value) or not 0 <= value <= MAX_DRAFTS:
        raise DraftLengthError("num_draft_tokens", f"expected 'auto' or a count from 0 to {MAX_DRAFTS}, got {value!r}")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(name: str, value: Any, minimum: int, maximum: int | None = None, bound: str = "") -> int:
    if not _is_int(value):
        raise ParameterError(name, f"must be an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = bound or (f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}")
        raise ParameterError(name, f"must be {bound}, got {value}")
    return value


def _number(name: str, value: Any, low: float, high: float, *, low_open: bool = False, hint: str = "") -> float:
    if not _is_number(value):
        raise ParameterError(name, f"must be a finite number, got {value!r}")
    if value < low or value > high or (low_open and value == low):
        left = "(" if low_open else "["
        high_text = "inf" if math.isinf(high) else f"{high:g}"
        raise ParameterError(name, f"must be in {left}{low:g}, {high_text}]{hint}, got {value:g}")
    return float(value)


@dataclass
class GenerationParams:
    """What a reply is generated with (defaults: greedy, no penalties, 256 tokens at most)."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0  # 1: off
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float | None = None  # mlx-lm's multiplicative penalty; None: off
    repetition_context_size: int = 20
    presence_penalty: float = 0.0  # additive, OpenAI's meaning; 0: off
    presence_context_size: int = 20
    frequency_penalty: float = 0.0
    frequency_context_size: int = 20
    logit_bias: Mapping[int, float] | None = None  # token id -> added logit
    seed: int | None = None
    stop: Sequence[str] = ()  # strings that end the reply (not included in it)
    prefill_chunk_size: int | None = None  # tokens per prefill pass; None: attention_blocks.PREFILL_CHUNK
    logprobs: bool = False  # report each token's log-probability
    top_logprobs: int = 0  # and this many likeliest alternatives (needs logprobs)
    # Most positions the KV cache holds, prompt and reply together; None: the model's context. The reply
    # ends there: no position is ever dropped (mlx-lm's rotating cache would change what later tokens read).
    max_kv_size: int | None = None
    num_draft_tokens: int | str = "auto"  # with a draft model: "auto" (adaptive) or a fixed count
    # mlx-lm's KV-cache quantization (`kv_quantization.KVQuantization`); kv_bits None: a float cache.
    kv_bits: int | None = None
    kv_group_size: int = DEFAULT_KV_GROUP_SIZE
    quantized_kv_start: int = DEFAULT_QUANTIZED_KV_START

    def validate(self, vocab_size: int | None = None) -> GenerationParams:
        """Check every field (and token ids against `vocab_size` when known); return self, with
        `stop` as a tuple and `logit_bias` as {int: float}. Raises ParameterError naming the field."""
        _integer("max_tokens", self.max_tokens, 1)
        _number("temperature", self.temperature, 0.0, math.inf, hint=" (0: greedy)")
        _number("top_p", self.top_p, 0.0, 1.0, low_open=True, hint=" (1: off)")
        _integer("top_k", self.top_k, 0, vocab_size)
        _number("min_p", self.min_p, 0.0, 1.0, hint=" (0: off)")
        if self.repetition_penalty is not None:
            _number("repetition_penalty", self.repetition_penalty, 0.0, math.inf, low_open=True, hint=" (1: off)")
        for name in ("presence_penalty", "frequency_penalty"):
            _number(name, getattr(self, name), *PENALTY_RANGE, hint=" (0: off)")
        for name in ("repetition_context_size", "presence_context_size", "frequency_context_size"):
            _integer(name, getattr(self, name), 1)
        if self.seed is not None:
            _integer("seed", self.seed, 0, SEED_LIMIT - 1, bound="between 0 and 2**64 - 1")
        if self.prefill_chunk_size is not None:
            _integer("prefill_chunk_size", self.prefill_chunk_size, 1)
        if self.max_kv_size is not None:
            _integer("max_kv_size", self.max_kv_size, 1)
        parse_num_draft_tokens(self.num_draft_tokens)
        if self.kv_bits is not None:
            check_kv_quantization(self.kv_bits, self.kv_group_size, self.quantized_kv_start)
        if not isinstance(self.logprobs, bool):
            raise ParameterError("logprobs", f"must be true or false, got {self.logprobs!r}")
        _integer("top_logprobs", self.top_logprobs, 0, MAX_TOP_LOGPROBS)
        if self.top_logprobs and not self.logprobs:
            raise ParameterError("top_logprobs", "needs logprobs to be true")
        self.stop = _stop_strings(self.stop)
        self.logit_bias = _logit_bias(self.logit_bias, vocab_size)
        return self

    def check_prompt(self, prompt_tokens: int, context_length: int) -> int:
        """The most tokens this reply may generate: `max_tokens`, cut to what the context (or
        `max_kv_size`) leaves. Raises ContextLengthError when the prompt alone fills it."""
        capped = self.max_kv_size is not None and self.max_kv_size < context_length
        limit = self.max_kv_size if capped else context_length
        room = limit - prompt_tokens
        if room < 1:
            raise ContextLengthError(
                "max_kv_size" if capped else "messages",
                f"the prompt is {prompt_tokens} tokens; "
                + (f"max_kv_size holds {limit} positions" if capped else f"the model's context holds {limit}")
                + " and at least one must be left to generate",
            )
        return min(self.max_tokens, room)

    def make_sampler(self) -> Callable[[Any], Any] | None:
        """mlx-lm's sampler for these settings, built by `sampling.make_sampler` from mlx-lm's filters so
        that speculative decoding knows its distribution (the rejection rule); None at temperature 0,
        where `generate_step` takes the argmax of the logits themselves (which no top-p/top-k/min-p
        filter would change)."""
        from .sampling import make_sampler

        if self.temperature == 0:
            return None
        return make_sampler(temp=self.temperature, top_p=self.top_p, min_p=self.min_p, top_k=self.top_k)

    def make_logits_processors(self) -> list[Callable[[Any, Any], Any]]:
        from mlx_lm.sample_utils import make_logits_processors

        return make_logits_processors(
            logit_bias=dict(self.logit_bias) if self.logit_bias else None,
            repetition_penalty=self.repetition_penalty,
            repetition_context_size=self.repetition_context_size,
            presence_penalty=self.presence_penalty or None,
            presence_context_size=self.presence_context_size,
            frequency_penalty=self.frequency_penalty or None,
            frequency_context_size=self.frequency_context_size,
        )


def _stop_strings(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise ParameterError("stop", f"must be a string or a list of strings, got {stop!r}")
    if any(not s for s in stop):
        raise ParameterError("stop", "an empty string would stop before the first token")
    if len(stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in stop):
        raise ParameterError("stop", f"at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} characters")
    return tuple(stop)


def _logit_bias(bias: Any, vocab_size: int | None) -> dict[int, float] | None:
    if not bias:
        return None
    if not isinstance(bias, Mapping):
        raise ParameterError("logit_bias", f"must map token ids to numbers, got {type(bias).__name__}")
    if vocab_size is not None and len(bias) > vocab_size:
        raise ParameterError("logit_bias", f"{len(bias)} entries; the vocabulary has {vocab_size} tokens")
    checked: dict[int, float] = {}
    for key, value in bias.items():
        # ASCII digits only: int() also reads other scripts' digits, and str.isdigit() passes superscripts
        # that int() refuses.
        token = int(key) if isinstance(key, str) and _TOKEN_KEY.fullmatch(key.strip()) else key
        if not _is_int(token) or token < 0 or (vocab_size is not None and token >= vocab_size):
            limit = "" if vocab_size is None else f" below {vocab_size}"
            raise ParameterError("logit_bias", f"keys must be token ids >= 0{limit}, got {key!r}")
        checked[token] = _number(f"logit_bias[{key}]", value, *LOGIT_BIAS_RANGE)
    return checked


# The sampling settings a checkpoint's generation_config.json may give (mlx-vlm reads the same).
CHECKPOINT_SAMPLING = ("temperature", "top_p", "top_k")


def checkpoint_sampling(folder: str | Path) -> dict[str, Any]:
    """The sampling defaults in a checkpoint's `generation_config.json`: its temperature, top_p and
    top_k (missing or null ones left out), temperature 0 when it says `do_sample: false`, as mlx-vlm
    reads them; {} without the file. Raises ModelLoadError naming the file when it is unreadable or
    holds a value out of range."""
    from .checkpoint import ModelLoadError

    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: unreadable ({e})") from e
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    sampling = {name: config[name] for name in CHECKPOINT_SAMPLING if config.get(name) is not None}
    if config.get("do_sample") is False:
        sampling["temperature"] = 0.0
    try:
        GenerationParams(**sampling).validate()
    except ParameterError as e:
        raise ModelLoadError(f"{path}: {e}") from e
    return sampling
