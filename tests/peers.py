"""Running the peers (mlx-vlm, mlx-lm) on a checkpoint folder, for the interop tests: their loaders,
their models' greedy tokens, the bits of their quantized modules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map

from mlx_unified.checkpoint import hf_to_mlx_name


def bits_by_module(model: nn.Module) -> dict[str, tuple[int, int, str]]:
    """(bits, group size, mode) of every quantized module, by our module path (whoever's model it is)."""
    return {
        hf_to_mlx_name(path): (module.bits, module.group_size, module.mode)
        for path, module in model.named_modules()
        if hasattr(module, "bits")
    }


def in_float32(model: nn.Module) -> nn.Module:
    """`model` computing in float32: its floating parameters (weights, scales, biases) cast, exactly.

    Two implementations agree to float32 rounding, but in bf16 their different orders of operations
    round differently, and a random model's near-tied logits then pick different greedy tokens."""
    model.update(
        tree_map(lambda x: x.astype(mx.float32) if mx.issubdtype(x.dtype, mx.floating) else x, model.parameters())
    )
    return model


def vlm_model(folder: Path) -> nn.Module:
    from mlx_vlm.utils import load_model

    return in_float32(load_model(Path(folder)))


def vlm_greedy(model: nn.Module, prompt: dict[str, np.ndarray], max_tokens: int) -> list[int]:
    """mlx-vlm's own generation loop (`generate.ar.generate_step`), greedy."""
    from mlx_vlm.generate.ar import generate_step

    media = {k: mx.array(v) for k, v in prompt.items() if k not in ("input_ids", "mm_token_type_ids")}
    steps = generate_step(
        mx.array(prompt["input_ids"]), model, None, None, max_tokens=max_tokens, temperature=0.0, **media
    )
    return [int(token) for token, _ in steps]


def lm_greedy(model: nn.Module, input_ids: np.ndarray, max_tokens: int) -> list[int]:
    """mlx-lm's own generation loop (`generate.generate_step`), greedy."""
    from mlx_lm.generate import generate_step

    return [int(token) for token, _ in generate_step(mx.array(input_ids[0]), model, max_tokens=max_tokens)]


def our_greedy(model: Any, prompt: dict[str, np.ndarray], max_tokens: int) -> list[int]:
    from mlx_unified.generation import generate_step

    return [token for token, _ in generate_step(model, prompt, max_tokens=max_tokens)]
