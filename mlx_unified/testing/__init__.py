"""Test machinery that ships: a small random checkpoint in the released layout, for smoke runs and
tests with no download (`tiny_checkpoint`, shapes from `scaled_text`), an MTP drafter for one
(`tiny_drafter`, its config from `drafter_config`), the reference harness
(`testing.reference`) and the CPU emulator of Metal kernels (`testing.metal_emulator`; the kernels'
random cases it runs are `kernels.cases`).

A tiny checkpoint's weights are RANDOM: the model it loads writes meaningless text. `config.json`
carries `"mlx_unified_random_weights": true`, and the loader, the CLI and the app say so whenever it is
used.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from ..checkpoint import float_dtype, tensor_shapes, weight_files
from ..config import (
    DEFAULT_ROPE_PARAMETERS,
    GLOBAL,
    RANDOM_WEIGHTS_FLAG,
    SLIDING,
    ModelConfig,
    TextConfig,
    default_layer_types,
    load_config,
)
from ..drafter import Drafter, DrafterConfig, save_drafter
from .tokenizer import write_tokenizer


def scaled_text(*, hidden: int, heads: int, head_dim: int, window: int, layers: int = 6, **overrides: Any) -> dict:
    """text_config settings of the released model at a smaller size, its proportions and settings
    kept: the MLP 4x hidden, half as many KV heads as query heads, global layers (every sixth, and the
    last) with one KV head of twice the head dim shared by keys and values."""
    return {
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "num_hidden_layers": layers,
        "layer_types": default_layer_types(layers),
        "num_attention_heads": heads,
        "num_key_value_heads": heads // 2,
        "head_dim": head_dim,
        "global_head_dim": 2 * head_dim,
        "num_global_key_value_heads": 1,
        "attention_k_eq_v": True,
        "sliding_window": window,
        "final_logit_softcapping": 30.0,
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "use_bidirectional_attention": "vision",
        "rope_parameters": DEFAULT_ROPE_PARAMETERS,
        **overrides,
    }


# The tiny checkpoint's text model (an MLP of twice the hidden size).
TINY_TEXT = scaled_text(hidden=64, heads=4, head_dim=16, window=32, intermediate_size=128)


def tiny_config(special: dict[str, int], vocab_size: int, **text_overrides: Any) -> dict:
    text = dict(TINY_TEXT, vocab_size=vocab_size, model_type="gemma4_unified_text")
    text.update(text_overrides)
    text["layer_types"] = default_layer_types(text["num_hidden_layers"])
    text.update(
        pad_token_id=special["pad_token_id"], eos_token_id=special["eos_token_id"], bos_token_id=special["bos_token_id"]
    )
    hidden = text["hidden_size"]
    return {
        "architectures": ["Gemma4UnifiedForConditionalGeneration"],
        "model_type": "gemma4_unified",
        RANDOM_WEIGHTS_FLAG: True,
        "text_config": text,
        "vision_config": {
            "model_type": "gemma4_unified_vision",
            "mm_embed_dim": hidden,
            "output_proj_dims": hidden,
            "mm_posemb_size": 1120,
            "patch_size": 16,
            "pooling_kernel_size": 3,
            "rms_norm_eps": 1e-6,
        },
        "audio_config": {"model_type": "gemma4_unified_audio", "audio_embed_dim": 640, "rms_norm_eps": 1e-6},
        "boi_token_id": special["boi_token_id"],
        "eoi_token_id": special["eoi_token_id"],
        "image_token_id": special["image_token_id"],
        "video_token_id": special["video_token_id"],
        "boa_token_id": special["boa_token_id"],
        "eoa_token_index": special["eoa_token_index"],
        "audio_token_id": special["audio_token_id"],
        "tie_word_embeddings": True,
        "dtype": "bfloat16",
    }


def _random_tensor(name: str, shape: tuple[int, ...], normal: Callable[[tuple[int, ...], float], mx.array]) -> mx.array:
    if name.endswith("layer_scalar"):
        return mx.ones(shape)
    if "norm" in name or "_ln" in name:
        return (mx.zeros if name.endswith("bias") else mx.ones)(shape)
    if name.endswith("bias"):
        return mx.zeros(shape)
    # Tied embeddings at 1/sqrt(hidden) keep the random logits spread out, so sampling varies.
    std = 0.5 if "pos_embedding" in name else shape[-1] ** -0.5
    return normal(shape, std)


def tiny_checkpoint(
    path: str | Path,
    seed: int = 0,
    *,
    device_random: bool = False,
    dtype: str = "bfloat16",
    **text_overrides: Any,
) -> Path:
    """Write a small random-weight Gemma 4 unified checkpoint (config, safetensors in `dtype`, bf16 by
    default as released, tokenizer, chat template) to `path` and return it. `text_overrides` change
    text_config entries (benchmarks use it for larger shapes; a vocab_size above the tokenizer's leaves
    the extra rows unused). `device_random` draws with MLX's generator on the default device instead of
    numpy's: other values, but seconds instead of minutes for the released 12B shapes."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    special = write_tokenizer(path)
    vocab_size = max(special["vocab_size"], text_overrides.pop("vocab_size", 0))
    config = tiny_config(special, vocab_size, **text_overrides)
    config["dtype"] = dtype
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(
        json.dumps(
            {
                "bos_token_id": special["bos_token_id"],
                "eos_token_id": [special["eos_token_id"], special["eot_token_id"]],
                "pad_token_id": special["pad_token_id"],
            }
        )
    )
    rng = np.random.default_rng(seed)
    if device_random:
        mx.random.seed(seed)

    def normal(shape: tuple[int, ...], std: float) -> mx.array:
        if device_random:
            return std * mx.random.normal(shape)
        return mx.array((std * rng.standard_normal(shape)).astype(np.float32))

    weights = {}
    # The released layout: our names with a leading `model.`.
    for name, shape in tensor_shapes(ModelConfig.from_dict(config)).items():
        name = f"model.{name}"
        weights[name] = _random_tensor(name, shape, normal).astype(float_dtype(dtype))
        mx.eval(weights[name])  # one float32 draw alive at a time
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "pt"})
    return path


