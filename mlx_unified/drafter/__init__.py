"""Gemma 4's multi-token-prediction drafter (`gemma4_unified_assistant`): configuration, module, loading.

Names are imported on first use: the converter reads a drafter's config without loading the model code.
"""

from importlib import import_module
from typing import Any

_PUBLIC = {
    "DRAFTER_MODEL_TYPE": "config",
    "DrafterConfig": "config",
    "DrafterMismatchError": "config",
    "drafter_tensor_shapes": "config",
    "load_drafter_config": "config",
    "drafter_weight_name": "config",
    "load_drafter": "loading",
    "save_drafter": "loading",
    "CentroidHead": "model",
    "Drafter": "model",
    "KeyValues": "model",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'mlx_unified.drafter' has no attribute {name!r}")
    return getattr(import_module(f".{_PUBLIC[name]}", __name__), name)
