"""Replies constrained to a JSON schema (OpenAI's `response_format`), with llguidance.

`json_schema_processor` returns an mlx-lm logits processor (pass it in `stream_generate`'s
`logits_processors`): at each step only the tokens that keep the reply a prefix of a JSON document
valid for the schema keep their logits; once the document is complete only the end of turn does. With
thinking on, the model may first write its thought channel, unconstrained. llguidance is the
`structured` extra (`pip install 'mlx-unified[structured]'`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import numpy as np

from .errors import InputError
from .processing.chat import TURN_END
from .reply_parser import marker

# Compact JSON: no whitespace between tokens, so a model cannot pad a reply with blanks forever.
COMPILE_OPTIONS = {"whitespace_flexible": False}


class StructuredOutputError(InputError):
    """A schema that cannot be enforced (invalid, or llguidance is not installed)."""


def json_schema_processor(
    tokenizer: Any, schema: dict[str, Any] | None, vocab_size: int, enable_thinking: bool = False
) -> Callable[[mx.array, mx.array], mx.array]:
    """A logits processor for one reply; `schema` None: any JSON object (OpenAI's `json_object`)."""
    try:
        import llguidance
        import llguidance.hf
    except ImportError as error:
        raise StructuredOutputError(
            "response_format: JSON output needs llguidance (pip install 'mlx-unified[structured]')"
        ) from error
    grammar = llguidance.LLMatcher.grammar_from_json_schema(
        json.dumps(schema if schema is not None else {"type": "object"}), defaults=COMPILE_OPTIONS
    )
    ids = tokenizer.convert_tokens_to_ids
    lltokenizer = _llg_tokenizer(tokenizer, vocab_size, ids(TURN_END))
    problem = llguidance.LLMatcher.validate_grammar(grammar, lltokenizer)
    if problem:
        raise StructuredOutputError(f"response_format: the JSON schema cannot be enforced ({problem})")
    return JSONSchemaProcessor(
        llguidance.LLMatcher(lltokenizer, grammar),
        vocab_size,
        ids(marker(tokenizer, "soc_token")),
        ids(marker(tokenizer, "eoc_token")),
        enable_thinking,
    )


_LL_TOKENIZERS: dict[tuple[int, int], Any] = {}


def _llg_tokenizer(tokenizer: Any, vocab_size: int, end_of_turn: int) -> Any:
    """llguidance's view of the vocabulary: built once per tokenizer (it walks every token)."""
    import llguidance.hf

    key = (id(tokenizer), vocab_size)
    if key not in _LL_TOKENIZERS:
        _LL_TOKENIZERS[key] = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=end_of_turn)
    return _LL_TOKENIZERS[key]


class JSONSchemaProcessor:
    """Masks the logits with the matcher's allowed tokens; sees the tokens sampled since its last call."""

    def __init__(
        self, matcher: Any, vocab_size: int, channel_open: int, channel_close: int, enable_thinking: bool
    ) -> None:
        import llguidance.numpy

        self.matcher = matcher
        self.vocab_size = vocab_size
        self.channel_open, self.channel_close = channel_open, channel_close
        self.phase = "start" if enable_thinking else "json"  # "start": a thought may open; "thought"
        self.bitmask = llguidance.numpy.allocate_token_bitmask(1, vocab_size)
        self.seen: int | None = None  # tokens of the history at the first call: the prompt

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if self.seen is None:
            self.seen = tokens.shape[-1]
        else:
            for token in tokens.reshape(-1)[self.seen :].tolist():
                self._consume(int(token))
            self.seen = tokens.shape[-1]
        if self.phase == "thought":
            return logits
        allowed = self._allowed()
        if self.phase == "start":
            allowed[self.channel_open] = True
        return mx.where(mx.array(allowed), logits, -mx.inf)

    def _consume(self, token: int) -> None:
        if self.phase == "start" and token == self.channel_open:
            self.phase = "thought"
            return
        if self.phase == "thought":
            if token == self.channel_close:
                self.phase = "json"
            return
        self.phase = "json"
        self.matcher.consume_token(token)
        if self.matcher.is_error():
            raise StructuredOutputError(f"response_format: the reply left the schema ({self.matcher.get_error()})")

    def _allowed(self) -> np.ndarray:
        import llguidance.numpy

        llguidance.numpy.fill_next_token_bitmask(self.matcher, self.bitmask, 0)
        return np.unpackbits(self.bitmask.view(np.uint8), bitorder="little")[: self.vocab_size].astype(bool)
