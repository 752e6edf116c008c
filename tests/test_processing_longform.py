"""Long recordings: real speech made with espeak-ng and sox, cut only inside pauses."""

import shutil
import subprocess
import warnings

import numpy as np
import pytest

from mlx_unified.processing import load_audio, run_long_audio, segment_audio

PHRASES = [
    "The weather today is sunny with a light breeze from the west.",
    "Please remember to buy bread, milk and a dozen eggs on the way home.",
    "Our train leaves the central station at half past seven in the morning.",
    "The museum opens a new exhibition about ancient maps next Tuesday.",
    "She planted tomatoes, peppers and basil in the garden behind the house.",
    "Turn left at the second traffic light and park near the blue building.",
    "The committee will publish its final report at the end of the month.",
    "A good cup of coffee and a quiet room make the work go much faster.",
]
PAUSES = [0.7, 1.1, 0.6, 0.9, 1.3, 0.8, 1.0, 0.65]


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is required for these tests (apt-get install espeak-ng sox)"
    return path


@pytest.fixture(scope="module")
def long_speech(tmp_path_factory):
    """About 75 s of phrases separated by known pauses; returns (wave, [(pause_start, pause_end), ...])."""
    folder = tmp_path_factory.mktemp("speech")
    pieces, pauses, t = [], [], 0.0
    index = 0
    while t < 75.0:
        phrase, pause = PHRASES[index % len(PHRASES)], PAUSES[index % len(PAUSES)]
        raw, padded = folder / f"p{index}.wav", folder / f"p{index}_16k.wav"
        subprocess.run([tool("espeak-ng"), "-s", "165", "-w", str(raw), phrase], check=True)
        # sox: resample to 16 kHz mono 16-bit and append the pause as digital silence.
        subprocess.run(
            [
                tool("sox"),
                str(raw),
                "-r",
                "16000",
                "-c",
                "1",
                "-b",
                "16",
                str(padded),
                "pad",
                "0",
                str(pause),
            ],
            check=True,
        )
        wave = load_audio(padded)
        t += len(wave) / 16000
        # The known pause: the appended silence (espeak's own trailing silence only makes it longer).
        pauses.append((t - pause, t))
        pieces.append(padded)
        index += 1
    joined = folder / "long.wav"
    subprocess.run([tool("sox"), *map(str, pieces), str(joined)], check=True)
    return load_audio(joined), pauses


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
