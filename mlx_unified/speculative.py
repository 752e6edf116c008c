"""Speculative decoding with Gemma 4's MTP drafter: draft k tokens, verify k + 1 positions in one target
pass, keep the longest accepted prefix, roll the caches back, and choose the next k from how it went.

What the drafter reads of the target, taken from what the target already holds:
- its last hidden state after the final norm at the position before the draft
  (`Model.forward_embeddings(..., return_hidden=True)`), and
- the keys and values of its last sliding and last global layer (`shared_kv`, from the caches).
Our global K=V layers cache one tensor v = v_norm(k_proj(x)); the reference's keys are
rope(k_norm(k_proj(x))) = rope(k_norm.weight * v), derived here as the layer derives them. The drafter
reads window + 1 positions of the last sliding layer (see `mlx_unified.drafter.model`).

A round from the last token y at position q (the caches hold positions < q; `hidden` is the target's
state at q - 1): the drafter drafts d1..dk from position q; the target runs [y, d1..dk] at q..q+k in one
pass (k + 1 <= `attention.DECODE_MAX_TOKENS` stays on the decode kernels) and judges each draft
(`Acceptance`); the accepted d1..da and one more token of the target's (the replacement of the first
rejected draft, or a bonus token after all k) are emitted; the caches drop the k - a rejected positions.
Sliding rings keep window + k_max + 1 slots (`prepare_cache`): verifying writes k + 1 slots, and after
the rollback the ring still holds every position decoding and the drafter read, the slots of the
dropped positions restored bit for bit from a copy taken before verifying.

How many tokens to draft (`DraftLength`) follows the running acceptance and the measured cost of a
round against a plain decode step, down to 0 (plain decoding), so a drafter that does not help costs
almost nothing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import mlx.core as mx
from mlx_lm.sample_utils import greedy_sampler

from .attention import DECODE_MAX_TOKENS
from .cache import LayerCache, RingSlots, maybe_quantize
from .drafter import Drafter, KeyValues
from .emphasis import SpanBias
from .kv_quantization import KVQuantization
from .model import Attention, Model
from .sampling import Sampler, TokenDistribution

# processor(tokens so far, logits [1, vocab]) -> logits, as mlx-lm's.
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]

# Verifying k + 1 tokens stays on the decode kernels.
AUTO_MAX_DRAFTS = DECODE_MAX_TOKENS - 1
# -- what the drafter reads ------------------------------------------------------------------------------


def prepare_cache(cache: Sequence[LayerCache], max_drafts: int) -> None:
    """Give every layer cache the room verifying `max_drafts` drafts and rolling back needs."""
    for layer in cache:
        layer.reserve_for_drafts(max_drafts)


def shared_kv(model: Model, cache: list[LayerCache]) -> dict[str, KeyValues]:
    """The keys and values of the target's last layer of each type, for every position its cache
    holds that the drafter reads: the reference's `shared_kv_states`, keyed by layer type."""
    text = model.config.text
    out = {}
    for kind in sorted(set(text.layer_types)):
        index = text.last_layer(kind)
        out[kind] = layer_kv(model.language_model.layers[index].self_attn, cache[index])
    return out


def layer_kv(attention: Attention, cache: LayerCache) -> KeyValues:
    """One layer's keys and values from its cache, in position order, dense (a sliding ring: the last
    window + 1 positions, or as many as it holds; a K=V layer's keys derived from its one tensor)."""
    if cache.offset == 0:
        raise ValueError("the target's cache is empty: the drafter reads positions the target has seen")
    keys, values, start = cache.held_kv()
    return KeyValues(attention.shared_keys(values, start) if keys is None else keys, values, start)


def draft(
    drafter: Drafter,
    model: Model,
    target: dict[str, KeyValues],
    token: mx.array,
    hidden: mx.array,
    position: int,
    steps: int,
    sampler: Sampler | None = None,
) -> tuple[mx.array, mx.array]:
    """`steps` draft tokens after `token` [B] (the last token, at `position`), as the reference's MTP
    candidate generator drafts them: every step queries from `position` with the same target keys, fed
    the target's embedding of the previous token and the previous hidden state (first the target's,
    `hidden` [B, backbone], then the drafter's projected state). sampler: log-probabilities [B, vocab]
    -> tokens [B] (None: the argmax of the logits). Returns (tokens [B, steps], logits [B, steps, vocab])."""
    tokens, logits = [], []
    hidden = hidden[:, None]
    for _ in range(steps):
        step_logits, hidden = drafter(model.language_model.embed(token[:, None]), hidden, target, position)
        row = step_logits[:, 0]
        token = greedy_sampler(row) if sampler is None else sampler(row - mx.logsumexp(row, axis=-1, keepdims=True))
        tokens.append(token)
        logits.append(row)
    return mx.stack(tokens, axis=1), mx.stack(logits, axis=1)


