"""Video (optional extra `video`, PyAV): frames sampled at 1 fps, each one a small image; audio track usable.

Layout as in the reference processor: frame i becomes `mm:ss <|image>` + N x `<|video|>` + `<image|>`, the
frames joined by spaces; frames are sampled the way the reference's `default_sample_indices_fn` samples
them (`n = max(1, int(duration * fps))` evenly spaced indices, timestamps `index / video_fps`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .audio import describe_source, load_audio
from .errors import MediaError, readable_source
from .image import MAX_IMAGE_PIXELS, MODEL_PATCH, check_budget, patchify, target_size
from .limits import DEFAULT_FPS, DEFAULT_FRAME_BUDGET, MAX_VIDEO_SECONDS, SAMPLING_RATE

VideoSource = str | Path | bytes


@dataclass(frozen=True)
class VideoPlan:
    """What sampling a video will give, known from its header alone."""

    height: int
    width: int
    video_fps: float
    frame_indices: np.ndarray

    @property
    def timestamps(self) -> list[float]:
        return [float(index) / self.video_fps for index in self.frame_indices]


def frame_num_tokens(height: int, width: int, max_soft_tokens: int = DEFAULT_FRAME_BUDGET) -> int:
    check_budget(max_soft_tokens)
    target_height, target_width = target_size(height, width, max_soft_tokens)
    return (target_height // MODEL_PATCH) * (target_width // MODEL_PATCH)


def format_timestamp(seconds: float) -> str:
    return f"{int(seconds // 60):02d}:{int(seconds % 60):02d}"


def video_prompt(timestamps: list[float], num_soft_tokens: int, boi: str, video_token: str, eoi: str) -> str:
    """The text that replaces one video placeholder."""
    return " ".join(f"{format_timestamp(t)} {boi}{video_token * num_soft_tokens}{eoi}" for t in timestamps)


def plan_video(
    source: VideoSource, fps: float = DEFAULT_FPS, max_seconds: float = MAX_VIDEO_SECONDS
) -> VideoPlan:
    """Frame size and the sampled frame indices, from the container header (no decoding); a stream
    whose header gives no length (raw H.264, live WebM) has its packets counted."""
    name = describe_source(source)
    with _open(source, name) as container:
        return _plan(container, name, fps, max_seconds)


def sampled_frames(source: VideoSource, plan: VideoPlan) -> Iterator[np.ndarray]:
    """The planned frames as `[H, W, 3]` uint8 RGB, decoded one at a time: only the frame being handed
    out is held at full resolution."""
    name = describe_source(source)
    import av

    wanted = [int(index) for index in plan.frame_indices]
    given = 0
    with _open(source, name) as container:
        last = None
        try:
            for index, frame in enumerate(container.decode(video=0)):
                last = frame
                while given < len(wanted) and wanted[given] == index:
                    yield frame.to_ndarray(format="rgb24")
                    given += 1
                if given == len(wanted):
                    return
        except (av.error.FFmpegError, ValueError, TypeError, AttributeError, OSError, EOFError) as error:
            # PyAV reports a damaged stream through FFmpeg's errors and, for a pixel format or a field
            # it cannot map, plain Python ones: all of them mean this video cannot be decoded.
            raise MediaError(f"{name}: cannot decode video ({error})") from error
        if last is None:
            raise MediaError(f"{name}: video has no decodable frames")
        # Headers can overstate the frame count by a frame or two: repeat the last decoded frame.
        tail = last.to_ndarray(format="rgb24")
        for _ in range(given, len(wanted)):
            yield tail


def load_video(
    source: VideoSource, fps: float = DEFAULT_FPS, max_seconds: float = MAX_VIDEO_SECONDS
) -> tuple[VideoPlan, np.ndarray]:
    """The plan and the sampled frames, `[F, H, W, 3]` uint8 RGB at full resolution (for model input,
    `load_video_patches` keeps one full-size frame at a time)."""
    plan = plan_video(source, fps, max_seconds)
    return plan, np.stack(list(sampled_frames(source, plan)))


def load_video_patches(
    source: VideoSource,
    fps: float = DEFAULT_FPS,
    max_soft_tokens: int = DEFAULT_FRAME_BUDGET,
    max_seconds: float = MAX_VIDEO_SECONDS,
) -> tuple[VideoPlan, dict]:
    """The plan and `preprocess_video`'s arrays, each frame resized and cut into patches as soon as it
    is decoded, so memory holds one full-resolution frame, whatever the video's size."""
    check_budget(max_soft_tokens)
    plan = plan_video(source, fps, max_seconds)
    return plan, _stack_patches([patchify(frame, max_soft_tokens) for frame in sampled_frames(source, plan)])


