"""What the command line and the app share: conversation history, media checks, clean streamed replies.

No model logic here: replies come from `mlx_unified.generation.stream_generate`, media from
`mlx_unified.processing`.
"""

from __future__ import annotations

import mimetypes
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .processing import (
    SAMPLING_RATE,
    AudioSegment,
    MediaError,
    load_audio,
    load_image,
    plan_video,
    segment_audio,
    user_turn,
    with_system,
)
from .processing.limits import MAX_CLIP_SECONDS
from .reply_parser import ReplyDelta, ReplyParser
from .tool_calls import ToolCall


@dataclass
class Media:
    """One turn's media, checked and decoded: image and audio arrays, video paths (decoded later).

    A recording longer than one clip is held as the clips it is cut into on speech pauses (`segments`
    says where each came from): the turn is answered clip by clip, and the conversation keeps the
    clips, so later turns can still be read (one clip holds at most 30 s)."""

    images: list[np.ndarray] = field(default_factory=list)
    audios: list[np.ndarray] = field(default_factory=list)
    videos: list[str] = field(default_factory=list)
    segments: list[AudioSegment] = field(default_factory=list)

    def __add__(self, other: Media) -> Media:
        return split_long_audio(
            Media(
                self.images + other.images,
                self.audios + other.audios,
                self.videos + other.videos,
                self.segments + other.segments,
            )
        )


def split_long_audio(media: Media) -> Media:
    """`media` with a recording longer than one clip cut on speech pauses (see `Media`); as it was when
    nothing is longer, or when it holds a recording's clips already. Raises MediaError when a long
    recording is not the turn's only media, or holds no speech."""
    long_audio = [wave for wave in media.audios if len(wave) > MAX_CLIP_SECONDS * SAMPLING_RATE]
    if not long_audio and not media.segments:
        return media
    alone = not (media.images or media.videos)
    if media.segments and not long_audio and alone and len(media.audios) == len(media.segments):
        return media
    if not (media.segments or len(media.audios) > 1) and alone:
        segments = segment_audio(long_audio[0])
        if not segments:
            raise MediaError("<audio>: no speech found in the recording")
        return Media(audios=[s.samples for s in segments], segments=segments)
    raise MediaError(
        f"<audio>: a recording longer than {MAX_CLIP_SECONDS} s is answered segment by segment "
        "and must be the only media of its turn"
    )


def load_media(
    images: Sequence[str | Path] = (), audios: Sequence[str | Path] = (), videos: Sequence[str | Path] = ()
) -> Media:
    """Decode images and audio and read video headers now, so bad files are refused before any model work.

    Raises MediaError naming the file.
    """
    media = Media(
        images=[load_image(str(path)) for path in images],
        audios=[load_audio(str(path)) for path in audios],
    )
    for path in videos:
        plan_video(str(path))
        media.videos.append(str(path))
    return split_long_audio(media)


def media_kind(path: str | Path) -> str:
    """'image', 'audio' or 'video' for an attached file, from its type (containers: from their tracks)."""
    mime, _ = mimetypes.guess_type(str(path))
    kind = (mime or "").split("/")[0]
    if kind in ("image", "audio"):
        return kind
    if kind == "video":
        # Recorders write audio-only WebM/MP4 too: a container without a picture track is audio.
        import av

        try:
            with av.open(str(path)) as container:
                return "video" if container.streams.video else "audio"
        except av.error.FFmpegError as error:
            raise MediaError(f"{path}: not a readable video ({error})") from error
    raise MediaError(f"{Path(path).name}: unsupported file type (expected an image, audio or video file)")


def load_attachments(paths: Sequence[str | Path]) -> Media:
    """Media of a turn from attached files of any of the three kinds."""
    kinds: dict[str, list[str | Path]] = {"image": [], "audio": [], "video": []}
    for path in paths:
        kinds[media_kind(path)].append(path)
    return load_media(kinds["image"], kinds["audio"], kinds["video"])


def user_message(text: str, media: Media, task_reminder: str | None = None) -> dict[str, Any]:
    """One user turn; media before the text (the order the model was trained on)."""
    return user_turn(text, media.images, media.audios, media.videos, task_reminder)


