"""Audio longer than one clip (30 s): cut on pauses found by a voice-activity detector, run in order.

With the `vad` extra (webrtcvad) cuts fall in the middle of the longest pause of each stretch, so no word
is split and every segment is 15..30 s of audio. Without it, fixed 30 s windows overlapping by 1 s are cut
and a warning says words at the seams may be split.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from .errors import MediaError
from .limits import MAX_CLIP_SECONDS, SAMPLING_RATE

VAD_FRAME_SECONDS = 0.03
# webrtcvad aggressiveness 0..3; 2 rejects breath and room noise in pauses without eating soft consonants.
VAD_MODE = 2
MIN_PAUSE_SECONDS = 0.24
FALLBACK_OVERLAP_SECONDS = 1.0
VAD_STRETCH_FRAMES = 2000  # VAD frames converted to 16-bit PCM at a time


@dataclass(frozen=True)
class AudioSegment:
    start: float  # seconds
    end: float
    samples: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class LongAudioResult:
    text: str
    segments: list[AudioSegment]
    texts: list[str]


def speech_frames(wave: np.ndarray, sampling_rate: int = SAMPLING_RATE) -> np.ndarray:
    """One bool per 30 ms frame: webrtcvad's speech decision."""
    import webrtcvad

    vad = webrtcvad.Vad(VAD_MODE)
    frame_length = int(sampling_rate * VAD_FRAME_SECONDS)
    count = len(wave) // frame_length
    decisions = np.zeros(count, dtype=bool)
    # 16-bit PCM a stretch at a time: a recording of hours is not copied whole a second time.
    stretch = VAD_STRETCH_FRAMES * frame_length
    end = count * frame_length
    for begin in range(0, end, stretch):
        pcm = (np.clip(wave[begin : min(begin + stretch, end)], -1.0, 1.0) * 32767).astype("<i2")
        first = begin // frame_length
        for i in range(len(pcm) // frame_length):
            frame = pcm[i * frame_length : (i + 1) * frame_length].tobytes()
            decisions[first + i] = vad.is_speech(frame, sampling_rate)
    return decisions


def find_pauses(is_speech: np.ndarray) -> list[tuple[float, float]]:
    """(start, end) seconds of every non-speech run of at least MIN_PAUSE_SECONDS."""
    pauses = []
    padded = np.concatenate([[True], is_speech, [True]])
    edges = np.flatnonzero(np.diff(padded.astype(np.int8)))
    for begin, end in zip(edges[::2], edges[1::2], strict=True):
        if (end - begin) * VAD_FRAME_SECONDS >= MIN_PAUSE_SECONDS:
            pauses.append((float(begin * VAD_FRAME_SECONDS), float(end * VAD_FRAME_SECONDS)))
    return pauses


def segment_audio(
    wave: np.ndarray,
    sampling_rate: int = SAMPLING_RATE,
    max_seconds: float = MAX_CLIP_SECONDS,
    use_vad: bool | None = None,
) -> list[AudioSegment]:
    """Cut `wave` into segments of at most `max_seconds`, on pauses when a VAD is available.

    `use_vad=None` uses webrtcvad when installed; True requires it; False forces fixed windows.
    Segments holding no speech at all are dropped (VAD mode only).
    """
    wave = np.asarray(wave, dtype=np.float32)
    duration = len(wave) / sampling_rate
    if duration <= max_seconds:
        return [AudioSegment(0.0, duration, wave)]
    if use_vad is None:
        try:
            import webrtcvad  # noqa: F401

            use_vad = True
        except ImportError:
            use_vad = False
    if not use_vad:
        warnings.warn(
            "webrtcvad is not installed (pip install 'mlx-unified[vad]'): cutting fixed "
            f"{max_seconds:g} s windows overlapping by {FALLBACK_OVERLAP_SECONDS:g} s; words at the seams may be split",
            stacklevel=2,
        )
        return _fixed_windows(wave, sampling_rate, max_seconds)
    is_speech = speech_frames(wave, sampling_rate)
    cuts = _choose_cuts(find_pauses(is_speech), duration, max_seconds)
    bounds = [0.0, *cuts, duration]
    segments = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        first, last = int(start / VAD_FRAME_SECONDS), int(np.ceil(end / VAD_FRAME_SECONDS))
        if is_speech[first:last].any():
            segments.append(
                AudioSegment(start, end, wave[round(start * sampling_rate) : round(end * sampling_rate)])
            )
    return segments


def run_long_audio(
    wave: np.ndarray,
    run_segment: Callable[[np.ndarray], str],
    *,
    sampling_rate: int = SAMPLING_RATE,
    progress: bool = True,
    use_vad: bool | None = None,
) -> LongAudioResult:
    """Run `run_segment` (e.g. a transcription prompt) on each segment in order and join the texts."""
    segments = segment_audio(wave, sampling_rate, use_vad=use_vad)
    if not segments:
        raise MediaError("<audio>: no speech found")
    texts = [
        run_segment(segment.samples).strip()
        for segment in tqdm(segments, desc="audio segments", unit="seg", disable=not progress)
    ]
    return LongAudioResult(text=" ".join(t for t in texts if t), segments=segments, texts=texts)


def _choose_cuts(pauses: list[tuple[float, float]], duration: float, max_seconds: float) -> list[float]:
    """Greedy: from each segment start, cut in the middle of the longest pause in the second half of the
    allowed stretch (any pause if that half has none; a hard cut at the limit if there is no pause)."""
    cuts: list[float] = []
    start = 0.0
    while duration - start > max_seconds:
        limit = start + max_seconds
        inside = [(b, e) for b, e in pauses if start < (b + e) / 2 <= limit]
        late = [(b, e) for b, e in inside if (b + e) / 2 >= start + max_seconds / 2]
        candidates = late or inside
        if candidates:
            begin, end = max(candidates, key=lambda pause: (pause[1] - pause[0], pause[0]))
            cut = (begin + end) / 2
        else:
            warnings.warn(f"no pause in {start:.1f}..{limit:.1f} s: cutting inside speech", stacklevel=3)
            cut = limit
        cuts.append(cut)
        start = cut
    return cuts


def _fixed_windows(wave: np.ndarray, sampling_rate: int, max_seconds: float) -> list[AudioSegment]:
    window = int(max_seconds * sampling_rate)
    step = window - int(FALLBACK_OVERLAP_SECONDS * sampling_rate)
    segments = []
    for begin in range(0, len(wave), step):
        end = min(begin + window, len(wave))
        segments.append(AudioSegment(begin / sampling_rate, end / sampling_rate, wave[begin:end]))
        if end == len(wave):
            break
    return segments
