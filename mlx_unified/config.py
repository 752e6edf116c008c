"""Model configuration read from a checkpoint's `config.json` (`model_type: gemma4_unified`)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from .errors import InputError

SLIDING = "sliding_attention"
GLOBAL = "full_attention"
SUPPORTED_MODEL_TYPE = "gemma4_unified"
# `mm_token_type_ids` values, as the reference processor assigns them.
TOKEN_TYPES = {"text": 0, "image": 1, "video": 2, "audio": 3}
# config.json flag of checkpoints with random weights (`mlx_unified.testing.tiny_checkpoint` writes it).
RANDOM_WEIGHTS_FLAG = "mlx_unified_random_weights"
RANDOM_WEIGHTS_WARNING = (
    "this checkpoint holds RANDOM weights (a test checkpoint made by mlx_unified.testing): "
    "its replies are meaningless text"
)


class ConfigError(InputError):
    """A checkpoint's config.json is missing, unreadable or describes a model we do not run."""


class Rule(NamedTuple):
    """What one config.json value must be: `test` passes it, `description` says it to the user."""

    description: str
    test: Callable[[Any], bool]


def _number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


POSITIVE_INT = Rule("a positive integer", lambda v: type(v) is int and v > 0)
TOKEN_ID = Rule("a token id (an integer >= 0)", lambda v: type(v) is int and v >= 0)
POSITIVE_NUMBER = Rule("a positive number", lambda v: _number(v) and v > 0)
FRACTION = Rule("a number in (0, 1]", lambda v: _number(v) and 0 < v <= 1)
BOOLEAN = Rule("true or false", lambda v: type(v) is bool)
TEXT = Rule("a string", lambda v: isinstance(v, str))
OBJECT = Rule("a JSON object", lambda v: isinstance(v, dict))
TOKEN_IDS = Rule(
    "a token id or a non-empty list of them",
    lambda v: TOKEN_ID.test(v) or (isinstance(v, list) and bool(v) and all(TOKEN_ID.test(x) for x in v)),
)
LAYER_TYPES = Rule("a list of layer type names", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v))


def optional(rule: Rule) -> Rule:
    return Rule(f"{rule.description} or null", lambda v: v is None or rule.test(v))


# The config.json entries the model is built from, by section; entries not listed are not read.
TEXT_RULES = {
    "vocab_size": POSITIVE_INT,
    "hidden_size": POSITIVE_INT,
    "intermediate_size": POSITIVE_INT,
    "num_hidden_layers": POSITIVE_INT,
    "num_attention_heads": POSITIVE_INT,
    "num_key_value_heads": POSITIVE_INT,
    "head_dim": POSITIVE_INT,
    "global_head_dim": POSITIVE_INT,
    "num_global_key_value_heads": optional(POSITIVE_INT),
    "per_layer_config": optional(OBJECT),
    "hidden_activation": TEXT,
    "rms_norm_eps": POSITIVE_NUMBER,
    "sliding_window": POSITIVE_INT,
    "layer_types": optional(LAYER_TYPES),
    "final_logit_softcapping": optional(POSITIVE_NUMBER),
    "attention_k_eq_v": BOOLEAN,
    "attention_bias": BOOLEAN,
    "use_bidirectional_attention": optional(TEXT),
    "rope_parameters": optional(OBJECT),
    "tie_word_embeddings": BOOLEAN,
    "pad_token_id": optional(TOKEN_ID),
    "eos_token_id": optional(TOKEN_IDS),
    "bos_token_id": optional(TOKEN_ID),
    "max_position_embeddings": POSITIVE_INT,
    "num_kv_shared_layers": optional(TOKEN_ID),
}
PER_LAYER_RULES = {"head_dim": POSITIVE_INT, "num_key_value_heads": POSITIVE_INT}
ROPE_RULES = {"rope_type": TEXT, "rope_theta": POSITIVE_NUMBER, "partial_rotary_factor": FRACTION}
VISION_RULES = {
    "patch_size": POSITIVE_INT,
    "pooling_kernel_size": POSITIVE_INT,
    "mm_embed_dim": POSITIVE_INT,
    "mm_posemb_size": POSITIVE_INT,
    "output_proj_dims": POSITIVE_INT,
    "rms_norm_eps": POSITIVE_NUMBER,
}
AUDIO_RULES = {"audio_embed_dim": POSITIVE_INT, "rms_norm_eps": POSITIVE_NUMBER}
# The media token ids of config.json's top level.
MEDIA_TOKEN_KEYS = (
    "boi_token_id",
    "eoi_token_id",
    "image_token_id",
    "video_token_id",
    "boa_token_id",
    "audio_token_id",
    "eoa_token_index",
)
QUANTIZATION_RULES = {"group_size": POSITIVE_INT, "bits": POSITIVE_INT, "mode": TEXT}


