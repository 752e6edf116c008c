"""Random checkpoints built with the reference implementation (transformers' gemma4_unified and its MTP
drafter, gemma4_unified_assistant), their outputs, and prompts in its tiny vocabulary: what the tests and
benchmarks check our port against.

Every parameter is drawn at random (norm weights around 1, layer_scalar in [0.5, 1.5], a random position
table), so no part of the model passes a test by being the identity. Needs the `dev` extras (PyTorch and
transformers).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import torch
from transformers import (
    Gemma4UnifiedAssistantConfig,
    Gemma4UnifiedAssistantForCausalLM,
    Gemma4UnifiedConfig,
    Gemma4UnifiedForConditionalGeneration,
)
from transformers.models.gemma4_unified.configuration_gemma4_unified import Gemma4UnifiedTextConfig

from ..config import default_layer_types
from . import TINY_TEXT

# Small special-token ids, inside the tiny vocabulary.
TOKENS = dict(
    boi_token_id=490,
    eoi_token_id=491,
    image_token_id=492,
    video_token_id=493,
    boa_token_id=494,
    eoa_token_index=495,
    audio_token_id=496,
)
VOCAB = 512

# The reference tests' shapes (`reference_config` overrides), each with a window shorter than the prompts.
SHAPES = {
    # window 8; GQA 2; K=V global layers with proportional RoPE
    "kv_shared": dict(),
    # odd head count, GQA 3, window 5, the 5:1 pattern
    "odd_heads": dict(
        num_attention_heads=3, num_key_value_heads=1, head_dim=8, global_head_dim=16, sliding_window=5,
        num_hidden_layers=6, layer_types=default_layer_types(6),
    ),
    # no K=V: global layers keep v_proj and a K-and-V cache; GQA 4
    "separate_kv": dict(num_attention_heads=8, num_key_value_heads=2, attention_k_eq_v=False, head_dim=8),
}
RELATIVE_TOLERANCE = 1e-4
# Embeddings this small leave the choice of each token to the layers (`build_reference_model`), so a
# greedy reference changes token often: a greedy-equality test against it can fail.
VARIED_EMBED_STD = 0.07
MIN_DISTINCT_TOKENS = 8


def assert_varied(tokens: list[int], at_least: int = MIN_DISTINCT_TOKENS) -> None:
    """A greedy-equality test's reference must hold `at_least` distinct tokens: one repeated token is
    matched by a model whose layers compute nothing."""
    assert len(set(tokens)) >= at_least, f"the reference repeats itself ({len(set(tokens))} distinct): {tokens}"


def relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
    """The largest error relative to the largest reference value."""
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def reference_config(**text_overrides: Any) -> Gemma4UnifiedConfig:
    """The tiny checkpoint's text settings, shrunk further: 4 layers (2 of each kind), window 8."""
    text = dict(
        TINY_TEXT,
        intermediate_size=96,
        num_hidden_layers=4,
        vocab_size=VOCAB,
        sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "full_attention"],
    )
    text.update(text_overrides)
    hidden = text["hidden_size"]
    return Gemma4UnifiedConfig(
        text_config=text,
        vision_config=dict(mm_embed_dim=hidden, output_proj_dims=hidden, mm_posemb_size=24),
        audio_config=dict(audio_embed_dim=640),
        **TOKENS,
    )


@contextmanager
def shared_kv_patch() -> Iterator[None]:
    """The test-side patch transformers 5.23 needs to build and run its MTP drafter (REFERENCE.md, "The
    drafter"): its `kv_sharing_modes` refuses a config whose every layer reads shared KV (the drafter), and
    marks no layer "store" when no layer is shared (the 12B target), so the target returns no
    `shared_kv_states`. Patched: a drafter's layers all "reuse"; a target's last layer of each type
    "store"s (which changes none of its outputs). Layers read the property when they are built."""
    original = Gemma4UnifiedTextConfig.kv_sharing_modes

    def kv_sharing_modes(config: Gemma4UnifiedTextConfig) -> list[str | None]:
        n, types = config.num_hidden_layers, config.layer_types
        if config.num_kv_shared_layers == n:
            return ["reuse"] * n
        if config.num_kv_shared_layers == 0:
            modes: list[str | None] = [None] * n
            for kind in set(types):
                modes[n - 1 - types[::-1].index(kind)] = "store"
            return modes
        return original.fget(config)

    Gemma4UnifiedTextConfig.kv_sharing_modes = property(kv_sharing_modes)
    try:
        yield
    finally:
        Gemma4UnifiedTextConfig.kv_sharing_modes = original