# -- judging drafts --------------------------------------------------------------------------------------


class Acceptance:
    """How the target judges drafts. `judge(target_logits [n, vocab], draft_logits [m, vocab],
    drafts [m])`, m = n - 1 or m = n, returns (accepted [m] bool, tokens [n]): tokens[i] is what the
    target emits at row i if draft i is rejected (or, at row m, after every draft was accepted)."""

    def judge(self, target_logits: mx.array, draft_logits: mx.array, drafts: mx.array) -> tuple[mx.array, mx.array]:
        raise NotImplementedError

    def draft_sampler(self) -> Sampler | None:
        raise NotImplementedError


class MatchAcceptance(Acceptance):
    """For any sampler (None: greedy): the target samples its own token at each row, and a draft is
    accepted while it is that token. Every emitted token is then the target's own sample given the
    tokens before it, so the output is distributed (greedy: is) exactly as plain decoding's."""

    def __init__(self, sampler: Sampler | None):
        self.sampler = sampler

    def judge(self, target_logits, draft_logits, drafts):
        if self.sampler is None:
            tokens = greedy_sampler(target_logits)  # the logits themselves, as plain greedy decoding
        else:
            tokens = self.sampler(target_logits - mx.logsumexp(target_logits, axis=-1, keepdims=True))
        return tokens[: drafts.shape[0]] == drafts, tokens

    def draft_sampler(self):
        return self.sampler


class RejectionAcceptance(Acceptance):
    """Speculative sampling (Leviathan et al. 2023, Chen et al. 2023) for a sampler whose distribution
    is known: draft d ~ q is accepted with probability min(1, p(d) / q(d)); a rejected one is replaced
    by a sample of max(p - q, 0), renormalized; after every draft, a bonus token ~ p. p and q are the
    target's and the drafter's distributions after the same temperature and filters (the drafter's
    exact logits: its centroid head gives unscored tokens a finite floor, not -inf). The emitted tokens
    are then distributed as the target's."""

    def __init__(self, distribution: TokenDistribution):
        self.distribution = distribution

    def _probabilities(self, logits: mx.array) -> mx.array:
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return mx.softmax(self.distribution.logits(logprobs).astype(mx.float32), axis=-1)

    def judge(self, target_logits, draft_logits, drafts):
        m = drafts.shape[0]
        if m == 0:  # no draft to judge: the target's own sample, as plain decoding draws it
            logprobs = target_logits - mx.logsumexp(target_logits, axis=-1, keepdims=True)
            return mx.zeros((0,), dtype=mx.bool_), self.distribution(logprobs)
        p = self._probabilities(target_logits)
        q = self._probabilities(draft_logits)
        rows = mx.arange(m)
        p_draft, q_draft = p[rows, drafts], q[rows, drafts]
        accepted = mx.random.uniform(shape=(m,)) * q_draft < p_draft
        residual = mx.maximum(p[:m] - q, 0.0)
        # p == q leaves no residual (and never rejects): sample p then.
        residual = mx.where(residual.sum(axis=-1, keepdims=True) > 0, residual, p[:m])
        rows_to_sample = mx.concatenate([residual, p[m:]], axis=0)
        return accepted, mx.random.categorical(mx.log(rows_to_sample))

    def draft_sampler(self):
        return self.distribution


def acceptance_for(sampler: Sampler | None) -> Acceptance:
    return RejectionAcceptance(sampler) if isinstance(sampler, TokenDistribution) else MatchAcceptance(sampler)


# -- how many tokens to draft ----------------------------------------------------------------------------


