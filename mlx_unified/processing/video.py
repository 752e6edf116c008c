"""Video (optional extra `video`, PyAV): frames sampled at 1 fps, each one a small image; audio track usable.

Layout as in the reference processor: frame i becomes `mm:ss <|image>` + N x `<|video|>` + `<image|>`, the
frames joined by spaces; frames are sampled the way the reference's `default_sample_indices_fn` samples
them (`n = max(1, int(duration * fps))` evenly spaced indices, timestamps `index / video_fps`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .audio import describe_source, load_audio
from .errors import MediaError, readable_source
from .image import MODEL_PATCH, check_budget, patchify, target_size
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
    """Frame size and the sampled frame indices, read from the container header (no decoding)."""
    name = describe_source(source)
    with _open(source, name) as container:
        return _plan(container, name, fps, max_seconds)


def load_video(
    source: VideoSource, fps: float = DEFAULT_FPS, max_seconds: float = MAX_VIDEO_SECONDS
) -> tuple[VideoPlan, np.ndarray]:
    """Decode the sampled frames: the plan and `[F, H, W, 3]` uint8 RGB frames."""
    name = describe_source(source)
    import av

    with _open(source, name) as container:
        plan = _plan(container, name, fps, max_seconds)
        wanted = {int(index): slot for slot, index in enumerate(plan.frame_indices)}
        frames: list[np.ndarray | None] = [None] * len(wanted)
        last = None
        try:
            for index, frame in enumerate(container.decode(video=0)):
                last = frame
                if index in wanted:
                    frames[wanted[index]] = frame.to_ndarray(format="rgb24")
                if index >= max(wanted):
                    break
        except av.error.FFmpegError as error:
            raise MediaError(f"{name}: cannot decode video ({error})") from error
    if last is None:
        raise MediaError(f"{name}: video has no decodable frames")
    # Headers can overstate the frame count by a frame or two: repeat the last decoded frame.
    tail = last.to_ndarray(format="rgb24")
    return plan, np.stack([tail if frame is None else frame for frame in frames])


def preprocess_video(frames: np.ndarray, max_soft_tokens: int = DEFAULT_FRAME_BUDGET) -> dict:
    """`pixel_values_videos [F, budget, 6912]`, `video_position_ids [F, budget, 2]`, `num_soft_tokens`."""
    check_budget(max_soft_tokens)
    per_frame = [patchify(frame, max_soft_tokens) for frame in frames]
    return {
        "pixel_values_videos": np.stack([p["pixel_values"] for p in per_frame]),
        "video_position_ids": np.stack([p["image_position_ids"] for p in per_frame]),
        "num_soft_tokens": per_frame[0]["num_soft_tokens"],
    }


def load_video_audio(source: VideoSource, sampling_rate: int = SAMPLING_RATE) -> np.ndarray:
    """The video's audio track as model audio input (16 kHz mono float32)."""
    return load_audio(source, sampling_rate)


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
        raise MediaError(f"{name}: video has no frames")
    if duration > max_seconds + 0.5 / video_fps:
        raise MediaError(f"{name}: video is {duration:.1f} s long, the limit is {max_seconds:g} s")
    height, width = stream.codec_context.height, stream.codec_context.width
    if height <= 0 or width <= 0:
        raise MediaError(f"{name}: video frame size unknown")
    num_frames = max(1, int(total_frames / video_fps * fps))
    indices = np.arange(num_frames, dtype=np.int64) * total_frames // num_frames
    return VideoPlan(height=height, width=width, video_fps=video_fps, frame_indices=indices)
