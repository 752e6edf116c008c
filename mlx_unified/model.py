"""Gemma 4 12B unified: hybrid-attention decoder layers, the text model, the whole model, the projectors.

Read top to bottom, as mlx-lm's model files: attention (with K=V sharing on global layers), the
decoder block (GeGLU MLP, four norms, the layer scalar), the text model (scaled embeddings, layers,
soft-capped tied head), the whole model (media soft tokens scattered into the text embeddings) and the
encoder-free projectors that make those soft tokens. Shapes come from `config.py`; the attention
computations from `attention.py`; the per-layer caches from `cache.py`; fused norms, RoPE and decode
attention from `kernels/`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .attention import AttentionContext, AttentionObserver, attend, derived_keys
from .attention_blocks import PREFILL_SCORE_BYTES
from .cache import KVCache, LayerCache, SharedKVCache, SlidingWindowCache
from .config import LayerShape, ModelConfig, TextConfig, VisionConfig
from .emphasis import SpanBias
from .errors import MediaError
from .kernels import audio_norm, norm_rope, vision_tail
from .masks import vision_block_ids

MEDIA_KEYS = (
    "pixel_values",
    "image_position_ids",
    "pixel_values_videos",
    "video_position_ids",
    "input_features",
    "input_features_mask",
)


class MediaMismatchError(ValueError):
    """The number of media placeholders in input_ids differs from the soft tokens supplied."""


def rms_norm(x: mx.array, weight: mx.array | None, eps: float) -> mx.array:
    """The reference's RMSNorm: weight used as is (not 1 + weight). MLX's fused kernel accumulates in
    float32 like the reference; in bf16 it may round the product once more (one ulp)."""
    return mx.fast.rms_norm(x, None if weight is None else weight.astype(x.dtype), eps)


class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return rms_norm(x, self.weight, self.eps)


# -- attention ---------------------------------------------------------------------------------------


class Attention(nn.Module):
    """q_norm/k_norm (weighted) and v_norm (unweighted) over each head, RoPE, scale 1.0. On K=V global
    layers there is no v_proj: one tensor, v_norm(k_proj(x)), is the values and, scaled by k_norm's
    weight and rotated, the keys, and it is all the cache keeps."""

    def __init__(self, config: TextConfig, shape: LayerShape):
        super().__init__()
        self.shape = shape
        self.num_heads = config.num_attention_heads
        self.eps = config.rms_norm_eps
        self.sliding_window = config.sliding_window if shape.is_sliding else None
        dim, heads, kv_dim = config.hidden_size, config.num_attention_heads, shape.num_kv_heads * shape.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(dim, heads * shape.head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, kv_dim, bias=bias)
        if not shape.k_eq_v:
            self.v_proj = nn.Linear(dim, kv_dim, bias=bias)
        self.o_proj = nn.Linear(heads * shape.head_dim, dim, bias=bias)
        self.q_norm = RMSNorm(shape.head_dim, self.eps)
        self.k_norm = RMSNorm(shape.head_dim, self.eps)
        self.rope = shape.rope

    def _heads(self, x: mx.array, n: int) -> mx.array:
        B, L, _ = x.shape
        return x.reshape(B, L, n, self.shape.head_dim)

    def _norm_rope(self, x: mx.array, n: int, weight: mx.array | None, offset: int, rope: bool) -> mx.array:
        """[B, L, n * head_dim] -> normed (and rotated) [B, n, L, head_dim]."""
        return norm_rope(self._heads(x, n), weight, offset, rope=self.rope if rope else None, eps=self.eps)

    def __call__(self, x: mx.array, ctx: AttentionContext, cache: LayerCache | None) -> mx.array:
        B, L, _ = x.shape
        n_kv, offset = self.shape.num_kv_heads, ctx.offset
        queries = self._norm_rope(self.q_proj(x), self.num_heads, self.q_norm.weight, offset, rope=True)
        if self.shape.k_eq_v:  # one tensor, v_norm(k_proj(x)) (no weight): the values, and the keys' source
            keys, values = None, self._norm_rope(self.k_proj(x), n_kv, None, offset, rope=False)
        else:
            keys = self._norm_rope(self.k_proj(x), n_kv, self.k_norm.weight, offset, rope=True)
            values = self._norm_rope(self.v_proj(x), n_kv, None, offset, rope=False)
        out = attend(queries, keys, values, cache, ctx, self.sliding_window, self.rope, self.k_norm.weight)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def shared_keys(self, shared: mx.array, start: int) -> mx.array:
        """The keys of a K=V layer from its one tensor, positions start.. (`attention.derived_keys`)."""
        return derived_keys(shared, self.k_norm.weight, start, self.rope)

    def make_cache(self) -> LayerCache:
        if self.shape.is_sliding:
            return SlidingWindowCache(self.sliding_window)
        return SharedKVCache() if self.shape.k_eq_v else KVCache()


# -- decoder block -----------------------------------------------------------------------------------


# The activation is computed in float32 and rounded once, as PyTorch computes it for bf16 tensors:
# bit-identical to the reference's bf16 GeGLU (MLX's bf16 gelu rounds each of its steps).
@partial(mx.compile, shapeless=True)
def geglu_tanh(gate: mx.array, up: mx.array) -> mx.array:
    return nn.gelu_approx(gate.astype(mx.float32)).astype(up.dtype) * up


@partial(mx.compile, shapeless=True)
def geglu_erf(gate: mx.array, up: mx.array) -> mx.array:
    return nn.gelu(gate.astype(mx.float32)).astype(up.dtype) * up


class MLP(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        # "gelu_pytorch_tanh" is the tanh approximation; "gelu" the exact erf form.
        self.geglu = geglu_tanh if config.hidden_activation == "gelu_pytorch_tanh" else geglu_erf

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self.geglu(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, index: int, self_attn: nn.Module | None = None):
        """self_attn: the attention block, by default the layer's own (the drafter's reads the target's
        keys and values instead)."""
        super().__init__()
        eps = config.rms_norm_eps
        self.self_attn = Attention(config, config.layer(index)) if self_attn is None else self_attn
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, eps)
        self.layer_scalar = mx.ones((1,))

    def __call__(self, x: mx.array, ctx: AttentionContext, cache: LayerCache | None) -> mx.array:
        return self.residual(x, lambda normed: self.self_attn(normed, ctx, cache))

    def residual(self, x: mx.array, attend: Callable[[mx.array], mx.array]) -> mx.array:
        """The layer around its attention: `attend` maps the normed input to the attention output."""
        h = x + self.post_attention_layernorm(attend(self.input_layernorm(x)))
        h = h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        # The reference scales the whole residual stream, residual included.
        return h * self.layer_scalar.astype(h.dtype)


# -- text model --------------------------------------------------------------------------------------


@partial(mx.compile, shapeless=True)
def soft_cap(logits: mx.array, cap: float) -> mx.array:
    return mx.tanh(logits / cap) * cap


class TextModel(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [DecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def embed(self, input_ids: mx.array) -> mx.array:
        # In the compute dtype (the norms'): an MX/NV-quantized embedding dequantizes to bf16 whatever it is.
        h = self.embed_tokens(input_ids).astype(self.norm.weight.dtype)
        # sqrt(hidden) rounded to the weights' dtype, as the reference does (55.4 -> 55.5 in bf16).
        return h * mx.array(self.config.hidden_size**0.5, dtype=h.dtype)

    def __call__(self, h: mx.array, ctx: AttentionContext, cache: list[LayerCache] | None) -> mx.array:
        for i, layer in enumerate(self.layers):
            h = layer(h, ctx, None if cache is None else cache[i])
        return h

    def logits(self, h: mx.array) -> mx.array:
        return self.head(self.norm(h))

    def head(self, normed: mx.array) -> mx.array:
        """Soft-capped logits of hidden states after the final norm."""
        logits = self.embed_tokens.as_linear(normed)
        cap = self.config.final_logit_softcapping
        return soft_cap(logits, cap) if cap else logits


# -- the whole model ---------------------------------------------------------------------------------


class Model(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        hidden = config.text.hidden_size
        self.language_model = TextModel(config.text)
        if config.vision is not None:
            self.vision_embedder = VisionEmbedder(config.vision)
            self.embed_vision = MultimodalProjection(config.vision.output_proj_dims, hidden)
        if config.audio is not None:
            self.embed_audio = MultimodalProjection(config.audio.audio_embed_dim, hidden)

    @property
    def dtype(self) -> mx.Dtype:
        # Norm weights are never quantized, so they carry the compute dtype.
        return self.language_model.norm.weight.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of the loaded weights (quantized tensors count their scales and biases)."""
        return sum(w.nbytes for _, w in nn.utils.tree_flatten(self.parameters()))

    @property
    def layer_types(self) -> list[str]:
        return self.config.text.layer_types

    def make_cache(self) -> list[LayerCache]:
        """A fresh per-layer cache list (mlx-lm's `prompt_cache`)."""
        return [layer.self_attn.make_cache() for layer in self.language_model.layers]

    # -- media -> soft tokens

    def image_features(self, pixel_values: mx.array, positions: mx.array) -> mx.array:
        """Soft tokens of the non-padding patches of every image, [total_patches, hidden]."""
        if self.config.vision is None:
            raise MediaError(
                "this checkpoint is text-only (it holds no vision weights: vision_embedder.*, embed_vision.*): "
                "it cannot take images or video"
            )
        pixel_values, positions = mx.array(pixel_values), mx.array(positions)
        if pixel_values.ndim == 2:
            pixel_values, positions = pixel_values[None], positions[None]
        patches = self.vision_embedder(pixel_values.astype(self.dtype), positions)
        return self.embed_vision(_valid_patches(patches, positions))

    def audio_features(self, frames: mx.array, frames_mask: mx.array | None) -> mx.array:
        """Soft tokens of the valid frames of every clip, [total_frames, hidden]: one 640-sample frame
        (40 ms at 16 kHz) -> RMSNorm -> linear, no encoder."""
        if self.config.audio is None:
            raise MediaError(
                "this checkpoint is text-only (it holds no audio weights: embed_audio.*): it cannot take audio"
            )
        frames = mx.array(frames)
        if frames.ndim == 2:
            frames = frames[None]
        normed = audio_norm(frames.astype(self.dtype), eps=self.config.audio.rms_norm_eps)
        tokens = self.embed_audio(normed).reshape(-1, self.config.text.hidden_size)
        if frames_mask is None:
            return tokens
        keep = np.nonzero(np.asarray(frames_mask).reshape(-1))[0]
        return tokens[mx.array(keep)]

    def embed_text(self, input_ids: mx.array) -> mx.array:
        """Scaled token embeddings; a media placeholder id is embedded as padding, as the reference does
        (its soft token replaces it afterwards, see `embed`)."""
        media_ids = mx.array(self.config.media_token_ids)
        is_placeholder = (input_ids[..., None] == media_ids).any(axis=-1)
        return self.language_model.embed(mx.where(is_placeholder, self.config.text.pad_token_id, input_ids))

    def embed(
        self,
        input_ids: mx.array,
        *,
        pixel_values: mx.array | None = None,
        image_position_ids: mx.array | None = None,
        pixel_values_videos: mx.array | None = None,
        video_position_ids: mx.array | None = None,
        input_features: mx.array | None = None,
        input_features_mask: mx.array | None = None,
    ) -> mx.array:
        """Token embeddings with every image/video/audio placeholder replaced, in order, by its soft token."""
        input_ids = mx.array(input_ids)
        ids = np.asarray(input_ids)
        h = self.embed_text(input_ids)
        media = [
            (self.config.image_token_id, "image", pixel_values, image_position_ids),
            (self.config.video_token_id, "video", pixel_values_videos, video_position_ids),
        ]
        for token_id, kind, pixels, positions in media:
            if pixels is not None:
                if positions is None:
                    raise ValueError(f"{kind} pixel values were given without their position ids")
                h = _scatter(h, ids == token_id, self.image_features(pixels, positions), kind)
        if input_features is not None:
            audio = self.audio_features(input_features, input_features_mask)
            h = _scatter(h, ids == self.config.audio_token_id, audio, "audio")
        return h

    def embed_inputs(self, input_ids: mx.array, inputs: dict[str, Any]) -> mx.array:
        """`embed` with the media arrays of a processor output dict (keys with the reference's names)."""
        media = {k: inputs[k] for k in MEDIA_KEYS if inputs.get(k) is not None}
        return self.embed(input_ids, **media)

    # -- decoder -> logits

    def forward_embeddings(
        self,
        h: mx.array,
        *,
        cache: list[LayerCache] | None = None,
        mm_token_type_ids: mx.array | np.ndarray | None = None,
        logits_to_keep: int = 0,
        key_bias: SpanBias | None = None,
        observer: AttentionObserver | None = None,
        score_bytes: int = PREFILL_SCORE_BYTES,
        return_hidden: bool = False,
    ) -> mx.array | tuple[mx.array, mx.array]:
        """Run the decoder on embeddings [B, L, hidden] starting at the cache's offset.

        mm_token_type_ids covers these L tokens; a vision block must not be split between two calls.
        key_bias: additive score bias on a key span of global layers (audio emphasis); observer: see
        `AttentionContext.observer`; score_bytes: bound on one attention block's scores.
        return_hidden: return (logits, hidden) with the kept positions' hidden states after the final
        norm, which the drafter reads (the reference's `hidden_states[-1]`).
        """
        offset = 0 if cache is None else cache[0].offset
        blocks = None
        if mm_token_type_ids is not None and self.config.text.use_bidirectional_attention == "vision":
            blocks = vision_block_ids(np.asarray(mm_token_type_ids).reshape(h.shape[0], -1))
        h = self.language_model(h, AttentionContext(offset, blocks, key_bias, observer, score_bytes), cache)
        kept = h[:, -logits_to_keep:] if logits_to_keep else h
        if not return_hidden:
            return self.language_model.logits(kept)
        normed = self.language_model.norm(kept)
        return self.language_model.head(normed), normed

    def __call__(
        self,
        input_ids: mx.array,
        *,
        mm_token_type_ids: mx.array | None = None,
        cache: list[LayerCache] | None = None,
        logits_to_keep: int = 0,
        **media: mx.array | None,
    ) -> mx.array:
        """Logits [B, L_kept, vocab]; `logits_to_keep` 0 = every position, N = the last N. `media`: the
        processor's arrays by the reference's names (`MEDIA_KEYS`), as `embed` takes them."""
        h = self.embed(input_ids, **media)
        return self.forward_embeddings(
            h, cache=cache, mm_token_type_ids=mm_token_type_ids, logits_to_keep=logits_to_keep
        )


