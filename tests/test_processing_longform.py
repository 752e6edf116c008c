"""Long recordings: real speech made with espeak-ng and sox, cut only inside pauses."""

import warnings

import numpy as np
import pytest
from speech import long_speech_file

from mlx_unified.processing import load_audio, run_long_audio, segment_audio


@pytest.fixture(scope="module")
def long_speech(tmp_path_factory):
    """About 75 s of phrases separated by known pauses; returns (wave, [(pause_start, pause_end), ...])."""
    path, pauses = long_speech_file(tmp_path_factory.mktemp("speech"))
    return load_audio(path), pauses


def test_recording_is_long_enough(long_speech):
    wave, _ = long_speech
    assert 75.0 <= len(wave) / 16000 < 85.0


def test_vad_cuts_only_inside_pauses(long_speech):
    wave, pauses = long_speech
    segments = segment_audio(wave, use_vad=True)
    assert len(segments) >= 3
    for segment in segments:
        assert segment.end - segment.start <= 30.0
        assert len(segment.samples) == pytest.approx((segment.end - segment.start) * 16000, abs=1)
    for before, after in zip(segments[:-1], segments[1:], strict=True):
        assert before.end == after.start
        assert any(start <= before.end <= end for start, end in pauses), (
            f"cut at {before.end:.2f} s is in speech"
        )
    assert segments[0].start == 0.0 and segments[-1].end == pytest.approx(len(wave) / 16000)


def test_fallback_fixed_windows_warn_and_overlap(long_speech):
    wave, _ = long_speech
    with pytest.warns(UserWarning, match="webrtcvad is not installed"):
        segments = segment_audio(wave, use_vad=False)
    assert [s.start for s in segments] == [0.0, 29.0, 58.0][: len(segments)]
    assert all(s.end - s.start <= 30.0 for s in segments)
    assert segments[-1].end == pytest.approx(len(wave) / 16000)


def test_run_long_audio_joins_texts_in_order(long_speech):
    wave, _ = long_speech
    seen = []

    def fake_transcribe(samples: np.ndarray) -> str:
        seen.append(len(samples))
        return f" part{len(seen)} "

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = run_long_audio(wave, fake_transcribe, progress=False, use_vad=True)
    assert result.text == " ".join(f"part{i + 1}" for i in range(len(result.segments)))
    assert seen == [len(s.samples) for s in result.segments]
    assert [round(s.start, 3) for s in result.segments] == sorted(round(s.start, 3) for s in result.segments)


def test_short_audio_is_one_segment():
    wave = np.zeros(16000 * 5, np.float32)
    segments = segment_audio(wave)
    assert len(segments) == 1 and segments[0].end == 5.0
