"""The drafter's configuration, read from a `gemma4_unified_assistant` config.json."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checkpoint import layer_mlp_and_norm_shapes
from ..config import ConfigError, TextConfig, parse_text_config, read_config_json
from ..errors import InputError

DRAFTER_MODEL_TYPE = "gemma4_unified_assistant"


class DrafterMismatchError(InputError):
    """A drafter that was not made for this target: the shapes it reads from the target differ."""


@dataclass
class DrafterConfig:
    """`gemma4_unified_assistant`: a small Gemma 4 text decoder (`text`) whose layers all read the
    target's keys and values. backbone_hidden_size is the target's hidden size (the width of what it
    is fed and of its projected state); use_ordered_embeddings selects the centroid-masked head, which
    scores the tokens of the top `centroid_intermediate_top_k` of `num_centroids` clusters only."""

    text: TextConfig
    backbone_hidden_size: int = 3840
    use_ordered_embeddings: bool = False
    num_centroids: int = 2048
    centroid_intermediate_top_k: int = 32
    quantization: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for index in range(self.text.num_hidden_layers):
            if self.text.num_attention_heads % self.text.layer(index).num_kv_heads:
                raise ConfigError(
                    f"layer {index}: {self.text.num_attention_heads} query heads do not group over "
                    f"{self.text.layer(index).num_kv_heads} KV heads"
                )
        if self.use_ordered_embeddings:
            if self.text.vocab_size % self.num_centroids:
                raise ConfigError(
                    f"vocab_size {self.text.vocab_size} is not a multiple of num_centroids {self.num_centroids}"
                )
            if not 0 < self.centroid_intermediate_top_k <= self.num_centroids:
                raise ConfigError(
                    f"centroid_intermediate_top_k {self.centroid_intermediate_top_k} must be in "
                    f"1..num_centroids ({self.num_centroids})"
                )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DrafterConfig:
        model_type = data.get("model_type")
        if model_type != DRAFTER_MODEL_TYPE:
            hint = " (the drafter of the Gemma 4 text models, not of gemma4_unified)" if model_type == "gemma4_assistant" else ""
            raise ConfigError(f"model_type {model_type!r}{hint} is not a drafter we run: expected '{DRAFTER_MODEL_TYPE}'")
        if data.get("tie_word_embeddings") is False:
            raise ConfigError("an untied drafter head is not a Gemma 4 assistant architecture")
        text = dict(data.get("text_config") or {})
        layers = text.get("num_hidden_layers", 48)
        # As the reference's config: 0 (unset) means every layer reads the target's keys and values.
        if text.pop("num_kv_shared_layers", 0) not in (0, layers):
            raise ConfigError("every layer of a Gemma 4 assistant reads the target's keys and values "
                              f"(num_kv_shared_layers must be {layers})")
        # The drafter's masks are its own (bidirectional over the target's keys), whatever this says; but
        # the reference halves the window of a config that says "all" (its exclusive bound), so do we.
        if text.pop("use_bidirectional_attention", None) == "all":
            text["sliding_window"] = text.get("sliding_window", 1024) // 2 + 1
        return cls(
            text=parse_text_config(text),
            backbone_hidden_size=int(data.get("backbone_hidden_size", 3840)),
            use_ordered_embeddings=bool(data.get("use_ordered_embeddings", False)),
            num_centroids=int(data.get("num_centroids", 2048)),
            centroid_intermediate_top_k=int(data.get("centroid_intermediate_top_k", 32)),
            quantization=data.get("quantization") or data.get("quantization_config"),
            raw=data,
        )

    def check_target(self, target: TextConfig) -> None:
        """Raise DrafterMismatchError unless this drafter can read `target`: it is fed the target's
        hidden states and embeddings, scores the target's vocabulary, and each of its layers attends over
        the keys of the target's last layer of its type, so head dims and KV heads must agree."""
        problems = []
        if self.backbone_hidden_size != target.hidden_size:
            problems.append(f"backbone_hidden_size {self.backbone_hidden_size} != target hidden_size {target.hidden_size}")
        if self.text.vocab_size != target.vocab_size:
            problems.append(f"vocab_size {self.text.vocab_size} != target vocab_size {target.vocab_size}")
        for index, kind in enumerate(self.text.layer_types):
            if kind not in target.layer_types:
                problems.append(f"layer {index}: the target has no {kind} layer to read")
                continue
            ours, theirs = self.text.layer(index), target.layer(target.last_layer(kind))
            if (ours.head_dim, ours.num_kv_heads) != (theirs.head_dim, theirs.num_kv_heads):
                problems.append(
                    f"layer {index} ({kind}): head_dim {ours.head_dim} x {ours.num_kv_heads} KV heads, "
                    f"the target's {theirs.head_dim} x {theirs.num_kv_heads}"
                )
        if problems:
            raise DrafterMismatchError("this drafter was made for another model: " + "; ".join(problems))


def load_drafter_config(path: str | Path) -> DrafterConfig:
    """Read `<path>/config.json` (or the file itself) into a DrafterConfig; errors name the file."""
    file, data = read_config_json(path)
    try:
        return DrafterConfig.from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from e


def drafter_tensor_shapes(config: DrafterConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the drafter in the released (and our) layout, with its shape (CONTRACT.md)."""
    text = config.text
    hidden = text.hidden_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (text.vocab_size, hidden)}
    for i in range(text.num_hidden_layers):
        layer, prefix = text.layer(i), f"model.layers.{i}"
        width = text.num_attention_heads * layer.head_dim
        shapes[f"{prefix}.self_attn.q_proj.weight"] = (width, hidden)
        shapes[f"{prefix}.self_attn.o_proj.weight"] = (hidden, width)
        shapes[f"{prefix}.self_attn.q_norm.weight"] = (layer.head_dim,)
        shapes |= layer_mlp_and_norm_shapes(text, prefix)
    shapes["model.norm.weight"] = (hidden,)
    shapes["pre_projection.weight"] = (hidden, 2 * config.backbone_hidden_size)
    shapes["post_projection.weight"] = (config.backbone_hidden_size, hidden)
    if config.use_ordered_embeddings:
        shapes["masked_embedding.centroids.weight"] = (config.num_centroids, hidden)
        shapes["masked_embedding.token_ordering"] = (text.vocab_size,)
    return shapes


def drafter_weight_name(name: str) -> str | None:
    """Our name of a stored drafter tensor: the same, but the tied head (dropped)."""
    return None if name == "lm_head.weight" else name
