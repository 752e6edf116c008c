"""Audio input: any readable file, bytes or array -> 16 kHz mono float32 -> 640-sample frames.

The unified model has no audio encoder: each 40 ms frame of raw waveform is one soft token, so the only
processing is decoding, down-mixing, resampling and cutting frames (`Gemma4UnifiedAudioFeatureExtractor`).

Files are decoded block by block, each block mixed down to mono and resampled as it comes, so memory
holds the output (16 kHz mono float32) and one block, whatever the file's rate and channel count; the
duration limit is checked against the header first and against what is decoded as it grows, so a
small file that expands to hours of audio (a decompression bomb) costs neither memory nor time.
"""

from __future__ import annotations

import io
import logging
import math
from pathlib import Path

import numpy as np
import soundfile
import soxr

from .errors import MediaError, readable_source
from .limits import (
    MAX_AUDIO_CHANNELS,
    MAX_CLIP_SECONDS,
    MAX_RECORDING_SECONDS,
    MAX_SAMPLING_RATE,
    MIN_SAMPLING_RATE,
    SAMPLES_PER_TOKEN,
    SAMPLING_RATE,
)

AudioSource = str | Path | bytes | np.ndarray | tuple
log = logging.getLogger(__name__)

# Samples (frames x channels) decoded at a time: small enough that a block of the widest file allowed
# is a couple of megabytes, large enough that the per-block overhead is noise.
BLOCK_SAMPLES = 1 << 19
# libsndfile's count for a stream whose header gives no length (SF_COUNT_MAX).
_UNKNOWN_FRAMES = 2**62
# Bytes per sample of the uncompressed libsndfile subtypes: their frame count can be checked against
# the file's size.
_PCM_BYTES = {
    "PCM_S8": 1,
    "PCM_U8": 1,
    "PCM_16": 2,
    "PCM_24": 3,
    "PCM_32": 4,
    "FLOAT": 4,
    "DOUBLE": 8,
    "ULAW": 1,
    "ALAW": 1,
}
# libsndfile formats whose samples are compressed whatever the subtype says (a FLAC's is PCM_16).
_COMPRESSED_FORMATS = {"FLAC", "OGG", "MP3"}
# What libsndfile (through soundfile: LibsndfileError is a RuntimeError) raises for a file it cannot read.
_SNDFILE_ERRORS = (RuntimeError, TypeError, ValueError, OSError)
# PyAV reports a damaged stream through FFmpeg's errors and, for fields it cannot map, plain Python
# ones: all of them mean this input cannot be decoded.
_AV_PYTHON_ERRORS = (ValueError, TypeError, AttributeError, OSError, EOFError, IndexError)
# Container formats whose length ffmpeg estimates from the bit rate instead of reading it.
_ESTIMATED_LENGTH_FORMATS = {"mp3", "aac", "ac3", "eac3", "dts", "mp2", "amr", "adts"}


def describe_source(source: object) -> str:
    """How error messages name an input: the file path, or the kind of in-memory value."""
    if isinstance(source, (str, Path)):
        return str(source)
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    return f"<{type(source).__name__}>"


def check_sampling_rate(rate: object, what: str) -> int | float:
    """`rate` as a number of hertz, or a MediaError naming `what`: text, NaN, booleans and rates outside
    MIN_SAMPLING_RATE..MAX_SAMPLING_RATE are refused (a rate of 10**12 would resample to nothing)."""
    if isinstance(rate, (bool, np.bool_)) or not isinstance(rate, (int, float, np.integer, np.floating)):
        raise MediaError(
            f"{what}: a sampling rate must be a number of hertz, got {type(rate).__name__} {_short(rate)}"
        )
    value = float(rate)
    if not math.isfinite(value) or not MIN_SAMPLING_RATE <= value <= MAX_SAMPLING_RATE:
        raise MediaError(
            f"{what}: sampling rate {_short(rate)} Hz is outside {MIN_SAMPLING_RATE}..{MAX_SAMPLING_RATE} Hz"
        )
    return int(value) if value.is_integer() else value


