"""Media processing: files and chat messages -> the arrays Gemma 4 unified takes."""

from .audio import SAMPLING_RATE, audio_num_tokens, frame_audio, load_audio
from .chat import TURN_END, TURN_START, Processor, build_messages, system_turn, user_turn, with_system
from .errors import MediaError
from .image import SUPPORTED_BUDGETS, image_num_tokens, load_image, preprocess_image
from .longform import AudioSegment, LongAudioResult, run_long_audio, segment_audio
from .video import load_video, load_video_audio, plan_video, preprocess_video

__all__ = [
    "SAMPLING_RATE",
    "TURN_END",
    "TURN_START",
    "SUPPORTED_BUDGETS",
    "AudioSegment",
    "LongAudioResult",
    "MediaError",
    "Processor",
    "audio_num_tokens",
    "build_messages",
    "frame_audio",
    "image_num_tokens",
    "load_audio",
    "load_image",
    "load_video",
    "load_video_audio",
    "plan_video",
    "preprocess_image",
    "preprocess_video",
    "run_long_audio",
    "segment_audio",
    "system_turn",
    "user_turn",
    "with_system",
]
