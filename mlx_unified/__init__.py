"""mlx-unified: Gemma 4 12B unified (text, image, audio, video) on Apple Silicon with MLX."""

from .config import ConfigError, ModelConfig, load_config
from .loading import ModelLoadError, load, load_model
from .model import Model

__all__ = ["ConfigError", "Model", "ModelConfig", "ModelLoadError", "load", "load_config", "load_model"]