def load_audio(
    source: AudioSource, sampling_rate: int = SAMPLING_RATE, *, max_seconds: float = MAX_RECORDING_SECONDS
) -> np.ndarray:
    """Decode `source` to mono float32 at `sampling_rate`, refusing audio longer than `max_seconds`.

    `source` is a path or bytes of anything libsndfile reads (WAV, FLAC, OGG, MP3, ...) or, with PyAV
    installed, the audio track of a video/container file; or `(array, rate)`; or an array already at
    `sampling_rate`. Arrays may be integer PCM and `(samples, channels)` or `(channels, samples)`.
    Input already mono at `sampling_rate` comes back sample-exact. A chat clip passes
    `max_seconds=MAX_CLIP_SECONDS`; the default is the longest recording anything here cuts into clips.
    Every problem is a MediaError naming the source.
    """
    name = describe_source(source)
    output_rate = check_sampling_rate(sampling_rate, "sampling_rate")
    if isinstance(source, tuple):
        if len(source) != 2:
            raise MediaError(f"{name}: expected (array, sampling_rate), got a tuple of {len(source)}")
        rate = check_sampling_rate(source[1], f"{name}: the sampling rate of (array, sampling_rate)")
        return _from_array(source[0], rate, output_rate, name, max_seconds)
    if isinstance(source, np.ndarray):
        return _from_array(source, output_rate, output_rate, name, max_seconds)
    if isinstance(source, (str, Path, bytes, bytearray)):
        return _decode(source, name, output_rate, max_seconds)
    raise MediaError(f"{name}: unsupported audio input type")


def audio_num_tokens(num_samples: int) -> int:
    """Soft tokens for a clip of `num_samples` at 16 kHz (the last frame is zero-padded)."""
    return math.ceil(num_samples / SAMPLES_PER_TOKEN)