def _valid_patches(features: mx.array, positions: mx.array) -> mx.array:
    """Flatten [N, P, H] patch features to the non-padding ones (position != (-1, -1)), in order."""
    keep = np.nonzero(np.all(np.asarray(positions) != -1, axis=-1).reshape(-1))[0]
    return features.reshape(-1, features.shape[-1])[mx.array(keep)]


def _scatter(h: mx.array, slots: np.ndarray, features: mx.array, kind: str) -> mx.array:
    """Place features[k] at the k-th True slot of `slots` (row-major over the batch)."""
    flat = slots.reshape(-1)
    count = int(flat.sum())
    if count != features.shape[0]:
        raise MediaMismatchError(
            f"{kind}: input_ids hold {count} placeholder tokens but {features.shape[0]} soft tokens were given"
        )
    if count == 0:
        return h
    B, L, H = h.shape
    index = np.clip(np.cumsum(flat) - 1, 0, None).astype(np.int32)
    gathered = features.astype(h.dtype)[mx.array(index)]
    return mx.where(mx.array(flat)[:, None], gathered, h.reshape(B * L, H)).reshape(B, L, H)


# -- projectors: media -> soft tokens ------------------------------------------------------------------
# Both end in an RMSNorm without weight and a linear map into the decoder's hidden size; the norms run
# as fused kernels (`vision_tail`, `audio_norm`), the matrix products stay MLX matmuls.