def assistant_message(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


@dataclass
class Thought:
    """A piece of the model's thought channel: shown dimmed (CLI) or in a collapsible block (app)."""

    text: str


def format_memory(gigabytes: float) -> str:
    """Peak memory as people read it: MB below a tenth of a GB (test checkpoints), GB above."""
    return f"{gigabytes:.2f} GB" if gigabytes >= 0.1 else f"{gigabytes * 1000:.1f} MB"


@dataclass
class ReplyStats:
    """Statistics of one reply, over all its generation passes (one per long-audio segment)."""

    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache instead of prefilled
    prompt_tps: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    ttft_s: float = 0.0
    peak_memory_gb: float = 0.0
    finish_reason: str | None = None
    decode_seconds: float = field(default=0.0, repr=False)
    decode_steps: int = field(default=0, repr=False)

    def add_pass(self, response: Any) -> None:
        """Fold in the final response of one `stream_generate` pass."""
        if self.prompt_tokens == 0:
            self.ttft_s, self.prompt_tps = response.ttft_s, response.prompt_tps
        self.prompt_tokens += response.prompt_tokens
        self.cached_tokens += response.cached_tokens
        self.generation_tokens += response.generation_tokens
        if response.generation_tps > 0:
            # stream_generate times the steps after the first token (that one is in the ttft).
            steps = response.generation_tokens - 1
            self.decode_steps += steps
            self.decode_seconds += steps / response.generation_tps
        self.generation_tps = self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else 0.0
        self.peak_memory_gb = max(self.peak_memory_gb, response.peak_memory_gb)
        self.finish_reason = response.finish_reason

    def summary(self) -> str:
        return (
            f"prompt {self.prompt_tokens} tokens ({self.cached_tokens} from the prefix cache), "
            f"{self.prompt_tps:.1f} tokens/s; "
            f"time to first token {self.ttft_s:.2f} s; "
            f"generation {self.generation_tokens} tokens, {self.generation_tps:.1f} tokens/s; "
            f"peak memory {format_memory(self.peak_memory_gb)}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "prompt_tps": self.prompt_tps,
            "generation_tokens": self.generation_tokens,
            "generation_tps": self.generation_tps,
            "ttft_s": self.ttft_s,
            "peak_memory_gb": self.peak_memory_gb,
            "finish_reason": self.finish_reason,
        }


@dataclass
class SegmentStart:
    """A long recording is answered segment by segment; this announces the next one."""

    index: int  # 1-based
    count: int
    start_s: float
    end_s: float

    def label(self) -> str:
        return f"audio segment {self.index}/{self.count} ({self.start_s:.1f}-{self.end_s:.1f} s)"


def stream_reply(
    model: Any,
    processor: Any,
    history: list[dict[str, Any]],
    text: str,
    media: Media,
    stats: ReplyStats,
    *,
    system: str | None = None,
    task_reminder: str | None = None,
    **generation: Any,
) -> Iterator[str | Thought | ToolCall | SegmentStart]:
    """The reply to a new user turn, piece by piece: answer text (str), the thought channel (`Thought`)
    and function calls (`ToolCall`), in the order written; `stats` is filled in as it goes.

    A recording longer than one clip (30 s) is cut on pauses (`split_long_audio`) and the turn is
    answered once per segment, in order; a `SegmentStart` precedes each of those answers. Keep the turn
    in the history with the same `media`: its clips, not the whole recording.
    """
    from .generation import stream_generate

    media = split_long_audio(media)
    if not media.segments:
        passes = [(media, None)]
    else:
        passes = [
            (Media(audios=[s.samples]), SegmentStart(i + 1, len(media.segments), s.start, s.end))
            for i, s in enumerate(media.segments)
        ]
    for part, segment in passes:
        if segment is not None:
            yield segment
        messages = with_system(system, [*history, user_message(text, part, task_reminder)])
        parser = ReplyParser(processor.tokenizer)
        response = None
        for response in stream_generate(model, processor, messages, **generation):
            yield from _reply_events(parser.feed(response.text))
        yield from _reply_events(parser.finish())
        stats.add_pass(response)


def _reply_events(delta: ReplyDelta) -> Iterator[str | Thought | ToolCall]:
    if delta.reasoning:
        yield Thought(delta.reasoning)
    if delta.content:
        yield delta.content
    yield from delta.tool_calls
