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

# Recordings cut into clips (the transcription endpoint, the command line): the longest one decoded.
# Decoding keeps only the model's mono float32 samples, so this bounds its memory.
MAX_RECORDING_SECONDS = 3 * 60 * 60
# What an audio header or a caller may claim: rates outside this are corrupt or meaningless, and more
# channels than this are no recording a chat model hears (and would multiply the decoder's block size).
MIN_SAMPLING_RATE = 1_000
MAX_SAMPLING_RATE = 768_000
MAX_AUDIO_CHANNELS = 64
