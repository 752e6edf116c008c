"""A reply's streamed text split into what it holds: the answer, the thought, the function calls.

Gemma 4 writes its thinking in a hidden channel, `<|channel>thought\\n...<channel|>`, and a function call
as `<|tool_call>call:NAME{...}<tool_call|>` (see `tool_calls`). `ReplyParser` takes the text piece by
piece, as `stream_generate` yields it (cut anywhere, markers split across pieces included), and returns
for each piece the answer text, the thought text and the calls completed so far. Every other control
token is dropped. A call whose text is not well formed is kept as answer text (its markers dropped),
so nothing the model wrote is lost.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .stop_strings import partial_match_length
from .tool_calls import QUOTE, ToolCall, ToolCallSyntaxError, parse_tool_call

# The markers' default spellings, used when a tokenizer does not name them.
MARKERS = {
    "soc_token": "<|channel>",
    "eoc_token": "<channel|>",
    "stc_token": "<|tool_call>",
    "etc_token": "<tool_call|>",
    "escape_token": QUOTE,
}
THOUGHT_LABEL = "thought\n"  # the channel's name, first in the channel


@dataclass
class ReplyDelta:
    """What one piece of streamed text added."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls)

    def __iadd__(self, other: ReplyDelta) -> ReplyDelta:
        self.content += other.content
        self.reasoning += other.reasoning
        self.tool_calls += other.tool_calls
        return self


def marker(tokenizer: Any, name: str) -> str:
    """The spelling of control token `name` (a key of MARKERS) in this tokenizer."""
    return getattr(tokenizer, name, None) or MARKERS[name]


class ReplyParser:
    """Feed the streamed text with `feed`, then call `finish` once the reply is complete."""

    def __init__(self, tokenizer: Any = None) -> None:
        spelled = {key: marker(tokenizer, key) for key in MARKERS}
        self.channel_open, self.channel_close = spelled["soc_token"], spelled["eoc_token"]
        self.call_open, self.call_close = spelled["stc_token"], spelled["etc_token"]
        self.quote = spelled["escape_token"]
        decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        specials = {token.content for token in decoder.values() if getattr(token, "special", False)}
        specials.update(getattr(tokenizer, "all_special_tokens", []) or [])
        specials.update(spelled.values())
        self.markers = sorted(specials, key=len, reverse=True)  # longest first: at one index it wins
        self.pending = ""
        self.state = "content"  # "content", "label" (a channel just opened), "reasoning", "call"
        self.answer_started = False

    def feed(self, piece: str) -> ReplyDelta:
        self.pending += piece
        delta = ReplyDelta()
        while self.pending and self._step(delta):
            pass
        return delta

    def finish(self) -> ReplyDelta:
        """The held-back tail; an unfinished call (the reply was cut) becomes answer text."""
        delta = ReplyDelta()
        text, self.pending = self.pending, ""
        if self.state in ("label", "reasoning"):
            delta.reasoning += text
        else:
            self._answer(delta, text)
        self.state = "content"
        return delta

    def _step(self, delta: ReplyDelta) -> bool:
        """Consume what the pending text decides; False when the rest must wait for more text."""
        if self.state == "call":
            end = self.pending.find(self.call_close)
            if end == -1:
                return False
            body, self.pending = self.pending[:end], self.pending[end + len(self.call_close) :]
            try:
                delta.tool_calls.append(parse_tool_call(body, self.quote))
            except ToolCallSyntaxError:
                self._answer(delta, body.replace(self.quote, '"'))
            self.state = "content"
            return True
        if self.state == "label":
            if THOUGHT_LABEL.startswith(self.pending):
                return False  # could still be the label
            if self.pending.startswith(THOUGHT_LABEL):
                self.pending = self.pending[len(THOUGHT_LABEL) :]
            self.state = "reasoning"
            return True
        index, marker = self._first_marker()
        text = self.pending[:index]
        if marker is None:
            keep = partial_match_length(self.pending, self.markers)
            text = self.pending[: len(self.pending) - keep]
            self.pending = self.pending[len(text) :]
        else:
            self.pending = self.pending[index + len(marker) :]
        if self.state == "reasoning":
            delta.reasoning += text
            if marker == self.channel_close:
                self.state = "content"
        else:
            self._answer(delta, text)
            if marker == self.channel_open:
                self.state = "label"
            elif marker == self.call_open:
                self.state = "call"
        return marker is not None

    def _answer(self, delta: ReplyDelta, text: str) -> None:
        if not self.answer_started:
            # The answer after a thought channel starts with a line break.
            text = text.lstrip()
            self.answer_started = bool(text)
        delta.content += text

    def _first_marker(self) -> tuple[int, str | None]:
        found: tuple[int, str | None] = (len(self.pending), None)
        for marker in self.markers:
            index = self.pending.find(marker)
            if index != -1 and index < found[0]:
                found = (index, marker)
        return found


def parse_reply(text: str, tokenizer: Any = None) -> ReplyDelta:
    """A whole reply's answer, thought and calls."""
    parser = ReplyParser(tokenizer)
    whole = parser.feed(text)
    whole += parser.finish()
    return whole