def check_entries(section: str, data: dict[str, Any], rules: dict[str, Rule]) -> None:
    """Each entry of `data` that `rules` names is what its rule says, else a ConfigError naming it."""
    for key, rule in rules.items():
        if key in data and not rule.test(data[key]):
            raise ConfigError(f"{section}{key} must be {rule.description}, got {json.dumps(data[key])}")


def _section(data: dict[str, Any], key: str, required: bool) -> dict[str, Any] | None:
    value = data.get(key)
    if value is None and not required:
        return None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key} must be a JSON object, got {json.dumps(value)}")
    return value


def check_config(data: dict[str, Any]) -> None:
    """The types and ranges of every config.json entry the model is built from (ConfigError naming
    the first wrong one); `ModelConfig.from_dict` checks the rest (layer types, cross-field rules)."""
    text = _section(data, "text_config", required=True)
    check_entries("text_config.", text, TEXT_RULES)
    for index, override in (text.get("per_layer_config") or {}).items():
        where = f"text_config.per_layer_config.{index}"
        if not (str(index).isdigit() and int(index) < text.get("num_hidden_layers", 48)):
            raise ConfigError(f"{where}: the key must be a layer index")
        if not isinstance(override, dict):
            raise ConfigError(f"{where} must be a JSON object, got {json.dumps(override)}")
        check_entries(f"{where}.", override, PER_LAYER_RULES)
    for kind, rope in (text.get("rope_parameters") or {}).items():
        if rope is not None and not isinstance(rope, dict):
            raise ConfigError(f"text_config.rope_parameters.{kind} must be a JSON object, got {json.dumps(rope)}")
        check_entries(f"text_config.rope_parameters.{kind}.", rope or {}, ROPE_RULES)
    for key, rules in (("vision_config", VISION_RULES), ("audio_config", AUDIO_RULES)):
        check_entries(f"{key}.", _section(data, key, required=False) or {}, rules)
    check_entries("", data, dict.fromkeys(MEDIA_TOKEN_KEYS, optional(TOKEN_ID)))
    vocab = text.get("vocab_size", TextConfig.vocab_size)
    for key in MEDIA_TOKEN_KEYS:
        if data.get(key) is not None and data[key] >= vocab:
            raise ConfigError(f"{key} {data[key]} is outside the vocabulary (text_config.vocab_size {vocab})")
    for key in ("quantization", "quantization_config"):
        section = data.get(key)
        if section is None:
            continue
        if not isinstance(section, dict):
            raise ConfigError(f"{key} must be a JSON object, got {json.dumps(section)}")
        check_entries(f"{key}.", section, QUANTIZATION_RULES)
        for module, override in section.items():
            if isinstance(override, dict):  # a module's own settings
                check_entries(f"{key}.{module}.", override, QUANTIZATION_RULES)


def default_layer_types(num_layers: int) -> list[str]:
    """The reference's default pattern: 5 sliding layers then 1 global, the last layer always global."""
    return [*(SLIDING if (i + 1) % 6 else GLOBAL for i in range(num_layers - 1)), GLOBAL]


# A layer type's RoPE as the checkpoint spells it (`rope_parameters`), when it does not.
DEFAULT_ROPE_PARAMETERS = {
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    GLOBAL: {"rope_type": "proportional", "rope_theta": 1_000_000.0, "partial_rotary_factor": 0.25},
}


class RopeSpec(NamedTuple):
    """Rotate-half RoPE: pairs (i, i + D/2), angle = position * theta^(-2i/D) for i < rotated_dims/2.

    `rotated_dims=None` rotates the whole head (default RoPE); the proportional RoPE of the global
    layers keeps the whole head_dim and zeroes the frequencies past the rotated fraction (128 of 512
    dims), so those pairs pass through unrotated. The kernels' frequency tables are
    `kernels.rope_tables.inv_freq`.
    """

    theta: float
    rotated_dims: int | None = None