class MultimodalProjection(nn.Module):
    """The linear map of already RMS-normalized soft tokens into the decoder's hidden size."""

    def __init__(self, in_dims: int, out_dims: int):
        super().__init__()
        self.embedding_projection = nn.Linear(in_dims, out_dims, bias=False)

    def __call__(self, normalized: mx.array) -> mx.array:
        return self.embedding_projection(normalized)


class VisionEmbedder(nn.Module):
    """48x48x3 pixel patches -> LayerNorm -> Linear -> LayerNorm -> + factorized (x, y) position
    embedding -> LayerNorm -> RMSNorm. Padding patches, at (-1, -1), get no position embedding."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        dims = config.mm_embed_dim
        self.rms_norm_eps = config.rms_norm_eps
        self.patch_ln1 = nn.LayerNorm(config.patch_dim, eps=1e-5)
        self.patch_dense = nn.Linear(config.patch_dim, dims)
        self.patch_ln2 = nn.LayerNorm(dims, eps=1e-5)
        self.pos_embedding = mx.zeros((config.mm_posemb_size, 2, dims))
        self.pos_norm = nn.LayerNorm(dims, eps=1e-5)

    def __call__(self, pixel_values: mx.array, positions: mx.array) -> mx.array:
        """pixel_values [N, P, patch_dim] in [0, 1] (compute dtype); positions [N, P, 2] (x, y)."""
        h = self.patch_dense(self.patch_ln1(pixel_values))
        return vision_tail(
            h,
            positions,
            self.patch_ln2.weight,
            self.patch_ln2.bias,
            self.pos_embedding,
            self.pos_norm.weight,
            self.pos_norm.bias,
            rms_eps=self.rms_norm_eps,
        )
