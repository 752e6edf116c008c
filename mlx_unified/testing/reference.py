"""Random checkpoints built with the reference implementation (transformers' gemma4_unified), its
outputs, and prompts in its tiny vocabulary: what the tests and benchmarks check our port against.

Every parameter is drawn at random (norm weights around 1, layer_scalar in [0.5, 1.5], a random position
table), so no part of the model passes a test by being the identity. Needs the `dev` extras (PyTorch and
transformers).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import torch
from transformers import Gemma4UnifiedConfig, Gemma4UnifiedForConditionalGeneration

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


def build_reference_model(seed: int = 0, **text_overrides: Any) -> Gemma4UnifiedForConditionalGeneration:
    torch.manual_seed(seed)
    model = Gemma4UnifiedForConditionalGeneration(reference_config(**text_overrides)).eval()
    generator = torch.Generator().manual_seed(seed + 1)
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
                std = 0.5 if "pos_embedding" in name or "embed_tokens" in name else fan_in**-0.5
                param.copy_(std * torch.randn(param.shape, generator=generator))
        for layer in model.model.language_model.layers:
            layer.layer_scalar.copy_(0.5 + torch.rand(1, generator=generator))
    return model


def build_reference_checkpoint(path: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32, **text_overrides):
    """Save a random reference model in the released layout; returns the torch model (float32)."""
    model = build_reference_model(seed, **text_overrides)
    model.to(dtype).save_pretrained(str(path))
    return model.float()


def reference_logits(model, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """Full forward of the reference, float32 logits [B, L, vocab]."""
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()})
    return out.logits.float().numpy()


def reference_greedy(model, inputs: dict[str, np.ndarray], max_new_tokens: int) -> list[int]:
    """Greedy tokens from the reference's own `generate` (its cache and masks)."""
    with torch.no_grad():
        out = model.generate(
            **{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()},
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


def text_prompt(rng: np.random.Generator, length: int = 48) -> dict[str, np.ndarray]:
    """`<bos>` and random token ids below the special ones."""
    return {"input_ids": np.concatenate([[[2]], rng.integers(3, 480, (1, length - 1))], axis=1)}


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
