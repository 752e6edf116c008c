"""The MTP drafter against the reference (transformers' Gemma4UnifiedAssistantForCausalLM), in float32.

Targets and drafters are random and built by the reference, in every target shape of
test_model_reference (windows of 8 and 5 tokens, shorter than the prompts).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import mlx_unified
from mlx_unified.cache import SlidingWindowCache
from mlx_unified.config import GLOBAL, SLIDING, ConfigError, ModelConfig
from mlx_unified.drafter import DrafterConfig, DrafterMismatchError, KeyValues, load_drafter
from mlx_unified.speculative import draft, shared_kv
from mlx_unified.testing.reference import (
    PROMPTS,
    RELATIVE_TOLERANCE,
    SHAPES,
    VARIED_EMBED_STD,
    assert_varied,
    build_reference_checkpoint,
    build_reference_drafter,
    reference_drafter_step,
    reference_greedy,
    reference_target_outputs,
    reference_token_embedding,
    relative_error,
    text_prompt,
)

HEADS = ["tied", "centroids"]
DRAFT_STEPS = 3


@pytest.fixture(scope="module", params=sorted(SHAPES))
def target(request, tmp_path_factory):
    """(reference target, ours loaded from its checkpoint, the shape's name)."""
    path = tmp_path_factory.mktemp(f"target-{request.param}")
    ref = build_reference_checkpoint(path, seed=3, embed_std=VARIED_EMBED_STD, **SHAPES[request.param])
    return ref, mlx_unified.load_model(path, dtype="float32"), request.param


@pytest.fixture(scope="module")
def drafters(target, tmp_path_factory):
    """Per head: (reference drafter for the target, ours loaded from its saved checkpoint)."""
    ref_target, _, shape = target
    pairs = {}
    for head in HEADS:
        ref = build_reference_drafter(ref_target, seed=5, centroids=head == "centroids")
        path = tmp_path_factory.mktemp(f"drafter-{shape}-{head}")
        ref.save_pretrained(path)
        pairs[head] = ref, load_drafter(path, dtype="float32")
    return pairs


def reference_draft(ref_target, ref_drafter, inputs, first_token):
    """The reference's first drafting round after a prompt: logits, projected states and tokens of
    DRAFT_STEPS steps from the last hidden state and the shared KV of a target forward."""
    target_hidden, shared = reference_target_outputs(ref_target, inputs)
    position, hidden, token = inputs["input_ids"].shape[1], target_hidden[:, -1:], first_token
    steps = []
    for _ in range(DRAFT_STEPS):
        embedded = np.concatenate([reference_token_embedding(ref_target, token), hidden], axis=-1)
        logits, hidden = reference_drafter_step(ref_drafter, embedded, shared, position)
        token = int(logits.argmax())
        steps.append((logits, hidden, token))
    return steps, target_hidden[:, -1:], shared


@pytest.mark.parametrize("head", HEADS)
def test_drafter_matches_reference_given_the_same_shared_kv(target, drafters, head):
    """Three chained draft steps fed the reference target's shared KV (every prompt position, more
    than the window on sliding layers) and its hidden state: each step's logits and projected state
    within 1e-4 of the reference's (relative to their largest value), the same draft tokens."""
    ref_target, model, _ = target
    ref_drafter, drafter = drafters[head]
    inputs = text_prompt(np.random.default_rng(20), 21)
    steps, hidden, shared = reference_draft(ref_target, ref_drafter, inputs, first_token=17)
    kv = {kind: KeyValues(mx.array(k), mx.array(v), 0) for kind, (k, v) in shared.items()}
    hidden, token, position = mx.array(hidden), 17, inputs["input_ids"].shape[1]
    for ref_logits, ref_projected, ref_token in steps:
        embedded = model.language_model.embed(mx.array([[token]]))
        logits, hidden = drafter(embedded, hidden, kv, position)
        assert relative_error(np.array(logits), ref_logits) < RELATIVE_TOLERANCE
        assert relative_error(np.array(hidden), ref_projected) < RELATIVE_TOLERANCE
        token = int(mx.argmax(logits[0, -1]).item())
        assert token == ref_token


def test_centroid_head_scores_only_the_top_clusters(target, drafters):
    """The centroid head's logits: the top clusters' tokens carry their dot products, every other
    token the smallest of them minus 1 (so the head really is sparse, and the tied head is not)."""
    _, model, _ = target
    _, drafter = drafters["centroids"]
    _, tied = drafters["tied"]
    h = mx.random.normal((1, 2, drafter.config.text.hidden_size), key=mx.random.key(0))
    logits = np.array(drafter.head(h))
    config = drafter.config
    scored = config.centroid_intermediate_top_k * config.text.vocab_size // config.num_centroids
    floor = logits.min()
    assert ((logits > floor).sum(axis=-1) == scored).all()
    assert np.isclose(floor, logits[logits > floor].min() - 1.0)
    assert (np.array(tied.head(h)) > np.array(tied.head(h)).min()).sum() > scored


@pytest.mark.parametrize("kind", ["text", "image+audio"])
def test_target_gives_the_reference_hidden_state_and_shared_kv(target, kind):
    """After a prompt and decoding past the window (the sliding ring wrapped), our target's final
    hidden state and the keys and values `shared_kv` derives from its caches (global keys from the
    one K=V tensor) equal the reference's `hidden_states[-1]` and `shared_kv_states`, position for
    position. The ring holds the last `window` positions; one slot more holds the window + 1 the
    drafter reads."""
    ref_target, model, _ = target
    inputs = PROMPTS[kind](np.random.default_rng(21))
    text = model.config.text
    for extra_slots in (0, 1):
        cache = model.make_cache()
        cache[text.last_layer(SLIDING)] = SlidingWindowCache(text.sliding_window, text.sliding_window + extra_slots)
        arrays = {k: mx.array(v) for k, v in inputs.items()}
        h = model.embed_inputs(arrays["input_ids"], arrays)
        logits, hidden = model.forward_embeddings(
            h, cache=cache, mm_token_type_ids=inputs.get("mm_token_type_ids"), logits_to_keep=1, return_hidden=True
        )
        ids = inputs["input_ids"]
        for _ in range(text.sliding_window + 2):
            token = mx.argmax(logits[:, -1], axis=-1)[:, None]
            ids = np.concatenate([ids, np.array(token)], axis=1)
            logits, hidden = model.forward_embeddings(
                model.embed_text(token), cache=cache, logits_to_keep=1, return_hidden=True
            )
        full = dict(inputs, input_ids=ids)
        if "mm_token_type_ids" in inputs:
            full["mm_token_type_ids"] = np.pad(inputs["mm_token_type_ids"], ((0, 0), (0, ids.shape[1] - h.shape[1])))
        ref_hidden, ref_shared = reference_target_outputs(ref_target, full)
        assert relative_error(np.array(hidden), ref_hidden[:, -1:]) < RELATIVE_TOLERANCE
        got = shared_kv(model, cache)
        assert got[GLOBAL].start == 0 and got[GLOBAL].stop == ids.shape[1]
        assert got[SLIDING].stop == ids.shape[1]
        assert got[SLIDING].keys.shape[2] == text.sliding_window + extra_slots
        for layer_kind, kv in got.items():
            ref_keys, ref_values = (a[:, :, kv.start : kv.stop] for a in ref_shared[layer_kind])
            assert relative_error(np.array(kv.keys), ref_keys) < RELATIVE_TOLERANCE
            assert relative_error(np.array(kv.values), ref_values) < RELATIVE_TOLERANCE


@pytest.mark.parametrize("head", HEADS)
def test_drafts_from_our_target_match_the_reference(target, drafters, head):
    """The whole path on our side (our target's prefill, its hidden state and shared KV from a ring
    one slot longer than the window, `draft`) against the reference's (its target forward, its
    drafter fed as its candidate generator feeds it): the same draft tokens, logits within 1e-4."""
    ref_target, model, _ = target
    ref_drafter, drafter = drafters[head]
    inputs = text_prompt(np.random.default_rng(22), 21)
    text = model.config.text
    cache = model.make_cache()
    cache[text.last_layer(SLIDING)] = SlidingWindowCache(text.sliding_window, text.sliding_window + 1)
    logits, hidden = model.forward_embeddings(
        model.embed_text(mx.array(inputs["input_ids"])), cache=cache, logits_to_keep=1, return_hidden=True
    )
    first = mx.argmax(logits[:, -1], axis=-1)
    tokens, draft_logits = draft(drafter, model, shared_kv(model, cache), first, hidden[:, -1], cache[0].offset, DRAFT_STEPS)
    steps, _, _ = reference_draft(ref_target, ref_drafter, inputs, first_token=int(first.item()))
    assert np.array(tokens)[0].tolist() == [token for _, _, token in steps]
    for i, (ref_logits, _, _) in enumerate(steps):
        assert relative_error(np.array(draft_logits[:, i]), ref_logits[:, 0]) < RELATIVE_TOLERANCE


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("kind", ["text", "image+audio"])
def test_reference_assisted_greedy_equals_plain_greedy(target, drafters, head, kind):
    """The harness the speculative loop is checked against: the reference's generate with the drafter
    as assistant model (3 drafts a round) gives its plain greedy output, 64 tokens past a prompt
    longer than the window."""
    ref_target, _, _ = target
    ref_drafter, _ = drafters[head]
    inputs = text_prompt(np.random.default_rng(23), 21) if kind == "text" else PROMPTS[kind](np.random.default_rng(23))
    expected = reference_greedy(ref_target, inputs, max_new_tokens=64)
    assert_varied(expected)
    assert reference_greedy(ref_target, inputs, max_new_tokens=64, drafter=ref_drafter) == expected


def released_drafter_config(**changes) -> dict:
    """The drafter config as the release writes it (per-type head dims, no per_layer_config)."""
    text = dict(
        model_type="gemma4_unified_text",
        hidden_size=1024,
        intermediate_size=8192,
        num_hidden_layers=4,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=256,
        global_head_dim=512,
        num_global_key_value_heads=1,
        attention_k_eq_v=True,
        vocab_size=262144,
        sliding_window=1024,
        num_kv_shared_layers=4,
        layer_types=["sliding_attention"] * 3 + ["full_attention"],
    )
    text.update(changes.pop("text", {}))
    config = dict(
        model_type="gemma4_unified_assistant",
        backbone_hidden_size=3840,
        use_ordered_embeddings=True,
        num_centroids=2048,
        centroid_intermediate_top_k=32,
        tie_word_embeddings=True,
        text_config=text,
    )
    return {**config, **changes}


def test_released_config_fits_the_released_target():
    config = DrafterConfig.from_dict(released_drafter_config())
    assert config.text.layer(0).head_dim == 256 and config.text.layer(3).head_dim == 512
    assert config.text.layer(3).num_kv_heads == 1 and config.text.sliding_window == 1024
    target = ModelConfig.from_dict({"model_type": "gemma4_unified", "text_config": {}})
    config.check_target(target.text)


def test_bidirectional_all_halves_the_window_as_the_reference_does():
    config = DrafterConfig.from_dict(released_drafter_config(text={"use_bidirectional_attention": "all"}))
    assert config.text.sliding_window == 513


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model_type": "gemma4_assistant"}, "not of gemma4_unified"),
        ({"model_type": "gemma4_unified"}, "expected 'gemma4_unified_assistant'"),
        ({"text": {"num_kv_shared_layers": 2}}, "reads the target's keys"),
        ({"num_centroids": 3000}, "not a multiple of num_centroids"),
        ({"centroid_intermediate_top_k": 0}, "centroid_intermediate_top_k"),
        ({"tie_word_embeddings": False}, "untied"),
        ({"text": {"num_attention_heads": 12}}, "do not divide num_attention_heads"),
    ],
)
def test_config_refusals(changes, message):
    with pytest.raises(ConfigError, match=message):
        DrafterConfig.from_dict(released_drafter_config(**changes))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"backbone_hidden_size": 2560}, "backbone_hidden_size 2560 != target hidden_size 3840"),
        ({"text": {"vocab_size": 131072}, "num_centroids": 1024}, "vocab_size 131072"),
        ({"text": {"global_head_dim": 256}}, "layer 3 \\(full_attention\\): head_dim 256 x 1 KV heads"),
        ({"text": {"num_key_value_heads": 4}}, "layer 0 \\(sliding_attention\\)"),
    ],
)
def test_a_drafter_for_another_target_is_refused(changes, message):
    config = DrafterConfig.from_dict(released_drafter_config(**changes))
    target = ModelConfig.from_dict({"model_type": "gemma4_unified", "text_config": {}})
    with pytest.raises(DrafterMismatchError, match=message):
        config.check_target(target.text)
