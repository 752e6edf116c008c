"""Prompt assembly: chat messages with media -> the arrays the model takes, named as the reference names them.

The checkpoint's own chat template renders the messages (one `<|image|>`, `<|audio|>` or `<|video|>`
placeholder per media item); each placeholder is then expanded to its soft-token block, as the reference
`Gemma4UnifiedProcessor` does, and the text is tokenized.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from jinja2 import TemplateError

from ..config import TOKEN_TYPES
from ..errors import ParameterError
from ..generation_params import check_template_variables
from ..tool_calls import fold_tool_results
from .audio import audio_num_tokens, describe_source, frame_audio, load_audio
from .errors import MediaError, ProcessorConfigError
from .image import check_budget, image_num_tokens, image_size, preprocess_image
from .limits import (
    DEFAULT_BUDGET,
    DEFAULT_FPS,
    DEFAULT_FRAME_BUDGET,
    MAX_CLIP_SECONDS,
    MAX_CLIP_TOKENS,
    SAMPLING_RATE,
)
from .video import frame_num_tokens, load_video_patches, plan_video, video_prompt

MEDIA_TYPES = ("image", "audio", "video")
# The chat template's turn markers: `<|turn>role\n ... <turn|>`; generation stops at the end of a turn.
TURN_START, TURN_END = "<|turn>", "<turn|>"
# A model ends its output with it after a function call (the released generation_config.json stops there).
TOOL_RESPONSE = "<|tool_response>"


# Roles whose text comes from people (or tools), never from the model's own markers.
_TEXT_ROLES = ("system", "developer", "user", "tool")
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class _Literals:
    """Message texts that hold control-token strings, each replaced by a sentinel while the template
    renders, then tokenized apart with the control tokens read as plain text. The sentinels carry a key
    drawn anew for each prompt, so text in a message cannot spell one: it is only ever text."""

    key: str = field(default_factory=lambda: secrets.token_hex(16))
    texts: list[str] = field(default_factory=list)

    def stand_in(self, text: str) -> str:
        self.texts.append(text)
        return f"\ue000{self.key}:{len(self.texts) - 1}\ue001"

    def split(self, text: str) -> list[str]:
        """`text` cut at its sentinels: template text, then (index, template text) pairs."""
        return re.split(f"\ue000{self.key}:(\\d+)\ue001", text)


@dataclass
class _Expanded:
    text: str
    arrays: dict[str, np.ndarray]
    literals: _Literals  # what each sentinel in `text` stands for


class Processor:
    """Messages -> `input_ids`, `mm_token_type_ids` and media arrays for Gemma 4 unified."""

    def __init__(
        self,
        tokenizer: Any,
        *,
        image_budget: int = DEFAULT_BUDGET,
        video_budget: int = DEFAULT_FRAME_BUDGET,
        video_fps: float = DEFAULT_FPS,
        parse_control_tokens: bool = False,
    ) -> None:
        """`parse_control_tokens`: control tokens typed in message text (`<turn|>`, `<|image|>`, ...) act as
        markers, as in the reference processor; by default they are plain text, so a user cannot forge
        a turn or a media block."""
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
        self.control_tokens: tuple[str, ...] = () if parse_control_tokens else _control_tokens(tokenizer)

    @cached_property
    def max_token_chars(self) -> int:
        """The most characters one token spells (a byte token's spelling counts whole): a text of n
        characters takes at least n / max_token_chars tokens."""
        return max(len(piece) for piece in self.tokenizer.get_vocab())

    @classmethod
    def from_pretrained(cls, path: str | Path, **options: Any) -> Processor:
        """Read the checkpoint's tokenizer files, chat template and `processor_config.json` budgets.

        Raises ProcessorConfigError naming the file when one is missing, unreadable or not Gemma 4's."""
        folder = Path(path)
        tokenizer = _load_tokenizer(folder)
        settings = {**_processor_settings(folder / "processor_config.json"), **options}
        try:
            return cls(tokenizer, **settings)
        except MediaError as e:
            raise ProcessorConfigError(f"{folder / 'processor_config.json'}: {e}") from e

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
        return self._render(messages, add_generation_prompt, media_first, chat_template_kwargs)

    def _render(
        self,
        messages: list[dict],
        add_generation_prompt: bool,
        media_first: bool,
        chat_template_kwargs: dict[str, Any] | None,
        control_tokens: Sequence[str] = (),
        literals: _Literals | None = None,
    ) -> str:
        variables = check_template_variables(chat_template_kwargs)
        template_messages = _template_messages(fold_tool_results(messages), media_first, control_tokens, literals)
        try:
            text = self.tokenizer.apply_chat_template(
                template_messages, tokenize=False, add_generation_prompt=add_generation_prompt, **variables
            )
        except TemplateError as error:  # the template's own refusal (raise_exception) or a value it cannot read
            raise ParameterError("messages", f"the chat template cannot render them: {error}") from error
        except RecursionError:
            raise ParameterError("messages", "values nested too deeply for the chat template") from None
        if _SURROGATE.search(text) or (literals is not None and any(map(_SURROGATE.search, literals.texts))):
            raise ParameterError("messages", "a message holds a lone UTF-16 surrogate, which is not text")
        return text

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
        return self._arrays(self._encode(expanded), expanded.arrays)

    def encode_prompt(
        self,
        text: str,
        *,
        images: Sequence[Any] = (),
        audios: Sequence[Any] = (),
        videos: Sequence[Any] = (),
        image_tokens: int | None = None,
    ) -> dict[str, np.ndarray]:
        """The arrays of an already-templated prompt (the chat template's output, as
        `apply_chat_template` writes it, `<bos>` included): its placeholders are filled with the media
        of their kind in the order given, and its control tokens are markers."""
        media = {
            "image": media_list("images", images),
            "audio": media_list("audios", audios),
            "video": media_list("videos", videos),
        }
        kinds = {token: kind for kind, token in self.placeholders.items()}
        found = [kinds[token] for token in self._placeholder_pattern.findall(text)]
        counts = {kind: found.count(kind) for kind in MEDIA_TYPES}
        if any(counts[kind] != len(media[kind]) for kind in MEDIA_TYPES):
            given = {kind: len(items) for kind, items in media.items()}
            raise MediaError(f"<templated prompt>: its placeholders are for {counts} media items, but {given} were given")
        items = [(kind, media[kind].pop(0)) for kind in found]
        budget = self.image_budget if image_tokens is None else image_tokens
        check_budget(budget)
        if _SURROGATE.search(text):
            raise ParameterError("prompt", "holds a lone UTF-16 surrogate, which is not text")
        expanded = self._fill(text, items, budget, decode=True, literals=_Literals())
        return self._arrays(self.tokenizer(expanded.text, add_special_tokens=False)["input_ids"], expanded.arrays)

    def encode_ids(self, ids: Sequence[int]) -> dict[str, np.ndarray]:
        """The arrays of a prompt given as token ids (already templated); they carry no media, so a
        media placeholder among them is refused."""
        arrays = self._arrays(list(ids), {})
        placeholders = int((arrays["mm_token_type_ids"] != 0).sum())
        if placeholders:
            raise MediaError(
                f"<token ids>: {placeholders} media placeholder tokens but no media; give a templated prompt "
                "with the media instead"
            )
        return arrays

    def _arrays(self, ids: list[int], media_arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        input_ids = np.asarray(ids, dtype=np.int32)[None]
        token_types = np.zeros_like(input_ids)
        for kind, token_id in self.token_ids.items():
            token_types[input_ids == token_id] = TOKEN_TYPES[kind]
        return {"input_ids": input_ids, "mm_token_type_ids": token_types, **media_arrays}

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
        return len(self._encode(expanded))

    def _encode(self, expanded: _Expanded) -> list[int]:
        # The template writes `<bos>` itself.
        pieces = expanded.literals.split(expanded.text)
        ids = self.tokenizer(pieces[0], add_special_tokens=False)["input_ids"]
        for index, template_text in zip(pieces[1::2], pieces[2::2], strict=True):
            literal = expanded.literals.texts[int(index)]
            ids += self.tokenizer(literal, add_special_tokens=False, split_special_tokens=True)["input_ids"]
            ids += self.tokenizer(template_text, add_special_tokens=False)["input_ids"]
        return ids

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
        literals = _Literals()
        text = self._render(
            messages, add_generation_prompt, media_first, chat_template_kwargs, self.control_tokens, literals
        )
        items = _media_items(messages, media_first)
        placeholders = self._placeholder_pattern.findall(text)
        if [self.placeholders[kind] for kind, _ in items] != placeholders:
            raise MediaError(
                f"prompt has placeholders {placeholders} but the messages hold media {[k for k, _ in items]}; "
                "media tokens typed into message text are not supported"
            )
        return self._fill(text, items, image_budget, decode, literals)

    def _fill(
        self, text: str, items: list[tuple[str, Any]], image_budget: int, decode: bool, literals: _Literals
    ) -> _Expanded:
        """`text` with each placeholder expanded to the soft-token block of its item (in order)."""
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
        return _Expanded(text, _stack(collected) if decode else {}, literals)

    def _image(self, source: Any, budget: int, decode: bool) -> tuple[str, dict | None]:
        if decode:
            payload = preprocess_image(source, budget)
            count = payload["num_soft_tokens"]
        else:
            payload, count = None, image_num_tokens(*image_size(source), budget)
        return f"{self.boi}{self.placeholders['image'] * count}{self.eoi}", payload

    def _audio(self, source: Any) -> tuple[str, np.ndarray]:
        # The limit goes to the decoder: a longer file is refused from its header or as it decodes.
        wave = load_audio(source, max_seconds=MAX_CLIP_SECONDS)
        count = audio_num_tokens(len(wave))
        if count > MAX_CLIP_TOKENS:
            raise MediaError(
                f"{describe_source(source)}: audio is {len(wave) / SAMPLING_RATE:.1f} s, one clip holds at most {MAX_CLIP_SECONDS} s; "
                "use mlx_unified.processing.run_long_audio for longer recordings"
            )
        return f"{self.boa}{self.placeholders['audio'] * count}{self.eoa}", wave

    def _video(self, source: Any, decode: bool) -> tuple[str, dict | None]:
        if decode:
            plan, payload = load_video_patches(source, self.video_fps, self.video_budget)
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
    content: list[dict[str, Any]] = [{"type": "image", "image": x} for x in media_list("images", images)]
    content += [{"type": "video", "video": x} for x in media_list("videos", videos)]
    content += [{"type": "audio", "audio": x} for x in media_list("audios", audios)]
    content.append({"type": "text", "text": text})
    if task_reminder:
        content.append({"type": "text", "text": task_reminder})
    return {"role": "user", "content": content}


def media_list(name: str, items: Any) -> list[Any]:
    """`items` as a list of media items; one item on its own (a path, or one image or waveform array)
    is refused, since iterating it would read its characters or rows as items."""
    if isinstance(items, (str, bytes, os.PathLike, np.ndarray)) or not isinstance(items, Iterable):
        raise ParameterError(name, f"must be a list of files or arrays, got one {type(items).__name__}: pass [{name[:-1]}]")
    return list(items)


def system_turn(system: str) -> dict[str, Any]:
    return {"role": "system", "content": system}


def with_system(system: str | None, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`messages` after a system turn holding `system` (none when it is empty)."""
    return [system_turn(system), *messages] if system else messages


def build_messages(
    prompt: str,
    system: str | None = None,
    images: Sequence[Any] = (),
    audios: Sequence[Any] = (),
    videos: Sequence[Any] = (),
    task_reminder: str | None = None,
) -> list[dict[str, Any]]:
    """A one-turn conversation (see `user_turn` for the placement of media and reminder)."""
    return with_system(system, [user_turn(prompt, images, audios, videos, task_reminder)])


# Tokenizer attributes the processor reads: Gemma 4's media, turn and channel markers.
_REQUIRED_TOKENS = ("image_token", "audio_token", "video_token", "boi_token", "eoi_token", "boa_token", "eoa_token")
# Either file holds a vocabulary; without one, transformers builds a tokenizer of the special tokens alone.
_VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model")


def _load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    if not any((folder / name).is_file() for name in _VOCABULARY_FILES):
        raise ProcessorConfigError(f"{folder}: no tokenizer.json (or tokenizer.model): the vocabulary is missing")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # transformers and tokenizers raise many kinds for a damaged file
        raise ProcessorConfigError(
            f"{folder}: cannot read the tokenizer files (tokenizer.json, tokenizer_config.json): "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from e
    missing = [name for name in _REQUIRED_TOKENS if not isinstance(getattr(tokenizer, name, None), str)]
    if missing:
        raise ProcessorConfigError(
            f"{folder / 'tokenizer_config.json'}: not a Gemma 4 unified tokenizer (no {', '.join(missing)})"
        )
    if not getattr(tokenizer, "chat_template", None):
        raise ProcessorConfigError(f"{folder}: no chat template (chat_template.jinja)")
    return tokenizer


def _processor_settings(config_file: Path) -> dict[str, Any]:
    """Image and video budgets and the video frame rate from `processor_config.json`, when there is one."""
    if not config_file.is_file():
        return {}
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProcessorConfigError(f"{config_file}: unreadable ({e})") from e
    image = config.get("image_processor", {}) if isinstance(config, dict) else None
    video = config.get("video_processor", {}) if isinstance(config, dict) else None
    if not isinstance(image, dict) or not isinstance(video, dict):
        raise ProcessorConfigError(f"{config_file}: expected a JSON object with image_processor/video_processor objects")
    settings = {
        "image_budget": image.get("max_soft_tokens", config.get("image_seq_length", DEFAULT_BUDGET)),
        "video_budget": video.get("max_soft_tokens", DEFAULT_FRAME_BUDGET),
        "video_fps": video.get("fps") or DEFAULT_FPS,
    }
    fps = settings["video_fps"]
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps <= 60:
        raise ProcessorConfigError(f"{config_file}: video_processor.fps must be a number in (0, 60], got {fps!r}")
    return settings


def _control_tokens(tokenizer: Any) -> tuple[str, ...]:
    """The strings the tokenizer reads as special tokens (turn, channel, media, tool markers, ...)."""
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    specials = {token.content for token in decoder.values() if getattr(token, "special", False)}
    specials.update(getattr(tokenizer, "all_special_tokens", []) or [])
    return tuple(sorted(specials))


def _template_messages(
    messages: list[dict],
    media_first: bool,
    control_tokens: Sequence[str] = (),
    literals: _Literals | None = None,
) -> list[dict]:
    """Messages for the template: media payloads dropped (the template only needs each item's type);
    system/developer content as one string, the only form Gemma 4's template renders there.

    With `literals`, the text of a person's (or tool's) message that holds one of `control_tokens`
    is replaced by a sentinel and kept there, to be tokenized as plain text (trimmed, as the template
    trims text)."""

    def literal(text: Any, role: Any) -> Any:
        if literals is None or role not in _TEXT_ROLES or not isinstance(text, str):
            return text
        if not any(token in text for token in control_tokens):
            return text
        return literals.stand_in(text.strip())

    rendered = []
    for message in messages:
        role = message.get("role")
        content = _content_items(message, media_first)
        if role in ("system", "developer") and isinstance(content, list):
            if any(item.get("type") != "text" for item in content):
                raise MediaError(f"<{message['role']} message>: only text is supported in a system prompt")
            content = "\n".join(item.get("text", "") for item in content)
        if isinstance(content, list):
            content = [
                {"type": item["type"]}
                if item.get("type") in MEDIA_TYPES
                else {**item, "text": literal(item["text"], role)}
                if item.get("type") == "text" and "text" in item
                else item
                for item in content
            ]
        else:
            content = literal(content, role)
        rendered.append({**message, "content": content})
        if message.get("tool_responses"):  # tool results (see `fold_tool_results`): text from tools
            responses = [{**r, "response": literal(r.get("response"), "tool")} for r in message["tool_responses"]]
            rendered[-1]["tool_responses"] = responses
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
