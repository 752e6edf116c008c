"""Media to soft tokens: the encoder-free vision embedder and the multimodal projections.

Both paths end in an RMSNorm without weight and a linear map into the decoder's hidden size; the
norms run as fused kernels (`vision_tail`, `audio_norm`), the matrix products stay MLX matmuls.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .config import AudioConfig, VisionConfig
from .kernels import audio_norm, vision_tail


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
        )


def make_vision(config: VisionConfig, text_hidden: int) -> tuple[VisionEmbedder, MultimodalProjection]:
    return VisionEmbedder(config), MultimodalProjection(config.output_proj_dims, text_hidden)


def make_audio(config: AudioConfig, text_hidden: int) -> MultimodalProjection:
    return MultimodalProjection(config.audio_embed_dim, text_hidden)


def audio_soft_tokens(projection: MultimodalProjection, frames: mx.array) -> mx.array:
    """One 640-sample frame (40 ms at 16 kHz) -> RMSNorm -> linear: one soft token, no encoder."""
    return projection(audio_norm(frames))