def rope_spec(parameters: dict[str, Any], head_dim: int) -> RopeSpec:
    """The RoPE of one `rope_parameters` entry for a layer of `head_dim`, as the reference computes it."""
    theta = float(parameters.get("rope_theta", 10_000.0))
    if parameters.get("rope_type", "default") == "default":
        return RopeSpec(theta)
    return RopeSpec(theta, 2 * int(float(parameters.get("partial_rotary_factor", 1.0)) * head_dim // 2))


@dataclass
class LayerShape:
    layer_type: str
    head_dim: int
    num_kv_heads: int
    k_eq_v: bool  # no v_proj: values are the raw k_proj output
    rope: RopeSpec

    @property
    def is_sliding(self) -> bool:
        return self.layer_type == SLIDING


@dataclass
class TextConfig:
    vocab_size: int = 262_144
    hidden_size: int = 3840
    intermediate_size: int = 15360
    num_hidden_layers: int = 48
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 256
    global_head_dim: int = 512
    num_global_key_value_heads: int | None = 1
    per_layer_config: dict[int, dict[str, int]] | None = None
    hidden_activation: str = "gelu_pytorch_tanh"
    rms_norm_eps: float = 1e-6
    sliding_window: int = 1024
    layer_types: list[str] = field(default_factory=list)
    final_logit_softcapping: float | None = 30.0
    attention_k_eq_v: bool = True
    attention_bias: bool = False
    use_bidirectional_attention: str | None = "vision"
    rope_parameters: dict[str, dict[str, Any]] = field(default_factory=dict)
    tie_word_embeddings: bool = True
    pad_token_id: int = 0
    eos_token_id: int | list[int] = 1
    bos_token_id: int = 2
    max_position_embeddings: int = 262_144

    def __post_init__(self) -> None:
        if not self.layer_types:
            self.layer_types = default_layer_types(self.num_hidden_layers)
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers"
            )
        # The reference forces the last layer to be global.
        self.layer_types = [*self.layer_types[:-1], GLOBAL]
        for kind in self.layer_types:
            if kind not in (SLIDING, GLOBAL):
                raise ConfigError(f"unsupported layer type {kind!r}")
        self.rope_parameters = {**DEFAULT_ROPE_PARAMETERS, **self.rope_parameters}
        for kind, rope in self.rope_parameters.items():
            if rope.get("rope_type", "default") not in ("default", "proportional"):
                raise ConfigError(f"unsupported rope_type {rope['rope_type']!r} for {kind}")
        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu"):
            raise ConfigError(f"unsupported hidden_activation {self.hidden_activation!r}")
        if self.use_bidirectional_attention not in (None, "vision"):
            raise ConfigError(
                f"use_bidirectional_attention={self.use_bidirectional_attention!r} is not a Gemma 4 unified "
                "checkpoint setting (expected 'vision' or null)"
            )
        for i in range(self.num_hidden_layers):
            kv_heads = self.layer(i).num_kv_heads
            if self.num_attention_heads % kv_heads:
                raise ConfigError(
                    f"text_config: layer {i} has {kv_heads} key/value heads, which do not divide "
                    f"num_attention_heads {self.num_attention_heads}"
                )
        special = [("pad_token_id", self.pad_token_id), ("bos_token_id", self.bos_token_id)]
        special += [("eos_token_id", eos) for eos in self.eos_token_ids]
        for key, value in special:
            if value is not None and value >= self.vocab_size:
                raise ConfigError(f"text_config.{key} {value} is outside the vocabulary (vocab_size {self.vocab_size})")

    def layer(self, index: int) -> LayerShape:
        kind = self.layer_types[index]
        head_dim, kv_heads = self.head_dim, self.num_key_value_heads
        if self.per_layer_config is not None:
            override = self.per_layer_config.get(index, {})
            head_dim = override.get("head_dim", head_dim)
            kv_heads = override.get("num_key_value_heads", kv_heads)
        elif kind == GLOBAL:
            head_dim = self.global_head_dim
            # As in the reference: the global KV-head override applies to K=V models only.
            if self.attention_k_eq_v and self.num_global_key_value_heads is not None:
                kv_heads = self.num_global_key_value_heads
        rope = rope_spec(self.rope_parameters[kind], head_dim)
        return LayerShape(kind, head_dim, kv_heads, self.attention_k_eq_v and kind == GLOBAL, rope)

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        return list(eos) if isinstance(eos, (list, tuple)) else [eos]


@dataclass
class VisionConfig:
    patch_size: int = 16
    pooling_kernel_size: int = 3
    mm_embed_dim: int = 3840
    mm_posemb_size: int = 1120
    output_proj_dims: int = 3840
    rms_norm_eps: float = 1e-6

    @property
    def model_patch_size(self) -> int:
        return self.patch_size * self.pooling_kernel_size

    @property
    def patch_dim(self) -> int:
        return self.model_patch_size**2 * 3


@dataclass
class AudioConfig:
    audio_embed_dim: int = 640  # samples per soft token (40 ms at 16 kHz)
    rms_norm_eps: float = 1e-6


@dataclass
class ModelConfig:
    text: TextConfig
    vision: VisionConfig | None
    audio: AudioConfig | None
    boi_token_id: int = 255_999
    eoi_token_id: int = 258_882
    image_token_id: int = 258_880
    video_token_id: int = 258_884
    boa_token_id: int = 256_000
    eoa_token_id: int = 258_883
    audio_token_id: int = 258_881
    quantization: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        model_type = data.get("model_type")
        if model_type != SUPPORTED_MODEL_TYPE:
            raise ConfigError(
                f"model_type {model_type!r} is not supported: mlx-unified runs '{SUPPORTED_MODEL_TYPE}' checkpoints"
            )
        check_config(data)
        text = _text_config(data.get("text_config") or {})
        vision = _pick(VisionConfig, data["vision_config"]) if data.get("vision_config") else None
        audio = _pick(AudioConfig, data["audio_config"]) if data.get("audio_config") else None
        if vision is not None and vision.output_proj_dims != vision.mm_embed_dim:
            raise ConfigError("vision_config.output_proj_dims must equal mm_embed_dim")
        # config.json spells the end-of-audio id `eoa_token_index`.
        ids = {
            name.replace("eoa_token_index", "eoa_token_id"): data[name]
            for name in MEDIA_TOKEN_KEYS
            if data.get(name) is not None
        }
        return cls(
            text=text,
            vision=vision,
            audio=audio,
            quantization=data.get("quantization") or data.get("quantization_config"),
            raw=data,
            **ids,
        )

    @property
    def media_token_ids(self) -> tuple[int, int, int]:
        return self.image_token_id, self.video_token_id, self.audio_token_id

    @property
    def random_weights(self) -> bool:
        """True for test checkpoints with random weights (their output is meaningless)."""
        return bool(self.raw.get(RANDOM_WEIGHTS_FLAG))


def released_config() -> ModelConfig:
    """The released google/gemma-4-12B-it configuration (the config dataclasses' defaults)."""
    return ModelConfig(text=TextConfig(), vision=VisionConfig(), audio=AudioConfig())


def _pick(cls: type, data: dict[str, Any]) -> Any:
    names = cls.__dataclass_fields__.keys()
    return cls(**{k: v for k, v in data.items() if k in names})


def _text_config(data: dict[str, Any]) -> TextConfig:
    if data.get("num_kv_shared_layers", 0):
        raise ConfigError("num_kv_shared_layers > 0 is not a Gemma 4 12B unified architecture")
    values = dict(data)
    if values.get("per_layer_config") is not None:
        values["per_layer_config"] = {int(k): dict(v) for k, v in values["per_layer_config"].items()}
    rope = values.pop("rope_parameters", None) or {}
    values["rope_parameters"] = {kind: dict(params) for kind, params in rope.items() if params is not None}
    if values.get("tie_word_embeddings") is False:
        raise ConfigError("untied output embeddings are not a Gemma 4 unified architecture")
    return _pick(TextConfig, values)


def load_config(path: str | Path) -> ModelConfig:
    """Read `<path>/config.json` (or the file itself) into a ModelConfig."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"{file}: no config.json") from e
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{file}: unreadable config ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: config is not a JSON object")
    try:
        return ModelConfig.from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from e
