"""What the MTP drafter reads of the target, taken from what the target already holds, and its drafts.

The drafter reads, besides the target's embeddings, two things the target computes anyway:
- its last hidden state after the final norm at the position before the draft
  (`Model.forward_embeddings(..., return_hidden=True)`), and
- the keys and values of its last sliding and last global layer (`shared_kv`, from the caches).
Our global K=V layers cache one tensor v = v_norm(k_proj(x)); the reference's keys are
rope(k_norm(k_proj(x))) = rope(k_norm.weight * v), derived here as the layer derives them. The
sliding ring holds position p in slot p % window, so it yields the last `window` positions; the
drafter reads window + 1 of them (see `mlx_unified.drafter.model`), which a ring one slot longer
than the window keeps.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx

from .cache import LayerCache, SharedKVCache, SlidingWindowCache
from .drafter import Drafter, KeyValues
from .model import Attention, Model


def shared_kv(model: Model, cache: list[LayerCache]) -> dict[str, KeyValues]:
    """The keys and values of the target's last layer of each type, for every position its cache
    holds: the reference's `shared_kv_states`, keyed by layer type."""
    text = model.config.text
    out = {}
    for kind in sorted(set(text.layer_types)):
        index = text.last_layer(kind)
        out[kind] = layer_kv(model.language_model.layers[index].self_attn, cache[index])
    return out


def layer_kv(attention: Attention, cache: LayerCache) -> KeyValues:
    """One layer's keys and values from its cache, in position order."""
    if cache.offset == 0:
        raise ValueError("the target's cache is empty: the drafter reads positions the target has seen")
    if isinstance(cache, SharedKVCache):
        values = cache.values[:, :, : cache.offset]
        return KeyValues(attention.shared_keys(values, 0), values, 0)
    if isinstance(cache, SlidingWindowCache):
        start = cache.offset - min(cache.offset, cache.window)
        slots = mx.arange(start, cache.offset) % cache.window
        return KeyValues(cache.keys[:, :, slots], cache.values[:, :, slots], start)
    return KeyValues(cache.keys[:, :, : cache.offset], cache.values[:, :, : cache.offset], 0)


def greedy(logits: mx.array) -> mx.array:
    return mx.argmax(logits, axis=-1)


def draft(
    drafter: Drafter,
    model: Model,
    target: dict[str, KeyValues],
    token: mx.array,
    hidden: mx.array,
    position: int,
    steps: int,
    sampler: Callable[[mx.array], mx.array] = greedy,
) -> tuple[mx.array, mx.array]:
    """`steps` draft tokens after `token` [B] (the last token, at `position`), as the reference's MTP
    candidate generator drafts them: every step queries from `position` with the same target keys, fed
    the target's embedding of the previous token and the previous hidden state (first the target's,
    `hidden` [B, backbone], then the drafter's projected state). sampler maps logits [B, vocab] to tokens
    [B]. Returns (tokens [B, steps], logits [B, steps, vocab])."""
    tokens, logits = [], []
    hidden = hidden[:, None]
    for _ in range(steps):
        step_logits, hidden = drafter(model.language_model.embed(token[:, None]), hidden, target, position)
        token = sampler(step_logits[:, 0])
        tokens.append(token)
        logits.append(step_logits[:, 0])
    return mx.stack(tokens, axis=1), mx.stack(logits, axis=1)