def drafter_config(
    target: TextConfig, layers: int = 2, centroids: int = 0, **text_overrides: Any
) -> DrafterConfig:
    """An MTP drafter for a target of these text settings, in the released config layout (transformers
    and mlx-vlm read it too): `layers` layers of the target's width (sliding ones, then one global),
    attention shapes the target's (it attends over the target's keys), MLP twice the width; with
    `centroids`, the released kind of head: that many clusters of the vocabulary, the top 32 scored."""
    sliding, full = target.layer(target.last_layer(SLIDING)), target.layer(target.last_layer(GLOBAL))
    text = dict(
        model_type="gemma4_unified_text",
        hidden_size=target.hidden_size,
        intermediate_size=target.hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=target.num_attention_heads,
        num_key_value_heads=sliding.num_kv_heads,
        head_dim=sliding.head_dim,
        global_head_dim=full.head_dim,
        num_global_key_value_heads=full.num_kv_heads,
        attention_k_eq_v=target.attention_k_eq_v,
        num_kv_shared_layers=layers,
        hidden_size_per_layer_input=0,
        vocab_size=target.vocab_size,
        sliding_window=target.sliding_window,
        layer_types=[SLIDING] * (layers - 1) + [GLOBAL],
        rms_norm_eps=target.rms_norm_eps,
        hidden_activation=target.hidden_activation,
        final_logit_softcapping=None,
        tie_word_embeddings=True,
        **text_overrides,
    )
    return DrafterConfig.from_dict(
        dict(
            architectures=["Gemma4UnifiedAssistantForCausalLM"],
            model_type="gemma4_unified_assistant",
            backbone_hidden_size=target.hidden_size,
            use_ordered_embeddings=bool(centroids),
            num_centroids=centroids or 2048,
            centroid_intermediate_top_k=min(32, centroids) if centroids else 32,
            tie_word_embeddings=True,
            text_config=text,
            **{RANDOM_WEIGHTS_FLAG: True},
        )
    )


def tiny_drafter(
    path: str | Path, target: str | Path, seed: int = 0, *, copies_last_token: bool = False, centroids: int = 0
) -> Path:
    """Write an MTP drafter (bf16, released layout) for the checkpoint at `target` to `path`. Its weights
    are random (MLX's initialization; with `centroids`, a random token ordering), so its drafts are
    almost never accepted; `copies_last_token` chooses them instead so that it drafts the last token
    again: pre_projection passes the token's embedding, the layers add nothing, the tied head is the
    target's embeddings. Against a target that repeats tokens, those drafts are accepted where it does."""
    text = load_config(target).text
    mx.random.seed(seed)
    drafter = Drafter(drafter_config(text, centroids=centroids))
    if centroids:
        ordering = np.random.default_rng(seed).permutation(text.vocab_size).astype(np.int32)
        drafter.masked_embedding.token_ordering = mx.array(ordering)
    if copies_last_token:
        hidden = text.hidden_size
        stored = {}
        for file in weight_files(Path(target)):
            stored.update(mx.load(str(file)))
        drafter.pre_projection.weight = mx.concatenate([mx.eye(hidden), mx.zeros((hidden, hidden))], axis=1)
        for layer in drafter.model.layers:
            layer.self_attn.o_proj.weight = mx.zeros_like(layer.self_attn.o_proj.weight)
            layer.mlp.down_proj.weight = mx.zeros_like(layer.mlp.down_proj.weight)
        drafter.model.embed_tokens.weight = stored["model.language_model.embed_tokens.weight"]
    drafter.apply(lambda w: w.astype(mx.bfloat16) if mx.issubdtype(w.dtype, mx.floating) else w)
    return save_drafter(drafter, path)
