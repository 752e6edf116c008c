"""Audio input: any readable file, bytes or array -> 16 kHz mono float32 -> 640-sample frames.

The unified model has no audio encoder: each 40 ms frame of raw waveform is one soft token, so the only
processing is decoding, down-mixing, resampling and cutting frames (`Gemma4UnifiedAudioFeatureExtractor`).
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
from .limits import SAMPLES_PER_TOKEN, SAMPLING_RATE

AudioSource = str | Path | bytes | np.ndarray | tuple
log = logging.getLogger(__name__)


def describe_source(source: object) -> str:
    """How error messages name an input: the file path, or the kind of in-memory value."""
    if isinstance(source, (str, Path)):
        return str(source)
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    return f"<{type(source).__name__}>"


def load_audio(source: AudioSource, sampling_rate: int = SAMPLING_RATE) -> np.ndarray:
    """Decode `source` to mono float32 at `sampling_rate`.

    `source` is a path or bytes of anything libsndfile reads (WAV, FLAC, OGG, MP3, ...) or, with PyAV
    installed, the audio track of a video/container file; or `(array, rate)`; or an array already at
    `sampling_rate`. Arrays may be integer PCM and `(samples, channels)` or `(channels, samples)`.
    Input already mono at `sampling_rate` comes back sample-exact.
    """
    name = describe_source(source)
    if isinstance(source, tuple):
        if len(source) != 2:
            raise MediaError(f"{name}: expected (array, sampling_rate), got a tuple of {len(source)}")
        samples, rate = np.asarray(source[0]), int(source[1])
    elif isinstance(source, np.ndarray):
        samples, rate = source, sampling_rate
    elif isinstance(source, (str, Path, bytes, bytearray)):
        samples, rate = _decode(source, name)
    else:
        raise MediaError(f"{name}: unsupported audio input type")
    if rate <= 0:
        raise MediaError(f"{name}: invalid sampling rate {rate}")
    # Decoders give (frames, channels); arrays from callers may be either way round.
    decoded = isinstance(source, (str, Path, bytes, bytearray))
    wave = _to_mono_float32(samples, name, channel_axis=1 if decoded else None)
    if rate != sampling_rate:
        wave = soxr.resample(wave, rate, sampling_rate, quality="HQ").astype(np.float32, copy=False)
    return wave


def audio_num_tokens(num_samples: int) -> int:
    """Soft tokens for a clip of `num_samples` at 16 kHz (the last frame is zero-padded)."""
    return math.ceil(num_samples / SAMPLES_PER_TOKEN)


def frame_audio(wave: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cut a 16 kHz mono waveform into `[T, 640]` float32 frames (last one zero-padded) and a `[T]` mask."""
    wave = np.asarray(wave, dtype=np.float32).reshape(-1)
    pad = (-len(wave)) % SAMPLES_PER_TOKEN
    features = np.pad(wave, (0, pad)).reshape(-1, SAMPLES_PER_TOKEN)
    return features, np.ones(len(features), dtype=bool)


def _decode(source: str | Path | bytes | bytearray, name: str) -> tuple[np.ndarray, int]:
    data = readable_source(source, name, "audio")
    try:
        samples, rate = soundfile.read(data, dtype="float32", always_2d=True)
        _warn_if_truncated(data, name)
        return samples, rate
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as sndfile_error:
        if isinstance(data, io.BytesIO):
            data.seek(0)
        try:
            return _decode_with_av(data, name)
        except ImportError:
            raise MediaError(f"{name}: cannot decode audio ({sndfile_error})") from sndfile_error


def _decode_with_av(data: str | io.BytesIO, name: str) -> tuple[np.ndarray, int]:
    """Containers libsndfile does not read (MP4, MKV, M4A, WebM, ...): decode their first audio track."""
    import av

    try:
        with av.open(data) as container:
            if not container.streams.audio:
                raise MediaError(f"{name}: no audio track")
            stream = container.streams.audio[0]
            # Planar float keeps the native rate and channels; soxr does the resampling.
            resampler = av.AudioResampler(format="fltp", layout=stream.layout.name, rate=stream.rate)
            chunks = [
                out.to_ndarray() for frame in container.decode(stream) for out in resampler.resample(frame)
            ]
            chunks += [out.to_ndarray() for out in resampler.resample(None)]
            rate = stream.rate
    except av.error.FFmpegError as error:
        raise MediaError(f"{name}: cannot decode audio ({error})") from error
    if not chunks:
        raise MediaError(f"{name}: audio track has no samples")
    return np.concatenate(chunks, axis=1).T, rate


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
