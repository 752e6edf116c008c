"""Random checkpoints built with the reference implementation (transformers' gemma4_unified), and its outputs.

Every parameter is drawn at random (norm weights around 1, layer_scalar in [0.5, 1.5], a random position
table), so no part of the model passes a test by being the identity.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Gemma4UnifiedConfig, Gemma4UnifiedForConditionalGeneration

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
    text = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        global_head_dim=32,
        num_global_key_value_heads=1,
        attention_k_eq_v=True,
        vocab_size=VOCAB,
        sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "full_attention"],
        final_logit_softcapping=30.0,
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
