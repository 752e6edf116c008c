"""Media processing: files and chat messages -> the arrays Gemma 4 unified takes.

The public names are imported on first use, so a front end can read the limits (`limits`) and catch
`MediaError` without loading the decoders.
"""

from importlib import import_module
from typing import Any

from .errors import MediaError
from .limits import SAMPLING_RATE, SUPPORTED_BUDGETS

_PUBLIC = {
    "audio_num_tokens": "audio",
    "frame_audio": "audio",
    "load_audio": "audio",
    "Processor": "chat",
    "system_turn": "chat",
    "user_turn": "chat",
    "image_num_tokens": "image",
    "load_image": "image",
    "preprocess_image": "image",
    "AudioSegment": "longform",
    "LongAudioResult": "longform",
    "run_long_audio": "longform",
    "segment_audio": "longform",
    "load_video": "video",
    "load_video_patches": "video",
    "load_video_audio": "video",
    "plan_video": "video",
    "preprocess_video": "video",
}

__all__ = [
    "AudioSegment",
    "LongAudioResult",
    "MediaError",
    "Processor",
    "SAMPLING_RATE",
    "SUPPORTED_BUDGETS",
    "audio_num_tokens",
    "frame_audio",
    "image_num_tokens",
    "load_audio",
    "load_image",
    "load_video",
    "load_video_patches",
    "load_video_audio",
    "plan_video",
    "preprocess_image",
    "preprocess_video",
    "run_long_audio",
    "segment_audio",
    "system_turn",
    "user_turn",
]


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'mlx_unified.processing' has no attribute {name!r}")
    return getattr(import_module(f".{_PUBLIC[name]}", __name__), name)
