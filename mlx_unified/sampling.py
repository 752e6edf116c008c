"""Samplers whose distribution is known, which speculative sampling needs to accept or reject drafts.

`make_sampler` takes mlx-lm's `make_sampler` arguments and builds the same sampler from mlx-lm's own
filters (top-p, min-p, top-k, in that order, then the temperature), so a token drawn with it is the
one mlx-lm's sampler would draw; it also gives the distribution it draws from
(`TokenDistribution.logits`). Temperature 0 is mlx-lm's greedy sampler.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, categorical_sampling, greedy_sampler

# sampler(logprobs [B, vocab]) -> tokens [B]
Sampler = Callable[[mx.array], mx.array]


class TokenDistribution:
    """A sampler (log-probabilities [B, vocab] -> tokens [B]) that also says what it samples from."""

    def __init__(self, temp: float, top_p: float = 1.0, min_p: float = 0.0, top_k: int = 0, min_tokens_to_keep: int = 1):
        if not temp > 0:
            raise ValueError(f"temperature {temp}: a sampled distribution needs a positive temperature")
        self.temp = temp
        self.filters: list[Callable[[mx.array], mx.array]] = []
        if 0 < top_p < 1.0:
            self.filters.append(lambda x: apply_top_p(x, top_p))
        if min_p != 0.0:
            self.filters.append(lambda x: apply_min_p(x, min_p, min_tokens_to_keep))
        if top_k > 0:
            self.filters.append(lambda x: apply_top_k(x, top_k))

    def _filtered(self, logprobs: mx.array) -> mx.array:
        for keep in self.filters:
            logprobs = keep(logprobs)
        return logprobs

    def logits(self, logprobs: mx.array) -> mx.array:
        """The logits a token is drawn from (softmax gives its probabilities): filtered, scaled."""
        return self._filtered(logprobs) * (1.0 / self.temp)

    def __call__(self, logprobs: mx.array) -> mx.array:
        return categorical_sampling(self._filtered(logprobs), self.temp)


def make_sampler(temp: float = 0.0, top_p: float = 1.0, min_p: float = 0.0, top_k: int = 0) -> Sampler:
    """mlx-lm's `make_sampler` for these settings: greedy at temperature 0, else a TokenDistribution."""
    return greedy_sampler if temp == 0 else TokenDistribution(temp, top_p=top_p, min_p=min_p, top_k=top_k)
