"""Prompt assembly: chat messages with media -> the arrays the model takes, named as the reference names them.

The checkpoint's own chat template renders the messages (one `<|image|>`, `<|audio|>` or `<|video|>`
placeholder per media item); each placeholder is then expanded to its soft-token block, as the reference
`Gemma4UnifiedProcessor` does, and the text is tokenized.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..tool_calls import fold_tool_results
from .audio import audio_num_tokens, describe_source, frame_audio, load_audio
from .errors import MediaError
from .image import check_budget, image_num_tokens, image_size, preprocess_image
from .limits import (
    DEFAULT_BUDGET,
    DEFAULT_FPS,
    DEFAULT_FRAME_BUDGET,
    MAX_CLIP_SECONDS,
    MAX_CLIP_TOKENS,
    SAMPLING_RATE,
)
from .video import frame_num_tokens, load_video, plan_video, video_prompt
from .video import preprocess_video as preprocess_video_frames

MEDIA_TYPES = ("image", "audio", "video")
# `mm_token_type_ids` values, as the reference processor assigns them.
TOKEN_TYPE = {"text": 0, "image": 1, "video": 2, "audio": 3}


@dataclass
class _Expanded:
    text: str
    arrays: dict[str, np.ndarray]


class Processor:
    """Messages -> `input_ids`, `mm_token_type_ids` and media arrays for Gemma 4 unified."""

    def __init__(
        self,
        tokenizer: Any,
        *,
        image_budget: int = DEFAULT_BUDGET,
        video_budget: int = DEFAULT_FRAME_BUDGET,
        video_fps: float = DEFAULT_FPS,
    ) -> None:
        check_budget(image_budget)
        check_budget(video_budget)
        self.tokenizer = tokenizer
        self.image_budget = image_budget
        self.video_budget = video_budget
        self.video_fps = video_fps
        self.placeholders = {kind: getattr(tokenizer, f"{kind}_token") for kind in MEDIA_TYPES}
        self.boi, self.eoi = tokenizer.boi_token, tokenizer.eoi_token
        self.boa, self.eoa = tokenizer.boa_token, tokenizer.eoa_token
        self.token_ids = {
            kind: tokenizer.convert_tokens_to_ids(token) for kind, token in self.placeholders.items()
        }
        self._placeholder_pattern = re.compile("|".join(re.escape(t) for t in self.placeholders.values()))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Processor:
        """Read the checkpoint's tokenizer files, chat template and `processor_config.json` budgets."""
        from transformers import AutoTokenizer

        folder = Path(path)
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        settings: dict[str, Any] = {}
        config_file = folder / "processor_config.json"
        if config_file.is_file():
            config = json.loads(config_file.read_text())
            image = config.get("image_processor", {})
            video = config.get("video_processor", {})
            settings["image_budget"] = image.get(
                "max_soft_tokens", config.get("image_seq_length", DEFAULT_BUDGET)
            )
            settings["video_budget"] = video.get("max_soft_tokens", DEFAULT_FRAME_BUDGET)
            settings["video_fps"] = video.get("fps") or DEFAULT_FPS
        return cls(tokenizer, **settings)

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        media_first: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> str:
        """The prompt text with one placeholder per media item (media before the text of its turn).

        `chat_template_kwargs` go to the checkpoint's template (Gemma 4's reads `enable_thinking` and
        `tools`); `role: "tool"` results are moved where the template renders them (`fold_tool_results`).
        """
        return self.tokenizer.apply_chat_template(
            _template_messages(fold_tool_results(messages), media_first),
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **(chat_template_kwargs or {}),
        )

    def __call__(
        self,
        messages: list[dict],
        *,
        image_tokens: int | None = None,
        add_generation_prompt: bool = True,
        media_first: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> dict[str, np.ndarray]:
        expanded = self._expand(
            messages, image_tokens, add_generation_prompt, media_first, chat_template_kwargs, decode=True
        )
        input_ids = np.asarray(self._encode(expanded.text), dtype=np.int32)[None]
        token_types = np.zeros_like(input_ids)
        for kind, token_id in self.token_ids.items():
            token_types[input_ids == token_id] = TOKEN_TYPE[kind]
        return {"input_ids": input_ids, "mm_token_type_ids": token_types, **expanded.arrays}

    def count_tokens(
        self,
        messages: list[dict],
        *,
        image_tokens: int | None = None,
        add_generation_prompt: bool = True,
        media_first: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> int:
        """Prompt length in tokens, from image and video headers (no pixel decoding)."""
        expanded = self._expand(
            messages, image_tokens, add_generation_prompt, media_first, chat_template_kwargs, decode=False
        )
        return len(self._encode(expanded.text))

    def _encode(self, text: str) -> list[int]:
        # The template writes `<bos>` itself.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _expand(
        self,
        messages: list[dict],
        image_tokens: int | None,
        add_generation_prompt: bool,
        media_first: bool,
        chat_template_kwargs: dict[str, Any] | None,
        decode: bool,
    ) -> _Expanded:
        image_budget = self.image_budget if image_tokens is None else image_tokens
        check_budget(image_budget)
        text = self.apply_chat_template(messages, add_generation_prompt, media_first, chat_template_kwargs)
        items = _media_items(messages, media_first)
        placeholders = self._placeholder_pattern.findall(text)
        if [self.placeholders[kind] for kind, _ in items] != placeholders:
            raise MediaError(
                f"prompt has placeholders {placeholders} but the messages hold media {[k for k, _ in items]}; "
                "media tokens typed into message text are not supported"
            )
        collected: dict[str, list] = {"image": [], "audio": [], "video": []}
        replacements = []
        for kind, source in items:
            if kind == "image":
                replacement, payload = self._image(source, image_budget, decode)
            elif kind == "audio":
                replacement, payload = self._audio(source)
            else:
                replacement, payload = self._video(source, decode)
            replacements.append(replacement)
            collected[kind].append(payload)
        pieces = iter(replacements)
        text = self._placeholder_pattern.sub(lambda _: next(pieces), text)
        return _Expanded(text, _stack(collected) if decode else {})

    def _image(self, source: Any, budget: int, decode: bool) -> tuple[str, dict | None]:
        if decode:
            payload = preprocess_image(source, budget)
            count = payload["num_soft_tokens"]
        else:
            payload, count = None, image_num_tokens(*image_size(source), budget)
        return f"{self.boi}{self.placeholders['image'] * count}{self.eoi}", payload

    def _audio(self, source: Any) -> tuple[str, np.ndarray]:
        wave = load_audio(source)
        count = audio_num_tokens(len(wave))
        if count > MAX_CLIP_TOKENS:
            raise MediaError(
                f"{describe_source(source)}: audio is {len(wave) / SAMPLING_RATE:.1f} s, one clip holds at most {MAX_CLIP_SECONDS} s; "
                "use mlx_unified.processing.run_long_audio for longer recordings"
            )
        return f"{self.boa}{self.placeholders['audio'] * count}{self.eoa}", wave

    def _video(self, source: Any, decode: bool) -> tuple[str, dict | None]:
        if decode:
            plan, frames = load_video(source, fps=self.video_fps)
            payload = preprocess_video_frames(frames, self.video_budget)
            count = payload["num_soft_tokens"]
        else:
            plan = plan_video(source, fps=self.video_fps)
            payload, count = None, frame_num_tokens(plan.height, plan.width, self.video_budget)
        text = video_prompt(plan.timestamps, count, self.boi, self.placeholders["video"], self.eoi)
        return text, payload


def _content_items(message: dict, media_first: bool) -> list[dict] | str:
    content = message.get("content")
    if not isinstance(content, list):
        return content
    if not media_first:
        return content
    media = [item for item in content if item.get("type") in MEDIA_TYPES]
    rest = [item for item in content if item.get("type") not in MEDIA_TYPES]
    return media + rest


def user_turn(
    text: str,
    images: Sequence[Any] = (),
    audios: Sequence[Any] = (),
    videos: Sequence[Any] = (),
    task_reminder: str | None = None,
) -> dict[str, Any]:
    """One user turn; media before the text (the order the model was trained on).

    `task_reminder`: a short restatement of the task after the text, at the very end of the turn,
    closest to the answer (helps when a long text separates the media from the question).
    """
    content: list[dict[str, Any]] = [{"type": "image", "image": x} for x in images]
    content += [{"type": "video", "video": x} for x in videos]
    content += [{"type": "audio", "audio": x} for x in audios]
    content.append({"type": "text", "text": text})
    if task_reminder:
        content.append({"type": "text", "text": task_reminder})
    return {"role": "user", "content": content}


def system_turn(system: str) -> dict[str, Any]:
    return {"role": "system", "content": system}


def _template_messages(messages: list[dict], media_first: bool) -> list[dict]:
    """Messages for the template: media payloads dropped (the template only needs each item's type);
    system/developer content as one string, the only form Gemma 4's template renders there."""
    rendered = []
    for message in messages:
        content = _content_items(message, media_first)
        if message.get("role") in ("system", "developer") and isinstance(content, list):
            if any(item.get("type") != "text" for item in content):
                raise MediaError(f"<{message['role']} message>: only text is supported in a system prompt")
            content = "\n".join(item.get("text", "") for item in content)
        if isinstance(content, list):
            content = [
                {"type": item["type"]} if item.get("type") in MEDIA_TYPES else item for item in content
            ]
        rendered.append({**message, "content": content})
    return rendered


def _media_items(messages: list[dict], media_first: bool) -> list[tuple[str, Any]]:
    items = []
    for message in messages:
        content = _content_items(message, media_first)
        if not isinstance(content, list):
            continue
        for item in content:
            kind = item.get("type")
            if kind in MEDIA_TYPES:
                if item.get(kind) is None:
                    raise MediaError(f"<{kind} item>: content item has no '{kind}' field")
                items.append((kind, item[kind]))
    return items


def _stack(collected: dict[str, list]) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    if collected["image"]:
        arrays["pixel_values"] = np.stack([p["pixel_values"] for p in collected["image"]])
        arrays["image_position_ids"] = np.stack([p["image_position_ids"] for p in collected["image"]])
    if collected["video"]:
        arrays["pixel_values_videos"] = np.concatenate([p["pixel_values_videos"] for p in collected["video"]])
        arrays["video_position_ids"] = np.concatenate([p["video_position_ids"] for p in collected["video"]])
        arrays["num_frames_per_video"] = np.array([len(p["pixel_values_videos"]) for p in collected["video"]])
    if collected["audio"]:
        # Padded to the longest clip, padding frames masked out (the reference extractor's `padding="longest"`).
        framed = [frame_audio(wave) for wave in collected["audio"]]
        longest = max(len(features) for features, _ in framed)
        features = np.zeros((len(framed), longest, framed[0][0].shape[1]), dtype=np.float32)
        mask = np.zeros((len(framed), longest), dtype=bool)
        for row, (clip_features, clip_mask) in enumerate(framed):
            features[row, : len(clip_features)] = clip_features
            mask[row, : len(clip_mask)] = clip_mask
        arrays["input_features"], arrays["input_features_mask"] = features, mask
    return arrays
