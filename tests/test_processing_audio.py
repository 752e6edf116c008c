"""Audio loading and framing, against the reference `Gemma4UnifiedAudioFeatureExtractor`."""

import io

import numpy as np
import pytest
import soundfile
from transformers.models.gemma4_unified.feature_extraction_gemma4_unified import (
    Gemma4UnifiedAudioFeatureExtractor,
)

from mlx_unified.processing import MediaError, audio_num_tokens, frame_audio, load_audio


def tone(seconds: float, rate: int, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.mark.parametrize("length", [1, 639, 640, 641, 16000, 16000 * 30])
def test_frames_equal_reference_extractor(length):
    wave = np.random.default_rng(length).standard_normal(length).astype(np.float32)
    reference = Gemma4UnifiedAudioFeatureExtractor()(wave, return_tensors="np")
    features, mask = frame_audio(wave)
    np.testing.assert_array_equal(features, reference["input_features"][0])
    np.testing.assert_array_equal(mask, reference["input_features_mask"][0])
    assert features.dtype == np.float32 and mask.dtype == bool
    assert len(features) == audio_num_tokens(length)


def test_16khz_mono_wav_is_sample_exact(tmp_path):
    pcm = (np.random.default_rng(0).standard_normal(12345) * 8000).astype(np.int16)
    soundfile.write(tmp_path / "a.wav", pcm, 16000, subtype="PCM_16")
    np.testing.assert_array_equal(load_audio(tmp_path / "a.wav"), pcm.astype(np.float32) / 32768)
    float_wave = np.random.default_rng(1).uniform(-1, 1, 999).astype(np.float32)
    np.testing.assert_array_equal(load_audio(float_wave), float_wave)
    np.testing.assert_array_equal(load_audio((pcm, 16000)), pcm.astype(np.float32) / 32768)


@pytest.mark.parametrize(
    ("fmt", "subtype"), [("FLAC", "PCM_16"), ("OGG", "VORBIS"), ("MP3", "MPEG_LAYER_III")]
)
def test_compressed_formats_resampled_and_downmixed(tmp_path, fmt, subtype):
    rate = 44100
    left, right = tone(2.0, rate, 440.0), tone(2.0, rate, 440.0)
    path = tmp_path / f"a.{fmt.lower()}"
    soundfile.write(path, np.stack([left, right], axis=1), rate, format=fmt, subtype=subtype)
    for source in (path, path.read_bytes()):
        wave = load_audio(source)
        assert wave.dtype == np.float32 and wave.ndim == 1
        # MP3 adds encoder delay; lossless formats keep the exact resampled length.
        assert abs(len(wave) - 32000) <= (2000 if fmt == "MP3" else 1)
        spectrum = np.abs(np.fft.rfft(wave[4000:20000]))
        assert abs(np.argmax(spectrum) * 16000 / 16000 - 440) <= 1


def test_resampler_preserves_frequency_and_length():
    wave = load_audio((tone(3.0, 48000, 1000.0), 48000))
    assert len(wave) == 48000
    spectrum = np.abs(np.fft.rfft(wave))
    assert abs(np.argmax(spectrum) * 16000 / len(wave) - 1000) < 1


def test_integer_pcm_and_channel_layouts():
    stereo = np.stack([np.full(800, 16384, np.int16), np.full(800, -16384, np.int16)], axis=1)
    np.testing.assert_allclose(load_audio((stereo, 16000)), 0.0)
    np.testing.assert_allclose(load_audio((stereo[:, :1].T.copy(), 16000)), 0.5)
    np.testing.assert_allclose(load_audio((np.full(100, 192, np.uint8), 16000)), 0.5)
    np.testing.assert_allclose(load_audio((np.full(100, 2**30, np.int32), 16000)), 0.5)


def test_bad_audio_raises_media_error(tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF not really a wave file" * 10)
    silent = io.BytesIO()
    soundfile.write(silent, np.zeros(0, np.float32), 16000, format="WAV")
    cases = {
        str(tmp_path / "missing.wav"): "missing.wav",
        str(tmp_path / "empty.wav"): "empty.wav",
        str(tmp_path / "corrupt.wav"): "corrupt.wav",
    }
    for source, name in cases.items():
        with pytest.raises(MediaError, match=name):
            load_audio(source)
    for bad in (
        silent.getvalue(),
        b"",
        np.zeros(0, np.float32),
        np.array([0.1, np.nan], np.float32),
        np.array([np.inf], np.float32),
        np.array(["a"]),
        (np.zeros(10), 0),
        object(),
    ):
        with pytest.raises(MediaError):
            load_audio(bad)


def test_multichannel_file_is_mixed_across_its_channels_not_its_frames(tmp_path):
    # Two frames of six channels: the shorter axis is the frames, which no file layout means.
    frames = np.random.default_rng(3).uniform(-0.5, 0.5, (2, 6)).astype(np.float32)
    soundfile.write(tmp_path / "six.wav", frames, 16000, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(tmp_path / "six.wav"), frames.mean(axis=1), rtol=1e-6)


def test_truncated_wav_is_read_with_a_warning(tmp_path, caplog):
    soundfile.write(tmp_path / "whole.wav", tone(1.0, 16000), 16000, subtype="PCM_16")
    data = (tmp_path / "whole.wav").read_bytes()
    (tmp_path / "half.wav").write_bytes(data[: len(data) // 2])
    with caplog.at_level("WARNING", logger="mlx_unified"):
        assert len(load_audio(tmp_path / "whole.wav")) == 16000
        assert not caplog.records
        wave = load_audio(tmp_path / "half.wav")
    assert 7900 < len(wave) < 8100
    (record,) = caplog.records
    assert "half.wav: truncated WAV file" in record.getMessage() and "declares 1.00 s" in record.getMessage()


def test_folder_fifo_and_unreadable_file_are_named_for_what_they_are(tmp_path):
    import os

    (tmp_path / "folder.wav").mkdir()
    os.mkfifo(tmp_path / "pipe.wav")  # opening it would block: it must be refused unopened
    with pytest.raises(MediaError, match=r"folder\.wav: is a folder, not a file"):
        load_audio(tmp_path / "folder.wav")
    with pytest.raises(MediaError, match=r"pipe\.wav: not a regular file"):
        load_audio(tmp_path / "pipe.wav")
    with pytest.raises(MediaError, match=r"missing\.wav: no such file"):
        load_audio(tmp_path / "missing.wav")
