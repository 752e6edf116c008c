"""Loading a drafter: the released layout (transformers' names) or mlx-vlm's (the same names, quantized).

Both store the module tree of `Drafter` (`model.embed_tokens`, `model.layers.N.*`, `model.norm`,
`pre_projection`, `post_projection`, `masked_embedding.{centroids,token_ordering}`); the released one
may also hold the tied `lm_head.weight`, and keeps `token_ordering` in int64. mlx-vlm's adds the
quantized modules' `.scales`/`.biases` and a `quantization` section (defaults and per-module overrides
keyed by these paths), which the target's loader already reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ..checkpoint import FLOAT_DTYPES, float_dtype, module_quantization, resolve
from ..config import TextConfig
from ..loading import install_weights, read_weights
from .config import drafter_weight_name, load_drafter_config
from .model import Drafter


def load_drafter(
    path_or_hub_id: str | Path, dtype: str | None = None, lazy: bool = False, target: TextConfig | None = None
) -> Drafter:
    """The drafter of a local folder or a hub id. dtype: bfloat16 (default), float16 or float32;
    lazy: leave the weights unread until first use; target: the text config of the model it will draft
    for, checked before any weight is read (DrafterMismatchError)."""
    path = resolve(path_or_hub_id)
    config = load_drafter_config(path)
    if target is not None:
        config.check_target(target)
    drafter = Drafter(config)
    weights = read_weights(path, rename=drafter_weight_name)
    if "masked_embedding.token_ordering" in weights:
        weights["masked_embedding.token_ordering"] = weights["masked_embedding.token_ordering"].astype(mx.int32)
    quantization = module_quantization(config.quantization, rename=drafter_weight_name)
    install_weights(drafter, path, weights, quantization, dtype)
    if not lazy:
        mx.eval(drafter.parameters())
    drafter.eval()
    return drafter


def save_drafter(drafter: Drafter, path: str | Path) -> Path:
    """Write `drafter` in the released layout: `config.json` (its config as read or built, `dtype` set to
    the weights') and `model.safetensors` under the module names, which transformers and mlx-vlm read."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = dict(drafter.config.raw, dtype=next(name for name in FLOAT_DTYPES if float_dtype(name) == drafter.dtype))
    (path / "config.json").write_text(json.dumps(config, indent=2))
    weights = dict(nn.utils.tree_flatten(drafter.parameters()))
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "pt"})
    return path
