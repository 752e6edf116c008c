"""The media limits the release states, in one place that imports nothing (the command lines read
them to build their argument parsers before any decoder or MLX is loaded)."""

SAMPLING_RATE = 16_000
SAMPLES_PER_TOKEN = 640  # one audio soft token: 40 ms of raw waveform
MAX_CLIP_SECONDS = 30
MAX_CLIP_TOKENS = MAX_CLIP_SECONDS * SAMPLING_RATE // SAMPLES_PER_TOKEN  # 750

SUPPORTED_BUDGETS = (70, 140, 280, 560, 1120)  # soft tokens per image
DEFAULT_BUDGET = 280

DEFAULT_FPS = 1.0
DEFAULT_FRAME_BUDGET = 70  # soft tokens per video frame
MAX_VIDEO_SECONDS = 60.0
