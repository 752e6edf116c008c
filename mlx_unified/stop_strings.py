"""Stop strings over streamed text: the reply ends where one first appears, and it is not shown.

Text arrives piece by piece and a stop string may be split across pieces, so a tail that could begin
one is held back until the next piece decides it.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopStrings:
    def __init__(self, stop: Sequence[str]) -> None:
        self.stop = tuple(stop)
        self.pending = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text to show now, whether a stop string was reached: the reply ends here)."""
        if not self.stop:
            return piece, False
        self.pending += piece
        hits = [index for index in (self.pending.find(s) for s in self.stop) if index != -1]
        if hits:
            text, self.pending = self.pending[: min(hits)], ""
            return text, True
        keep = partial_match_length(self.pending, self.stop)
        text, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep :]
        return text, False

    def finish(self) -> str:
        """The held-back tail, once the reply ended otherwise."""
        text, self.pending = self.pending, ""
        return text


def partial_match_length(text: str, markers: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is the beginning of one of `markers` (shorter than
    it): what a streaming reader holds back until the next piece shows whether the marker follows."""
    longest = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:size]):
                longest = size
                break
    return longest
