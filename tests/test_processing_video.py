"""Video: 1 fps sampling, frame budget 70, timestamps and token layout as the reference processor lays them."""

import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from transformers.video_utils import VideoMetadata

from mlx_unified.processing import MediaError, load_audio, load_video, plan_video, preprocess_video
from mlx_unified.processing.video import video_prompt


def write_video(path, seconds: float, fps: int = 10, size=(72, 96), with_audio: bool = True) -> None:
    """Frame i is filled with gray level 2*i; the audio track is a 440 Hz tone at 16 kHz."""
    with av.open(str(path), "w") as container:
        video = container.add_stream("mpeg4", rate=fps)
        video.height, video.width = size
        video.pix_fmt = "yuv420p"
        audio = container.add_stream("aac", rate=16000) if with_audio else None
        for i in range(int(seconds * fps)):
            frame = av.VideoFrame.from_ndarray(np.full((*size, 3), 2 * i % 256, np.uint8), format="rgb24")
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        if audio is not None:
            t = np.arange(int(seconds * 16000)) / 16000
            tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
            for start in range(0, len(tone), 1024):
                chunk = av.AudioFrame.from_ndarray(
                    tone[None, start : start + 1024], format="fltp", layout="mono"
                )
                chunk.sample_rate = 16000
                container.mux(audio.encode(chunk))
            container.mux(audio.encode(None))


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    write_video(path, seconds=4.5)
    return path


def test_frames_sampled_at_one_per_second(clip):
    plan, frames = load_video(clip)
    # As the reference's default_sample_indices_fn: n = int(45 frames / 10 fps * 1), indices i * 45 // n.
    np.testing.assert_array_equal(plan.frame_indices, [0, 11, 22, 33])
    assert plan.timestamps == [0.0, 1.1, 2.2, 3.3]
    assert frames.shape == (4, 72, 96, 3)
    np.testing.assert_allclose(frames[:, 36, 48, 0], [0, 22, 44, 66], atol=4)
    np.testing.assert_array_equal(plan_video(clip).frame_indices, plan.frame_indices)


def test_frame_patches_use_the_image_rule(clip):
    _, frames = load_video(clip)
    out = preprocess_video(frames)
    assert out["pixel_values_videos"].shape == (4, 70, 6912)
    assert out["video_position_ids"].shape == (4, 70, 2)
    assert out["num_soft_tokens"] == 63  # 72x96 -> 336x432 at budget 70: 7 x 9 patches


def test_layout_matches_reference_replacement(clip):
    from transformers.models.gemma4_unified.processing_gemma4_unified import Gemma4UnifiedProcessor

    plan, _ = load_video(clip)
    metadata = VideoMetadata(total_num_frames=45, fps=plan.video_fps, frames_indices=list(plan.frame_indices))
    fake_self = type(
        "P", (), {"boi_token": "<|image>", "eoi_token": "<image|>", "video_token": "<|video|>"}
    )()
    reference = Gemma4UnifiedProcessor.replace_video_token(
        fake_self, {"num_soft_tokens_per_video": [63], "video_metadata": [metadata]}, 0
    )
    assert video_prompt(plan.timestamps, 63, "<|image>", "<|video|>", "<image|>") == reference
    assert reference.startswith("00:00 <|image><|video|>") and " 00:03 <|image>" in reference


def test_audio_track_is_audio_input(clip):
    wave = load_audio(clip)
    assert abs(len(wave) / 16000 - 4.5) < 0.2  # AAC adds priming and padding samples
    spectrum = np.abs(np.fft.rfft(wave[4000:12000]))
    assert abs(np.argmax(spectrum) * 2 - 440) <= 2


def test_bad_videos_raise_media_error(tmp_path):
    write_video(tmp_path / "long.mp4", seconds=61, fps=1, size=(16, 16), with_audio=False)
    write_video(tmp_path / "silent.mp4", seconds=1, fps=5, size=(16, 16), with_audio=False)
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x13" * 200)
    with pytest.raises(MediaError, match=r"long\.mp4.*limit is 60 s"):
        load_video(tmp_path / "long.mp4")
    with pytest.raises(MediaError, match=r"long\.mp4"):
        plan_video(tmp_path / "long.mp4")
    for name in ("missing.mp4", "empty.mp4", "corrupt.mp4"):
        with pytest.raises(MediaError, match=name):
            load_video(tmp_path / name)
    with pytest.raises(MediaError, match=r"silent\.mp4: no audio track"):
        load_audio(tmp_path / "silent.mp4")
    with pytest.raises(MediaError, match="budget"):
        preprocess_video(np.zeros((1, 8, 8, 3), np.uint8), 100)


def write_stream(path, container_format: str, codec: str, frames: int = 5, options=None) -> None:
    """A video whose header gives no length: raw H.264, or WebM written as a live stream."""
    with av.open(str(path), "w", format=container_format, options=options or {}) as container:
        video = container.add_stream(codec, rate=5)
        video.height, video.width = 32, 48
        video.pix_fmt = "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((32, 48, 3), 40 * i, np.uint8), format="rgb24")
            container.mux(video.encode(frame))
        container.mux(video.encode(None))


@pytest.mark.parametrize(
    "name, container_format, codec, options",
    [("raw.h264", "h264", "libx264", None), ("live.webm", "webm", "libvpx", {"live": "1"})],
)
def test_video_without_length_in_its_header_has_its_frames_counted(tmp_path, name, container_format, codec, options):
    path = tmp_path / name
    write_stream(path, container_format, codec, options=options)
    with av.open(str(path)) as container:  # the case: neither a duration nor a frame count
        stream = container.streams.video[0]
        assert stream.duration is None and container.duration is None and not stream.frames
    plan = plan_video(path)
    assert len(plan.frame_indices) == max(1, int(5 / plan.video_fps))
    _, frames = load_video(path)
    assert frames.shape[1:] == (32, 48, 3)


# VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's (pytest's) resident size.
PEAK_GROWTH = """
import re, sys
import av, PIL.Image
from mlx_unified.processing.video import load_video_patches
peak = lambda: int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
before = peak()
plan, out = load_video_patches(sys.argv[1], 1.0, 70)
assert out["pixel_values_videos"].shape[0] == len(plan.frame_indices)
print(peak() - before)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak resident size from /proc")
def test_video_memory_does_not_grow_with_its_frame_count(tmp_path):
    # A full-size frame is only ever held while it is resized: 8 large frames peak like 4, but for the
    # patches they give (holding the frames would add 4 x 50 MB, twice over: the list and its stack).
    side = 4096
    frame_bytes = side * side * 3
    patch_bytes = 70 * 6912 * 4  # one frame's pixel_values_videos at budget 70
    peaks = {}
    for count in (4, 8):
        path = tmp_path / f"{count}.mp4"
        write_video(path, seconds=count, fps=1, size=(side, side), with_audio=False)
        out = subprocess.run([sys.executable, "-c", PEAK_GROWTH, str(path)], capture_output=True, text=True, check=True)
        peaks[count] = int(out.stdout)
    assert peaks[8] - peaks[4] < frame_bytes + 4 * 2 * patch_bytes, peaks