@dataclass
class SpeculativeStats:
    """Counts of one speculative generation (as mlx-vlm reports them)."""

    rounds: int = 0  # target passes that verified drafts
    drafted: int = 0
    accepted: int = 0
    plain_steps: int = 0  # target passes of one token (no drafts)
    draft_lengths: list[int] = field(default_factory=list, repr=False)  # k of every round, in order

    def record(self, drafted: int, accepted: int) -> None:
        if drafted:
            self.rounds += 1
            self.drafted += drafted
            self.accepted += accepted
            self.draft_lengths.append(drafted)
        else:
            self.plain_steps += 1

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafts over drafted ones (0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verifying pass: accepted drafts + the target's own token (0: no rounds)."""
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0


class DraftLength:
    """Chooses k, the drafts of the next round, to maximize expected tokens per second.

    With per-draft acceptance a (the running estimate, exponentially forgetting old rounds), a round of
    k drafts emits (1 - a^(k+1)) / (1 - a) tokens; its cost T(k) is measured (the wall time from one
    step's result to the next, untimed on the first use of each k, which builds kernels), T(0) being a
    plain decode step; unmeasured k are interpolated linearly. k = 0 is plain decoding: while it wins,
    a 1-draft probe runs after `probe_gap` plain steps, the gap doubling (up to MAX_PROBE_GAP) with
    every probe that accepts nothing, so a useless drafter costs a probe every 128 tokens.
    `fixed`: always that k (the peers' --num-draft-tokens N).
    """

    FORGET = 0.9  # weight of the past per round, for acceptance and timings
    FIRST_PROBE_GAP, MAX_PROBE_GAP = 4, 128
    START = 2  # the first rounds' k, before timings exist

    def __init__(self, max_drafts: int = AUTO_MAX_DRAFTS, fixed: int | None = None):
        self.max_drafts = max_drafts if fixed is None else fixed
        self.fixed = fixed
        self.successes = self.failures = 0.0
        self.seconds: dict[int, float] = {}  # forgetting average of T(k)
        self.uses: dict[int, int] = {}
        self.plain_since_probe = 0
        self.probe_gap = self.FIRST_PROBE_GAP

    def acceptance(self) -> float:
        return (self.successes + 1.0) / (self.successes + self.failures + 2.0)

    def cost(self, k: int) -> float | None:
        """T(k): measured, or interpolated from the measured ones (None before any)."""
        if k in self.seconds:
            return self.seconds[k]
        if 0 not in self.seconds or len(self.seconds) < 2:
            return None
        base = self.seconds[0]
        slopes = [(t - base) / j for j, t in self.seconds.items() if j]
        return base + k * sum(slopes) / len(slopes)

    def choose(self, limit: int) -> int:
        """k for the next round, at most `limit` (the tokens left to generate, less one)."""
        top = max(0, min(self.max_drafts, limit))
        if self.fixed is not None or top == 0:
            return top
        if self.uses.get(0, 0) < 2:
            return 0  # a warm-up step, then a timed one: T(0) is the yardstick
        start = min(self.START, top)
        if self.uses.get(start, 0) < 2 and not any(self.uses.get(k, 0) >= 2 for k in range(1, top + 1)):
            return start
        a, best, best_rate = self.acceptance(), 0, 1.0 / self.seconds[0]
        for k in range(1, top + 1):
            cost = self.cost(k)
            if cost is None:
                continue
            tokens = (1 - a ** (k + 1)) / (1 - a) if a < 1 else k + 1.0
            if tokens / cost > best_rate:
                best, best_rate = k, tokens / cost
        if best == 0:
            self.plain_since_probe += 1
            if self.plain_since_probe > self.probe_gap:
                return 1
        return best

    def record(self, drafted: int, accepted: int, seconds: float) -> None:
        uses = self.uses.get(drafted, 0)
        self.uses[drafted] = uses + 1
        if uses and math.isfinite(seconds):  # the first use builds kernels: not timed
            old = self.seconds.get(drafted)
            self.seconds[drafted] = seconds if old is None else self.FORGET * old + (1 - self.FORGET) * seconds
        if not drafted:
            return
        self.successes = self.FORGET * self.successes + accepted
        self.failures = self.FORGET * self.failures + (accepted < drafted)
        if drafted == 1 and self.plain_since_probe > self.probe_gap:  # a probe
            self.plain_since_probe = 0
            self.probe_gap = self.FIRST_PROBE_GAP if accepted else min(2 * self.probe_gap, self.MAX_PROBE_GAP)


# -- the loop --------------------------------------------------------------------------------------------


@dataclass
class Pass:
    """One target pass in flight (lazy until `Speculation.finish`)."""

    drafts: mx.array  # [k]
    draft_logits: mx.array  # [k, vocab]
    logits: mx.array  # [k + 1, vocab], the target's, before logits processors
    hidden: mx.array  # [k + 1, backbone]
    saved: list[RingSlots | None]  # per layer, what its rollback puts back


class Speculation:
    """The state between target passes: the caches (positions < q), the last token (at q, not yet
    run), the target's hidden state at q - 1, and what logits processors have seen. `launch(k)`
    drafts k tokens and schedules their verification; `finish` judges them, rolls the caches back to
    the accepted tokens and returns the emitted ones."""

    def __init__(
        self,
        model: Model,
        drafter: Drafter,
        cache: list[LayerCache],
        token: mx.array,
        hidden: mx.array,
        history: mx.array,
        *,
        sampler: Sampler | None = None,
        logits_processors: Sequence[LogitsProcessor] = (),
        key_bias: SpanBias | None = None,
        kv_quantization: KVQuantization | None = None,
    ):
        """token [1]; hidden [1, backbone]; history: the token ids so far, `token` included;
        kv_quantization: the caches are quantized (in the list) once they hold its start."""
        self.model, self.drafter, self.cache = model, drafter, cache
        self.kv_quantization = kv_quantization
        self.token, self.hidden, self.history = token, hidden, history
        self.acceptance = acceptance_for(sampler)
        self.logits_processors = list(logits_processors)
        self.key_bias = key_bias

    def launch(self, k: int) -> Pass:
        model, cache = self.model, self.cache
        maybe_quantize(cache, self.kv_quantization)  # before the copies a rollback puts back
        if k:
            target = shared_kv(model, cache)
            drafts, draft_logits = draft(
                self.drafter, model, target, self.token, self.hidden, cache[0].offset, k,
                self.acceptance.draft_sampler(),
            )
            drafts, draft_logits = drafts[0], draft_logits[0]
        else:
            drafts, draft_logits = mx.zeros((0,), mx.int32), mx.zeros((0, model.config.text.vocab_size))
        # What a rollback puts back, copied out before the pass writes the ring (left pending, the
        # copy would keep the old ring alive and make the write copy all of it). A plain step keeps
        # its one position: nothing to save.
        saved = [c.saved_for_trim(k + 1) if k else None for c in cache]
        if any(s is not None for s in saved):
            mx.eval([(s.keys, s.values) for s in saved if s is not None])
        inputs = mx.concatenate([self.token.astype(mx.int32), drafts.astype(mx.int32)])
        logits, states = model.forward_embeddings(
            model.embed_text(inputs[None]), cache=cache, logits_to_keep=k + 1, key_bias=self.key_bias,
            return_hidden=True,
        )
        step = Pass(drafts, draft_logits, logits[0], states[0], saved)
        mx.async_eval(step.logits, step.hidden, step.drafts, step.draft_logits)
        return step

    def finish(self, step: Pass) -> list[tuple[int, mx.array]]:
        """(token, logprobs [vocab]) of the accepted drafts and of the target's token after them."""
        k = step.drafts.shape[0]
        tokens, rows = self._judge(step)
        a = len(tokens) - 1
        for layer, saved in zip(self.cache, step.saved, strict=True):
            layer.trim(k - a, saved)
        self.token, self.hidden = mx.array(tokens[-1:], dtype=mx.int32), step.hidden[a : a + 1]
        mx.async_eval(self.hidden)
        return [(token, row - mx.logsumexp(row, axis=-1, keepdims=True)) for token, row in zip(tokens, rows, strict=True)]

    def _judge(self, step: Pass) -> tuple[list[int], list[mx.array]]:
        """The accepted drafts and the target's token after them, with the logits of their rows."""
        k = step.drafts.shape[0]
        if not self.logits_processors:
            accepted, tokens = self.acceptance.judge(step.logits, step.draft_logits, step.drafts)
            mx.eval(accepted, tokens)
            flags, values = accepted.tolist(), tokens.tolist()
            a = flags.index(False) if False in flags else k
            return [*step.drafts[:a].tolist(), values[a]], [step.logits[i] for i in range(a + 1)]
        # Row by row: a processor only ever sees tokens that stay (it may keep state).
        out, rows = [], []
        for i in range(k + 1):
            row = step.logits[i : i + 1]
            for processor in self.logits_processors:
                row = processor(self.history, row)
            rows.append(row[0])
            drafts = step.drafts[i : min(i + 1, k)]
            accepted, tokens = self.acceptance.judge(row, step.draft_logits[i : min(i + 1, k)], drafts)
            mx.eval(accepted, tokens)
            done = i == k or not accepted.item()
            out.append(int(tokens.item()) if done else int(drafts.item()))
            self.history = mx.concatenate([self.history, mx.array(out[-1:], dtype=self.history.dtype)])
            if done:
                break
        return out, rows


def speculative_decode(
    speculation: Speculation,
    first: tuple[int, mx.array],
    *,
    max_tokens: int,
    num_draft_tokens: int | None = None,
    stats: SpeculativeStats | None = None,
) -> Iterator[tuple[int, mx.array]]:
    """Yield (token, logprobs [vocab]) from `first` (the token sampled after the prompt, which
    `speculation` holds as its last token) on, max(max_tokens, 1) in all, as
    `generation.generate_step` does. num_draft_tokens: None chooses k round by round
    (`DraftLength`), else fixed. Each pass is scheduled before the previous tokens are handed out."""
    lengths = DraftLength(fixed=num_draft_tokens)
    stats = SpeculativeStats() if stats is None else stats
    pending, emitted = [first], 0
    ready = time.perf_counter()
    while True:
        left = max(max_tokens, 1) - emitted - len(pending)
        step = speculation.launch(lengths.choose(left - 1)) if left > 0 else None
        yield from pending
        emitted += len(pending)
        if step is None:
            return
        pending = speculation.finish(step)
        now = time.perf_counter()
        k, accepted = step.drafts.shape[0], len(pending) - 1
        lengths.record(k, accepted, now - ready)
        stats.record(k, accepted)
        ready = now
