"""The decoder: scaled token embeddings, hybrid-attention layers with GeGLU MLPs, final norm."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import mlx.core as mx
import mlx.nn as nn

from .attention import Attention, AttentionContext, RMSNorm
from .cache import LayerCache
from .config import TextConfig


# The activation is computed in float32 and rounded once, as PyTorch computes it for bf16 tensors:
# bit-identical to the reference's bf16 GeGLU (MLX's bf16 gelu rounds each of its steps, 37% of the
# products off by an ulp or more), and on the CPU backend twice as fast.
@partial(mx.compile, shapeless=True)
def geglu_tanh(gate: mx.array, up: mx.array) -> mx.array:
    return nn.gelu_approx(gate.astype(mx.float32)).astype(up.dtype) * up


@partial(mx.compile, shapeless=True)
def geglu_erf(gate: mx.array, up: mx.array) -> mx.array:
    return nn.gelu(gate.astype(mx.float32)).astype(up.dtype) * up


@partial(mx.compile, shapeless=True)
def soft_cap(logits: mx.array, cap: float) -> mx.array:
    return mx.tanh(logits / cap) * cap


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


class TextModel(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [DecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def embed(self, input_ids: mx.array) -> mx.array:
        h = self.embed_tokens(input_ids)
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
