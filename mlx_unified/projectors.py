"""Media to soft tokens: the encoder-free vision embedder and the multimodal projectors."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .attention import rms_norm
from .config import AudioConfig, VisionConfig


class MultimodalProjector(nn.Module):
    """RMSNorm without weight, then a linear map into the decoder's hidden size.

    For audio this is the whole path: one 640-sample frame (40 ms at 16 kHz) becomes one soft token.
    """

    def __init__(self, in_dims: int, out_dims: int, eps: float):
        super().__init__()
        self.eps = eps
        self.embedding_projection = nn.Linear(in_dims, out_dims, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        """x already in the model's compute dtype (the caller casts raw media)."""
        return self.embedding_projection(rms_norm(x, None, self.eps))


class VisionEmbedder(nn.Module):
    """48x48x3 pixel patches -> LayerNorm -> Linear -> LayerNorm -> + factorized (x, y) position
    embedding -> LayerNorm. Padding patches, at position (-1, -1), get no position embedding."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        dims = config.mm_embed_dim
        self.patch_ln1 = nn.LayerNorm(config.patch_dim, eps=1e-5)
        self.patch_dense = nn.Linear(config.patch_dim, dims)
        self.patch_ln2 = nn.LayerNorm(dims, eps=1e-5)
        self.pos_embedding = mx.zeros((config.mm_posemb_size, 2, dims))
        self.pos_norm = nn.LayerNorm(dims, eps=1e-5)

    def __call__(self, pixel_values: mx.array, positions: mx.array) -> mx.array:
        """pixel_values [N, P, patch_dim] in [0, 1]; positions [N, P, 2] (x, y), -1 for padding."""
        dtype = self.patch_ln2.weight.dtype
        h = self.patch_ln2(self.patch_dense(self.patch_ln1(pixel_values.astype(dtype))))
        clamped = mx.maximum(positions, 0)
        valid = (positions != -1).astype(self.pos_embedding.dtype)
        pos_x = self.pos_embedding[clamped[..., 0], 0] * valid[..., 0:1]
        pos_y = self.pos_embedding[clamped[..., 1], 1] * valid[..., 1:2]
        return self.pos_norm(h + (pos_x + pos_y).astype(h.dtype))


def make_vision(config: VisionConfig, text_hidden: int) -> tuple[VisionEmbedder, MultimodalProjector]:
    return VisionEmbedder(config), MultimodalProjector(config.output_proj_dims, text_hidden, config.rms_norm_eps)


def make_audio(config: AudioConfig, text_hidden: int) -> MultimodalProjector:
    return MultimodalProjector(config.audio_embed_dim, text_hidden, config.rms_norm_eps)
