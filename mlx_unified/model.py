"""The whole model: soft tokens scattered into the text embeddings, the decoder, soft-capped logits."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .attention import AttentionContext, AttentionObserver
from .cache import LayerCache
from .config import ModelConfig
from .decoder import TextModel
from .kernels import SpanBias
from .masks import vision_block_ids
from .memory import PREFILL_SCORE_BYTES
from .projectors import audio_soft_tokens, make_audio, make_vision

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


def _valid_patches(features: mx.array, positions: mx.array) -> mx.array:
    """Flatten [N, P, H] patch features to the non-padding ones (position != (-1, -1)), in order."""
    keep = np.nonzero(np.all(np.asarray(positions) != -1, axis=-1).reshape(-1))[0]
    return features.reshape(-1, features.shape[-1])[mx.array(keep)]


class Model(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        hidden = config.text.hidden_size
        self.language_model = TextModel(config.text)
        if config.vision is not None:
            self.vision_embedder, self.embed_vision = make_vision(config.vision, hidden)
        if config.audio is not None:
            self.embed_audio = make_audio(config.audio, hidden)

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
        return [layer.self_attn.make_cache() for layer in self.language_model.layers]

    # -- media -> soft tokens ---------------------------------------------------------------------

    def image_features(self, pixel_values: mx.array, positions: mx.array) -> mx.array:
        """Soft tokens of the non-padding patches of every image, [total_patches, hidden]."""
        if self.config.vision is None:
            raise ValueError("this checkpoint has no vision_config: it cannot take images")
        pixel_values, positions = mx.array(pixel_values), mx.array(positions)
        if pixel_values.ndim == 2:
            pixel_values, positions = pixel_values[None], positions[None]
        patches = self.vision_embedder(pixel_values.astype(self.dtype), positions)
        return self.embed_vision(_valid_patches(patches, positions))

    def audio_features(self, frames: mx.array, frames_mask: mx.array | None) -> mx.array:
        """Soft tokens of the valid frames of every clip, [total_frames, hidden]."""
        if self.config.audio is None:
            raise ValueError("this checkpoint has no audio_config: it cannot take audio")
        frames = mx.array(frames)
        if frames.ndim == 2:
            frames = frames[None]
        tokens = audio_soft_tokens(self.embed_audio, frames.astype(self.dtype))
        tokens = tokens.reshape(-1, self.config.text.hidden_size)
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

    # -- decoder -> logits -----------------------------------------------------------------------------

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

    def embed_inputs(self, input_ids: mx.array, inputs: dict[str, Any]) -> mx.array:
        """`embed` with the media arrays of a processor output dict (keys with the reference's names)."""
        media = {k: inputs[k] for k in MEDIA_KEYS if inputs.get(k) is not None}
        return self.embed(input_ids, **media)

    def __call__(
        self,
        input_ids: mx.array,
        *,
        pixel_values: mx.array | None = None,
        image_position_ids: mx.array | None = None,
        input_features: mx.array | None = None,
        input_features_mask: mx.array | None = None,
        mm_token_type_ids: mx.array | None = None,
        cache: list[LayerCache] | None = None,
        logits_to_keep: int = 0,
        pixel_values_videos: mx.array | None = None,
        video_position_ids: mx.array | None = None,
    ) -> mx.array:
        """Logits [B, L_kept, vocab]; `logits_to_keep` 0 = every position, N = the last N."""
        h = self.embed(
            input_ids,
            pixel_values=pixel_values,
            image_position_ids=image_position_ids,
            pixel_values_videos=pixel_values_videos,
            video_position_ids=video_position_ids,
            input_features=input_features,
            input_features_mask=input_features_mask,
        )
        return self.forward_embeddings(
            h, cache=cache, mm_token_type_ids=mm_token_type_ids, logits_to_keep=logits_to_keep
        )


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