def _randomize(
    model: torch.nn.Module, layers: torch.nn.ModuleList, generator: torch.Generator, embed_std: float = 0.5
) -> None:
    """Every parameter at random: norm weights around 1, biases small, matrices at 1/sqrt(fan_in)
    (the position table at 0.5, the embeddings at embed_std), each layer_scalar in [0.5, 1.5]."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name or name.endswith("_ln1.weight") or name.endswith(
                "_ln2.weight"
            ):
                param.copy_(1.0 + 0.3 * torch.randn(param.shape, generator=generator))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
            else:
                fan_in = param.shape[-1] if param.ndim > 1 else 1
                std = 0.5 if "pos_embedding" in name else embed_std if "embed_tokens" in name else fan_in**-0.5
                param.copy_(std * torch.randn(param.shape, generator=generator))
        for layer in layers:
            layer.layer_scalar.copy_(0.5 + torch.rand(1, generator=generator))


def build_reference_model(
    seed: int = 0, embed_std: float = 0.5, **text_overrides: Any
) -> Gemma4UnifiedForConditionalGeneration:
    """A random reference model. With the default embeddings (std 0.5) the embedding dominates every
    position, and greedy decoding repeats one token; with embed_std 0.07 the layers decide, and from a
    tenth to a half of the greedy tokens repeat the one before (a test of speculative decoding needs
    both accepted and rejected drafts)."""
    torch.manual_seed(seed)
    with shared_kv_patch():
        model = Gemma4UnifiedForConditionalGeneration(reference_config(**text_overrides)).eval()
    _randomize(model, model.model.language_model.layers, torch.Generator().manual_seed(seed + 1), embed_std)
    return model


def build_reference_checkpoint(
    path: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32, embed_std: float = 0.5, **text_overrides
):
    """Save a random reference model in the released layout; returns the torch model (float32)."""
    model = build_reference_model(seed, embed_std, **text_overrides)
    model.to(dtype).save_pretrained(str(path))
    return model.float()


def reference_logits(model, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """Full forward of the reference, float32 logits [B, L, vocab]."""
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()})
    return out.logits.float().numpy()


def reference_greedy(
    model: Gemma4UnifiedForConditionalGeneration,
    inputs: dict[str, np.ndarray],
    max_new_tokens: int,
    drafter: Gemma4UnifiedAssistantForCausalLM | None = None,
    num_draft_tokens: int = 3,
) -> list[int]:
    """Greedy tokens from the reference's own `generate` (its cache and masks); with a drafter, its
    assisted generation (`assistant_model=drafter`: transformers' MTP candidate generator drafting
    `num_draft_tokens` tokens a round, verified in one target pass)."""
    assisted = {}
    if drafter is not None:
        drafter.generation_config.num_assistant_tokens = num_draft_tokens
        assisted = {"assistant_model": drafter}
    with torch.no_grad(), shared_kv_patch():
        out = model.generate(
            **{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()},
            **assisted,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def image_inputs(rng: np.random.Generator, num_patches: int, budget: int, grid_width: int):
    """pixel_values [1, budget, 6912] and positions [1, budget, 2] for one image of num_patches patches."""
    pixels = np.zeros((1, budget, 6912), np.float32)
    pixels[0, :num_patches] = rng.random((num_patches, 6912), dtype=np.float32)
    positions = np.full((1, budget, 2), -1, np.int64)
    for k in range(num_patches):
        positions[0, k] = (k % grid_width, k // grid_width)
    return pixels, positions


def audio_inputs(rng: np.random.Generator, num_frames: int, padded: int):
    frames = np.zeros((1, padded, 640), np.float32)
    frames[0, :num_frames] = 0.1 * rng.standard_normal((num_frames, 640), dtype=np.float32)
    mask = np.zeros((1, padded), bool)
    mask[0, :num_frames] = True
    return frames, mask


def reference_drafter_config(
    target: Gemma4UnifiedForConditionalGeneration,
    *,
    centroids: bool = False,
    **text_overrides: Any,
) -> Gemma4UnifiedAssistantConfig:
    """A small drafter for `target`: its attention shapes (head dims, KV heads, K=V) are the target's,
    since it attends over the target's keys; its own width, depth and query heads are smaller.
    centroids: the centroid-masked head (`use_ordered_embeddings`), 16 clusters of 32 tokens, top 4."""
    t = target.config.text_config
    sliding = t.per_layer_config[t.layer_types.index("sliding_attention")]
    full = t.per_layer_config[t.layer_types.index("full_attention")]
    text = dict(
        model_type="gemma4_unified_text",
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=2 * sliding.num_key_value_heads,
        num_key_value_heads=sliding.num_key_value_heads,
        head_dim=sliding.head_dim,
        global_head_dim=full.head_dim,
        num_global_key_value_heads=full.num_key_value_heads,
        attention_k_eq_v=t.attention_k_eq_v,
        vocab_size=t.vocab_size,
        sliding_window=t.sliding_window,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
    )
    text.update(text_overrides)
    return Gemma4UnifiedAssistantConfig(
        text_config=text,
        backbone_hidden_size=t.hidden_size,
        use_ordered_embeddings=centroids,
        num_centroids=16,
        centroid_intermediate_top_k=4,
    )


def build_reference_drafter(
    target: Gemma4UnifiedForConditionalGeneration, seed: int = 0, *, centroids: bool = False, **text_overrides: Any
) -> Gemma4UnifiedAssistantForCausalLM:
    """A random `Gemma4UnifiedAssistantForCausalLM` for `target` (float32, eval mode); with centroids, a
    random token ordering (a permutation of the vocabulary, as the released one is)."""
    torch.manual_seed(seed)
    with shared_kv_patch():
        drafter = Gemma4UnifiedAssistantForCausalLM(
            reference_drafter_config(target, centroids=centroids, **text_overrides)
        ).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    _randomize(drafter, drafter.model.layers, generator)
    if centroids:
        vocab = drafter.config.get_text_config().vocab_size
        drafter.masked_embedding.token_ordering.copy_(torch.randperm(vocab, generator=generator))
    return drafter


def make_copying(drafter: Gemma4UnifiedAssistantForCausalLM, target: Gemma4UnifiedForConditionalGeneration) -> None:
    """Turn a reference drafter into one that drafts the last token again (a real drafter checkpoint:
    only its weights are chosen). pre_projection passes the first `hidden` dims of the target's token
    embedding, every layer adds nothing (o_proj and down_proj zero, layer_scalar 1), the final norm has
    unit weight, and the tied head is those dims of the target's embeddings: the largest logit is then
    the token's own, whatever the hidden state. Against a target that repeats tokens part of the
    time, its drafts are accepted part of the time."""
    hidden = drafter.config.get_text_config().hidden_size
    embeddings = target.get_input_embeddings().weight
    with torch.no_grad():
        drafter.pre_projection.weight.zero_()
        drafter.pre_projection.weight[:, :hidden] = torch.eye(hidden)
        for layer in drafter.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
            layer.layer_scalar.fill_(1.0)
        drafter.model.norm.weight.fill_(1.0)
        drafter.model.embed_tokens.weight.copy_(embeddings[:, :hidden])


def reference_target_outputs(
    target: Gemma4UnifiedForConditionalGeneration, inputs: dict[str, np.ndarray]
) -> tuple[np.ndarray, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """What the reference's MTP candidate generator takes from a target forward: the last hidden state
    (`hidden_states[-1]`, which transformers ties to the output after the final norm) [B, L, hidden],
    and `shared_kv_states`: per layer type, the keys and values of the last layer of that type over
    every position of the call [B, n_kv, L, head_dim] (keys rotated)."""
    with torch.no_grad():
        out = target(
            **{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()},
            output_hidden_states=True,
            return_shared_kv_states=True,
        )
    shared = {kind: (k.numpy(), v.numpy()) for kind, (k, v) in out.shared_kv_states.items()}
    return out.hidden_states[-1].numpy(), shared


def reference_drafter_step(
    drafter: Gemma4UnifiedAssistantForCausalLM,
    inputs_embeds: np.ndarray,
    shared: dict[str, tuple[np.ndarray, np.ndarray]],
    position: int,
) -> tuple[np.ndarray, np.ndarray]:
    """One drafter call as the candidate generator makes it: inputs_embeds [1, 1, 2 * backbone] (the
    target's embedding of the last token, then the hidden state), every draft query at `position`.
    Returns (logits [1, 1, vocab], projected hidden state [1, 1, backbone])."""
    kv_length = shared["full_attention"][0].shape[2]
    with torch.no_grad():
        out = drafter(
            inputs_embeds=torch.from_numpy(inputs_embeds),
            position_ids=torch.tensor([[position]]),
            attention_mask=torch.ones(1, kv_length + 1, dtype=torch.long),
            shared_kv_states={k: (torch.from_numpy(a), torch.from_numpy(b)) for k, (a, b) in shared.items()},
        )
    return out.logits.numpy(), out.last_hidden_state.numpy()


def reference_token_embedding(target: Gemma4UnifiedForConditionalGeneration, token: int) -> np.ndarray:
    """The target's input embedding of one token [1, 1, hidden] (scaled), as the drafter is fed it."""
    with torch.no_grad():
        return target.get_input_embeddings()(torch.tensor([[token]])).numpy()


def text_prompt(rng: np.random.Generator, length: int = 48) -> dict[str, np.ndarray]:
    """`<bos>` and random token ids below the special ones."""
    return {"input_ids": np.concatenate([[[2]], rng.integers(3, 480, (1, length - 1))], axis=1)}


def image_prompt(rng: np.random.Generator, num_patches: int = 12, budget: int = 16) -> dict[str, np.ndarray]:
    """Two text tokens, an image (its bidirectional block), then text."""
    pixels, positions = image_inputs(rng, num_patches, budget, grid_width=4)
    ids = [2, 7, 9, TOKENS["boi_token_id"]] + [TOKENS["image_token_id"]] * num_patches + [TOKENS["eoi_token_id"]]
    ids += list(rng.integers(3, 480, 6))
    ids = np.array([ids])
    return {
        "input_ids": ids,
        "pixel_values": pixels,
        "image_position_ids": positions,
        "mm_token_type_ids": (ids == TOKENS["image_token_id"]).astype(np.int64),
    }


def audio_prompt(rng: np.random.Generator, num_frames: int = 9, padded: int = 12) -> dict[str, np.ndarray]:
    """A text token, an audio clip (padded frames masked out), then text."""
    frames, mask = audio_inputs(rng, num_frames, padded)
    ids = [2, 11, TOKENS["boa_token_id"]] + [TOKENS["audio_token_id"]] * num_frames + [TOKENS["eoa_token_index"]]
    ids += list(rng.integers(3, 480, 5))
    return {"input_ids": np.array([ids]), "input_features": frames, "input_features_mask": mask}


def image_audio_prompt(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """An image (7 patches) then an audio clip (6 frames) then text, as the processor lays them out."""
    pixels, positions = image_inputs(rng, 7, 9, grid_width=3)
    frames, mask = audio_inputs(rng, 6, 6)
    ids = [2, TOKENS["boi_token_id"], *[TOKENS["image_token_id"]] * 7, TOKENS["eoi_token_id"]]
    ids += [TOKENS["boa_token_id"], *[TOKENS["audio_token_id"]] * 6, TOKENS["eoa_token_index"]]
    ids = np.array([ids + list(rng.integers(3, 480, 8))])
    mm = (ids == TOKENS["image_token_id"]).astype(np.int64)
    mm[ids == TOKENS["audio_token_id"]] = 3
    return {
        "input_ids": ids,
        "pixel_values": pixels,
        "image_position_ids": positions,
        "input_features": frames,
        "input_features_mask": mask,
        "mm_token_type_ids": mm,
    }


PROMPTS = {
    "text": lambda rng: text_prompt(rng, 21),
    "image": image_prompt,
    "audio": audio_prompt,
    "image+audio": image_audio_prompt,
}


def logits(model: Any, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """Our model's float32 logits [B, L, vocab] for one of these prompts."""
    arrays = {k: mx.array(v) for k, v in inputs.items()}
    return np.array(model(arrays.pop("input_ids"), **arrays).astype(mx.float32))


def compare(ours: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Logit error (absolute, and relative to the reference logits' size) and top-1 agreement."""
    error = np.abs(ours - reference)
    return {
        "max_abs_error": float(error.max()),
        "mean_abs_error": float(error.mean()),
        "relative_error": float(error.max() / np.abs(reference).max()),
        "mean_relative_error": float(error.mean() / np.abs(reference).mean()),
        "top1_agreement": float((ours.argmax(-1) == reference.argmax(-1)).mean()),
    }