def frame_audio(wave: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cut a 16 kHz mono waveform into `[T, 640]` float32 frames (last one zero-padded) and a `[T]` mask."""
    wave = np.asarray(wave, dtype=np.float32).reshape(-1)
    pad = (-len(wave)) % SAMPLES_PER_TOKEN
    features = np.pad(wave, (0, pad)).reshape(-1, SAMPLES_PER_TOKEN)
    return features, np.ones(len(features), dtype=bool)


def _from_array(
    samples: object, rate: int | float, output_rate: int | float, name: str, max_seconds: float
) -> np.ndarray:
    try:
        samples = np.asarray(samples)
    except (ValueError, TypeError) as error:  # ragged lists, objects numpy cannot make an array of
        raise MediaError(f"{name}: not an audio array ({error})") from error
    # The length before any conversion: an over-long array is refused without a float copy of it.
    frames = max(samples.shape) if samples.ndim == 2 else samples.size
    if frames > max_seconds * rate:
        raise _too_long(name, max_seconds, frames / rate, "")
    wave = _to_mono_float32(samples, name)
    if rate != output_rate:
        wave = soxr.resample(wave, rate, output_rate, quality="HQ").astype(np.float32, copy=False)
        if wave.size == 0:
            raise MediaError(f"{name}: audio is too short to resample ({frames} samples at {rate} Hz)")
    return wave


class _Mixdown:
    """Takes decoded `(frames, channels)` float32 blocks; keeps each one as mono at the output rate,
    refusing the audio as soon as it runs past the limit."""

    def __init__(self, name: str, rate: int, output_rate: int | float, max_seconds: float) -> None:
        self.name, self.max_seconds, self.rate = name, max_seconds, rate
        self.limit_frames = math.floor(max_seconds * rate)
        self.resampler = (
            soxr.ResampleStream(rate, output_rate, 1, dtype="float32", quality="HQ")
            if rate != output_rate
            else None
        )
        self.pieces: list[np.ndarray] = []
        self.frames = 0

    def add(self, block: np.ndarray) -> None:
        if block.shape[1] > MAX_AUDIO_CHANNELS:
            raise MediaError(
                f"{self.name}: {block.shape[1]} audio channels, at most {MAX_AUDIO_CHANNELS} are read"
            )
        self.frames += len(block)
        if self.frames > self.limit_frames:
            raise _too_long(self.name, self.max_seconds, None, " (decoding stopped there)")
        # A copy either way: the decoder reuses its block buffer.
        mono = block.mean(axis=1, dtype=np.float32) if block.shape[1] > 1 else block[:, 0].copy()
        if not np.isfinite(mono).all():
            raise MediaError(f"{self.name}: audio contains NaN or infinite samples")
        self.pieces.append(self.resampler.resample_chunk(mono) if self.resampler else mono)

    def finish(self) -> np.ndarray:
        if self.frames == 0:
            raise MediaError(f"{self.name}: audio has zero length")
        if self.resampler is not None:
            self.pieces.append(self.resampler.resample_chunk(np.zeros(0, np.float32), last=True))
        wave = np.concatenate(self.pieces)
        if wave.size == 0:
            raise MediaError(
                f"{self.name}: audio is too short to resample ({self.frames} samples at {self.rate} Hz)"
            )
        return wave


def _decode(
    source: str | Path | bytes | bytearray, name: str, output_rate: int | float, max_seconds: float
) -> np.ndarray:
    data = readable_source(source, name, "audio")
    size = len(data.getbuffer()) if isinstance(data, io.BytesIO) else Path(data).stat().st_size
    try:
        sound = soundfile.SoundFile(data)
    except _SNDFILE_ERRORS as sndfile_error:
        if isinstance(data, io.BytesIO):
            data.seek(0)
        try:
            return _decode_with_av(data, name, output_rate, max_seconds)
        except ImportError:
            raise MediaError(f"{name}: cannot decode audio ({sndfile_error})") from sndfile_error
    with sound:
        try:
            return _decode_sndfile(sound, data, size, name, output_rate, max_seconds)
        except MediaError:  # an InputError, which is a ValueError
            raise
        except _SNDFILE_ERRORS as error:
            raise MediaError(f"{name}: cannot decode audio ({error})") from error


def _decode_sndfile(
    sound: soundfile.SoundFile,
    data: str | io.BytesIO,
    size: int,
    name: str,
    output_rate: int | float,
    max_seconds: float,
) -> np.ndarray:
    rate, channels = _check_header(sound.samplerate, sound.channels, name)
    if _length_is_trusted(sound, size) and sound.frames > max_seconds * rate:
        raise _too_long(name, max_seconds, sound.frames / rate, " (from its header)")
    if sound.format == "WAV":
        _warn_if_truncated(data, name)
    mixdown = _Mixdown(name, rate, output_rate, max_seconds)
    buffer = np.empty((max(1, BLOCK_SAMPLES // channels), channels), np.float32)
    pointer = soundfile._ffi.cast("float *", soundfile._ffi.from_buffer(buffer))
    while True:
        # libsndfile's own read: soundfile's seeks to the new position after each read, which fails at
        # the end of a stream whose header gives no length (a FLAC written to a pipe).
        count = soundfile._snd.sf_readf_float(sound._file, pointer, len(buffer))
        error = soundfile._snd.sf_error(sound._file)
        if error:
            message = soundfile._ffi.string(soundfile._snd.sf_error_number(error)).decode(errors="replace")
            raise MediaError(f"{name}: cannot decode audio ({message})")
        if count <= 0:
            break
        mixdown.add(buffer[:count])
    return mixdown.finish()


def _check_header(rate: object, channels: object, name: str) -> tuple[int, int]:
    """The header's rate and channel count, refused when absurd (before anything is allocated for them)."""
    if not isinstance(channels, int) or not 1 <= channels <= MAX_AUDIO_CHANNELS:
        raise MediaError(
            f"{name}: its header gives {channels} audio channels (at most {MAX_AUDIO_CHANNELS} are read)"
        )
    if not isinstance(rate, int) or not MIN_SAMPLING_RATE <= rate <= MAX_SAMPLING_RATE:
        raise MediaError(
            f"{name}: its header gives a sampling rate of {rate} Hz "
            f"(outside {MIN_SAMPLING_RATE}..{MAX_SAMPLING_RATE} Hz)"
        )
    return rate, channels


def _length_is_trusted(sound: soundfile.SoundFile, size: int) -> bool:
    """Whether the header's frame count can refuse a file undecoded: not for streams without a length,
    MP3 (an estimate from the first frame's bit rate), or uncompressed audio claiming more bytes than
    the file holds (a cut-off file: what is there is read)."""
    if not 0 < sound.frames < _UNKNOWN_FRAMES or sound.format == "MP3":
        return False
    width = None if sound.format in _COMPRESSED_FORMATS else _PCM_BYTES.get(sound.subtype)
    return width is None or sound.frames * sound.channels * width <= size


def _decode_with_av(
    data: str | io.BytesIO, name: str, output_rate: int | float, max_seconds: float
) -> np.ndarray:
    """Containers libsndfile does not read (MP4, MKV, M4A, WebM, ...): decode their first audio track."""
    import av

    try:
        with av.open(data) as container:
            if not container.streams.audio:
                raise MediaError(f"{name}: no audio track")
            stream = container.streams.audio[0]
            rate, _ = _check_header(stream.codec_context.sample_rate, stream.codec_context.channels, name)
            seconds = _stated_seconds(container, stream)
            if seconds is not None and seconds > max_seconds:
                raise _too_long(name, max_seconds, seconds, " (from its header)")
            mixdown = _Mixdown(name, rate, output_rate, max_seconds)
            # Interleaved float at the header's rate, each frame's own channels; soxr does the
            # resampling. Not planar: PyAV reads a planar frame's planes from FFmpeg's fixed array of
            # data pointers, out of bounds when a frame has more channels than that array holds.
            resampler = av.AudioResampler(format="flt", rate=rate)
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    mixdown.add(_interleaved(out))
            for out in resampler.resample(None):
                mixdown.add(_interleaved(out))
    except MediaError:
        raise
    except (av.error.FFmpegError, *_AV_PYTHON_ERRORS) as error:
        raise MediaError(f"{name}: cannot decode audio ({error})") from error
    if mixdown.frames == 0:
        raise MediaError(f"{name}: audio track has no samples")
    return mixdown.finish()


def _interleaved(frame: object) -> np.ndarray:
    """An interleaved float frame as `(frames, channels)`."""
    return frame.to_ndarray().reshape(frame.samples, len(frame.layout.channels))


def _stated_seconds(container: object, stream: object) -> float | None:
    """The audio track's length as its container states it; None where ffmpeg would estimate it from the
    bit rate (raw MP3, AAC, ...) or the container gives none."""
    names = set(container.format.name.split(","))
    if names & _ESTIMATED_LENGTH_FORMATS:
        return None
    if stream.duration is not None and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000
    return None


def _too_long(name: str, max_seconds: float, seconds: float | None, how: str) -> MediaError:
    length = f"{seconds:.1f} s long{how}" if seconds is not None else f"longer than {max_seconds:g} s{how}"
    if max_seconds <= MAX_CLIP_SECONDS:
        limit = (
            f"one clip holds at most {max_seconds:g} s (longer recordings are cut on pauses by the "
            "transcription endpoint, the command line and mlx_unified.processing.run_long_audio)"
        )
    else:
        limit = f"the limit is {max_seconds:g} s"
    return MediaError(f"{name}: audio is {length}; {limit}")


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _to_mono_float32(samples: np.ndarray, name: str, channel_axis: int | None = None) -> np.ndarray:
    """Mono float32 samples; `channel_axis` None: the shorter axis of a 2-D array holds the channels."""
    samples = np.asarray(samples)
    if samples.dtype == np.uint8:
        samples = (samples.astype(np.float32) - 128.0) / 128.0
    elif np.issubdtype(samples.dtype, np.signedinteger):
        samples = samples.astype(np.float32) / float(-np.iinfo(samples.dtype).min)
    elif np.issubdtype(samples.dtype, np.floating):
        samples = samples.astype(np.float32, copy=False)
    else:
        raise MediaError(f"{name}: unsupported sample type {samples.dtype}")
    if samples.size == 0:
        raise MediaError(f"{name}: audio has zero length")
    if samples.ndim == 2:
        if channel_axis is None:
            # (samples, channels) from most libraries, (channels, samples) from some.
            channel_axis = 1 if samples.shape[1] <= samples.shape[0] else 0
        samples = samples.mean(axis=channel_axis, dtype=np.float32)
    elif samples.ndim != 1:
        raise MediaError(f"{name}: expected 1-D or 2-D audio, got shape {samples.shape}")
    if not np.isfinite(samples).all():
        raise MediaError(f"{name}: audio contains NaN or infinite samples")
    return np.ascontiguousarray(samples, dtype=np.float32)


def _warn_if_truncated(data: str | io.BytesIO, name: str) -> None:
    """Warn when a WAV file holds less audio than its header declares (a cut-off download or copy):
    libsndfile reads what is there without a word."""
    if isinstance(data, io.BytesIO):
        head, size = data.getvalue()[: 1 << 16], len(data.getbuffer())
    else:
        with open(data, "rb") as file:
            head = file.read(1 << 16)
        size = Path(data).stat().st_size
    declared = _wav_data_chunk(head)
    if declared is None:
        return
    offset, length, byte_rate = declared
    if byte_rate and offset + length > size:
        log.warning(
            "%s: truncated WAV file: its header declares %.2f s of audio, the file holds %.2f s",
            name,
            length / byte_rate,
            max(size - offset, 0) / byte_rate,
        )


def _wav_data_chunk(head: bytes) -> tuple[int, int, int] | None:
    """(offset, declared length, bytes per second) of a RIFF WAV's data chunk, from the file's start."""
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    position, byte_rate = 12, 0
    while position + 8 <= len(head):
        chunk, length = head[position : position + 4], int.from_bytes(head[position + 4 : position + 8], "little")
        if chunk == b"fmt " and position + 16 <= len(head):
            byte_rate = int.from_bytes(head[position + 16 : position + 20], "little")
        if chunk == b"data":
            return position + 8, length, byte_rate
        position += 8 + length + (length & 1)
    return None