def preprocess_video(frames: np.ndarray, max_soft_tokens: int = DEFAULT_FRAME_BUDGET) -> dict:
    """`pixel_values_videos [F, budget, 6912]`, `video_position_ids [F, budget, 2]`, `num_soft_tokens`."""
    check_budget(max_soft_tokens)
    return _stack_patches([patchify(frame, max_soft_tokens) for frame in frames])


def _stack_patches(per_frame: list[dict]) -> dict:
    return {
        "pixel_values_videos": np.stack([p["pixel_values"] for p in per_frame]),
        "video_position_ids": np.stack([p["image_position_ids"] for p in per_frame]),
        "num_soft_tokens": per_frame[0]["num_soft_tokens"],
    }


def load_video_audio(
    source: VideoSource, sampling_rate: int = SAMPLING_RATE, max_seconds: float = MAX_VIDEO_SECONDS
) -> np.ndarray:
    """The video's audio track as model audio input (16 kHz mono float32), refused past `max_seconds`
    (the video limit: a track longer than its video is no reason to decode more)."""
    return load_audio(source, sampling_rate, max_seconds=max_seconds)


def _open(source: VideoSource, name: str):
    try:
        import av
    except ImportError as error:
        raise MediaError(f"{name}: video needs PyAV: pip install 'mlx-unified[video]'") from error
    data = readable_source(source, name, "video")
    try:
        return av.open(data)
    except av.error.FFmpegError as error:
        raise MediaError(f"{name}: not a readable video ({error})") from error


def _plan(container, name: str, fps: float, max_seconds: float) -> VideoPlan:
    if not container.streams.video:
        raise MediaError(f"{name}: no video track")
    stream = container.streams.video[0]
    if not stream.average_rate:
        raise MediaError(f"{name}: video frame rate unknown")
    video_fps = float(stream.average_rate)
    if stream.duration is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / 1_000_000
    else:
        duration = stream.frames / video_fps
    total_frames = stream.frames or round(duration * video_fps)
    if total_frames <= 0:
        # No length in the header (raw H.264, live WebM): count the frames' packets, decoding nothing.
        total_frames = _count_frames(container, stream, name)
        duration = total_frames / video_fps
    if total_frames <= 0:
        raise MediaError(f"{name}: video has no frames")
    if duration > max_seconds + 0.5 / video_fps:
        raise MediaError(f"{name}: video is {duration:.1f} s long, the limit is {max_seconds:g} s")
    height, width = stream.codec_context.height, stream.codec_context.width
    if height <= 0 or width <= 0:
        raise MediaError(f"{name}: video frame size unknown")
    if height * width > MAX_IMAGE_PIXELS:
        raise MediaError(f"{name}: frames of {width}x{height} pixels exceed the limit of {MAX_IMAGE_PIXELS:,} pixels")
    num_frames = max(1, int(total_frames / video_fps * fps))
    indices = np.arange(num_frames, dtype=np.int64) * total_frames // num_frames
    return VideoPlan(height=height, width=width, video_fps=video_fps, frame_indices=indices)


def _count_frames(container, stream, name: str) -> int:
    import av

    try:
        return sum(1 for packet in container.demux(stream) if packet.size)
    except av.error.FFmpegError as error:
        raise MediaError(f"{name}: cannot read video packets ({error})") from error
