"""Gemma 4's multi-token-prediction drafter (`gemma4_unified_assistant`): configuration, module, loading."""

from .config import DRAFTER_MODEL_TYPE, DrafterConfig, DrafterMismatchError, load_drafter_config
from .loading import drafter_weight_name, load_drafter, save_drafter
from .model import CentroidHead, Drafter, KeyValues

__all__ = [
    "DRAFTER_MODEL_TYPE",
    "CentroidHead",
    "Drafter",
    "DrafterConfig",
    "DrafterMismatchError",
    "KeyValues",
    "drafter_weight_name",
    "load_drafter",
    "load_drafter_config",
    "save_drafter",
]
