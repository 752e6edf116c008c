"""The MTP drafter: a small decoder that reads the target's keys and values and drafts the next tokens.

Each draft step takes `[target embedding of the last token ; a hidden state]` (the target's last hidden
state after its final norm for the first step, the drafter's own projected state after that), runs it
through `pre_projection` and decoder layers that attend over the keys and values of the target's last
sliding and last global layer (it keeps none of its own), and returns logits (tied head, or the
centroid-masked head) and `post_projection` of its hidden state for the next step.

Every step of a round queries from the same position q, the position of the last token: the target
holds keys for positions < q. As in the reference (`Gemma4UnifiedAssistantForCausalLM` fed by
transformers' MTP candidate generator), global layers see every one of them, sliding layers the last
sliding_window + 1 (q - 1 - window .. q - 1): that is a target query at q - 1 with a window one
longer, so the target's mask builder serves.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import mlx.core as mx
import mlx.nn as nn

from ..config import GLOBAL, LayerShape, TextConfig
from ..kernels import norm_rope
from ..masks import attention_mask
from ..model import DecoderLayer, RMSNorm
from .config import DrafterConfig


@dataclass
class KeyValues:
    """The keys (rotated at their positions) and values of one target layer, [B, n_kv, S, head_dim],
    for the consecutive positions start .. start + S - 1."""

    keys: mx.array
    values: mx.array
    start: int

    @property
    def stop(self) -> int:
        return self.start + self.keys.shape[2]


class DrafterAttention(nn.Module):
    """Queries of the draft tokens over the target's keys and values: q_proj, q_norm and RoPE at the
    draft position, attention (scale 1.0), o_proj. No keys or values of its own."""

    def __init__(self, config: TextConfig, shape: LayerShape):
        super().__init__()
        self.layer_type = shape.layer_type
        self.num_heads, self.head_dim = config.num_attention_heads, shape.head_dim
        width = self.num_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, width, bias=config.attention_bias)
        self.o_proj = nn.Linear(width, config.hidden_size, bias=config.attention_bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.eps = config.rms_norm_eps
        self.rope = shape.rope

    def __call__(self, x: mx.array, target: KeyValues, position: int, mask: mx.array | str | None) -> mx.array:
        B, L, _ = x.shape
        queries = self.q_proj(x).reshape(B, L, self.num_heads, self.head_dim)
        queries = norm_rope(queries, self.q_norm.weight, position, rope=self.rope, eps=self.eps)
        out = mx.fast.scaled_dot_product_attention(
            queries, target.keys.astype(queries.dtype), target.values.astype(queries.dtype), scale=1.0, mask=mask
        )
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class CentroidHead(nn.Module):
    """The centroid-masked head (`use_ordered_embeddings`): `centroids` scores num_centroids clusters of
    vocab / num_centroids tokens each (`token_ordering` lists them cluster by cluster); only the tokens of
    the top_k clusters are scored against the tied embeddings. Every other token gets the smallest
    computed logit minus 1 (the smallest over the whole call, as the reference fills it)."""

    def __init__(self, config: DrafterConfig):
        super().__init__()
        hidden, vocab = config.text.hidden_size, config.text.vocab_size
        self.top_k, self.per_centroid = config.centroid_intermediate_top_k, vocab // config.num_centroids
        self.centroids = nn.Linear(hidden, config.num_centroids, bias=False)
        self.token_ordering = mx.zeros((vocab,), dtype=mx.int32)
        self.freeze(keys=["token_ordering"], recurse=False)  # a table, not a weight to train

    def __call__(self, h: mx.array, embed_tokens: nn.Module) -> mx.array:
        B, L, _ = h.shape
        scores = self.centroids(h)
        top = mx.argpartition(-scores, self.top_k - 1, axis=-1)[..., : self.top_k]
        tokens = self.token_ordering.reshape(-1, self.per_centroid)[top].reshape(B, L, -1)
        rows = embed_tokens(tokens)  # [B, L, top_k * per_centroid, hidden] (dequantized when quantized)
        logits = (rows @ h[..., None])[..., 0]
        full = mx.full((B, L, self.token_ordering.shape[0]), logits.min() - 1.0, dtype=h.dtype)
        return mx.put_along_axis(full, tokens, logits.astype(h.dtype), axis=-1)


class DrafterDecoder(nn.Module):
    """The drafter's decoder under the names the checkpoints use (`model.*`): the embeddings its tied
    head scores with, the layers, the final norm."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [
            DecoderLayer(config, i, self_attn=DrafterAttention(config, config.layer(i)))
            for i in range(config.num_hidden_layers)
        ]
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Drafter(nn.Module):
    def __init__(self, config: DrafterConfig):
        super().__init__()
        self.config = config
        text, backbone = config.text, config.backbone_hidden_size
        self.model = DrafterDecoder(text)
        self.pre_projection = nn.Linear(2 * backbone, text.hidden_size, bias=False)
        self.post_projection = nn.Linear(text.hidden_size, backbone, bias=False)
        if config.use_ordered_embeddings:
            self.masked_embedding = CentroidHead(config)

    @property
    def dtype(self) -> mx.Dtype:
        return self.model.norm.weight.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of the loaded weights (what it adds to the model's in memory)."""
        return sum(w.nbytes for _, w in nn.utils.tree_flatten(self.parameters()))

    def __call__(
        self, token_embedding: mx.array, hidden: mx.array, target: dict[str, KeyValues], position: int
    ) -> tuple[mx.array, mx.array]:
        """Draft from position `position` (the last token's; queries i = 0.. of the call sit at
        position + i, which training uses: one draft per position of a sequence at once).

        token_embedding: the target's (scaled) embedding of the last token [B, L, backbone]; hidden: the
        target's last hidden state after its final norm, or the previous step's projected state
        [B, L, backbone]; target: the keys and values of the target's last layer of each type, every
        position before the queries' included. Returns (logits [B, L, vocab], projected state
        [B, L, backbone] for the next step)."""
        h = self.pre_projection(mx.concatenate([token_embedding, hidden], axis=-1).astype(self.dtype))
        masks = {kind: self._mask(kind, kv, position, h.shape[1], h.dtype) for kind, kv in target.items()}
        for layer in self.model.layers:
            kind = layer.self_attn.layer_type
            h = layer.residual(h, partial(layer.self_attn, target=target[kind], position=position, mask=masks[kind]))
        h = self.model.norm(h)
        return self.head(h), self.post_projection(h)

    def head(self, h: mx.array) -> mx.array:
        """Logits of final hidden states; no soft cap (the reference's drafter has none)."""
        if self.config.use_ordered_embeddings:
            return self.masked_embedding(h, self.model.embed_tokens)
        return self.model.embed_tokens.as_linear(h)

    def _mask(self, kind: str, kv: KeyValues, position: int, num_queries: int, dtype: mx.Dtype) -> mx.array | str | None:
        if position < 1:
            raise ValueError(f"a draft query at position {position} has no target position before it to read")
        if kv.stop > position + num_queries - 1:
            raise ValueError(
                f"{kind} keys reach position {kv.stop - 1}: a draft query at {position} reads positions before it only"
            )
        window = None if kind == GLOBAL else self.config.text.sliding_window + 1
        return attention_mask(position - 1, num_queries, kv.start, kv.keys.shape[2], window, None, dtype=dtype)
