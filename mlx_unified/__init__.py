"""mlx-unified: Gemma 4 12B unified (text, image, audio, video) on Apple Silicon with MLX.

The public names are imported on first use, so `generate.py --help` or a refused flag does not pay
for loading MLX, mlx-lm and transformers.
"""

from importlib import import_module
from typing import Any

_PUBLIC = {
    "ConfigError": "config",
    "Drafter": "drafter",
    "ModelConfig": "config",
    "load_config": "config",
    "load_drafter": "drafter",
    "ModelLoadError": "checkpoint",
    "load": "loading",
    "load_model": "loading",
    "Model": "model",
    "generate": "generation",
    "generate_step": "generation",
    "stream_generate": "generation",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'mlx_unified' has no attribute {name!r}")
    return getattr(import_module(f".{_PUBLIC[name]}", __name__), name)
