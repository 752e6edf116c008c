"""OpenAI message content -> our chat messages, with every media item decoded and checked.

Content parts: `text`, `image_url`, `input_audio` (base64 with its `format`), `audio_url` and
`video_url` (vLLM's spellings). A URL is a `data:` URL (base64) or a local file; remote URLs are
never fetched. Local files are read only under the `--media-root` folders the server was started
with (none by default), after resolving links, so a request can name nothing else on the machine.
Decoding runs here, before the request is queued, so a corrupt file is a 400 at once.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..processing import MediaError, load_audio, load_image, plan_video
from ..processing.limits import MAX_CLIP_SECONDS, SAMPLING_RATE
from .errors import APIError, bad_request

ROLES = ("system", "developer", "user", "assistant", "tool")
MEDIA_PART_TYPES = ("image_url", "input_audio", "audio_url", "video_url")
# Linux's limits on a path and on one of its names: longer ones fail in the system calls themselves.
MAX_PATH_CHARS, MAX_NAME_CHARS = 4096, 255


@dataclass(frozen=True)
class MediaPolicy:
    roots: tuple[Path, ...] = ()  # resolved folders whose files requests may name

    @classmethod
    def from_folders(cls, folders: list[str | Path]) -> MediaPolicy:
        return cls(tuple(Path(folder).expanduser().resolve() for folder in folders))

    def local_file(self, name: str, where: str) -> str:
        if not self.roots:
            raise APIError(
                403,
                f"{where}: this server reads no local files (start it with --media-root DIR to allow "
                "files under DIR); send the file as a base64 data URL",
                type="permission_error",
                param=where,
                code="local_files_disabled",
            )
        if "\0" in name:
            raise bad_request(f"{where}: a file name cannot hold a NUL character", where, "invalid_media")
        if len(name) > MAX_PATH_CHARS or any(len(part) > MAX_NAME_CHARS for part in name.split("/")):
            raise bad_request(
                f"{where}: a path of at most {MAX_PATH_CHARS} characters, each name at most {MAX_NAME_CHARS}, "
                "is taken",
                where,
                "invalid_media",
            )
        path = Path(name).expanduser()
        if not path.is_absolute():
            raise bad_request(f"{where}: a local file must be an absolute path, got {name!r}", where)
        try:
            resolved = path.resolve()
        except (OSError, RuntimeError) as error:  # a link loop: RuntimeError before Python 3.13, then OSError
            raise bad_request(f"{where}: {name!r}: cannot be resolved (a link loop?)", where, "invalid_media") from error
        if not any(resolved.is_relative_to(root) for root in self.roots):
            raise APIError(
                403,
                f"{where}: {name} is outside the folders this server may read (--media-root)",
                type="permission_error",
                param=where,
                code="outside_media_root",
            )
        try:
            found = resolved.is_file()
        except OSError as error:  # a name the file system refuses
            raise bad_request(f"{where}: {name!r}: cannot be read ({error.strerror})", where, "invalid_media") from error
        if not found:
            raise bad_request(f"{where}: {name}: no such file", where, "invalid_media")
        return str(resolved)


def convert_messages(raw: Any, policy: MediaPolicy) -> list[dict[str, Any]]:
    """Our messages (see `processing.Processor`) from OpenAI's, media decoded; APIError naming the part."""
    if not isinstance(raw, list) or not raw:
        raise bad_request("messages: must be a non-empty list of messages", "messages")
    return [_message(message, f"messages[{index}]", policy) for index, message in enumerate(raw)]


def _message(message: Any, where: str, policy: MediaPolicy) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise bad_request(f"{where}: must be an object with a role and content", where)
    role = message.get("role")
    if role not in ROLES:
        raise bad_request(f"{where}.role: must be one of {', '.join(ROLES)}, got {role!r}", f"{where}.role")
    passed = ("tool_calls", "tool_call_id", "name", "reasoning_content", "reasoning")  # templates may read them
    converted = {key: message[key] for key in passed if key in message}
    converted["role"] = role
    content = message.get("content")
    if content is None and not (role == "assistant" and message.get("tool_calls")):
        raise bad_request(f"{where}.content: missing", f"{where}.content")
    if isinstance(content, list):
        content = [_part(part, f"{where}.content[{index}]", role, policy) for index, part in enumerate(content)]
    elif content is not None and not isinstance(content, str):
        raise bad_request(f"{where}.content: must be a string or a list of content parts", f"{where}.content")
    converted["content"] = content
    return converted


def _part(part: Any, where: str, role: str, policy: MediaPolicy) -> dict[str, Any]:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise bad_request(f"{where}.text: must be a string", f"{where}.text")
        return {"type": "text", "text": part["text"]}
    if kind not in MEDIA_PART_TYPES:
        raise bad_request(
            f"{where}.type: expected one of text, {', '.join(MEDIA_PART_TYPES)}, got {kind!r}", f"{where}.type"
        )
    if role != "user":
        raise bad_request(f"{where}: media are taken in user messages only", where)
    try:
        if kind == "input_audio":
            audio = part.get("input_audio")
            if not isinstance(audio, dict) or not isinstance(audio.get("data"), str):
                raise bad_request(f"{where}.input_audio.data: base64 audio expected", f"{where}.input_audio.data")
            return {"type": "audio", "audio": _clip(_base64(audio["data"], f"{where}.input_audio.data"))}
        source = _source(_url(part, kind, where), f"{where}.{kind}.url", policy)
        if kind == "image_url":
            return {"type": "image", "image": load_image(source)}
        if kind == "audio_url":
            return {"type": "audio", "audio": _clip(source)}
        plan_video(source)  # the header now: a broken file is refused before the request waits
        return {"type": "video", "video": source}
    except InputError as error:
        raise bad_request(f"{where}: {error}", where, "invalid_media") from error


def _url(part: dict[str, Any], kind: str, where: str) -> str:
    value = part.get(kind)
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise bad_request(f"{where}.{kind}.url: missing", f"{where}.{kind}.url")
    return url


def _source(url: str, where: str, policy: MediaPolicy) -> bytes | str:
    if url.startswith("data:"):
        header, comma, data = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise bad_request(f"{where}: a data URL must be base64 (data:TYPE;base64,...)", where)
        return _base64(data, where)
    if url.startswith(("http://", "https://")):
        raise bad_request(
            f"{where}: remote URLs are not fetched; send the file as a base64 data URL", where, "unsupported_url"
        )
    return policy.local_file(url.removeprefix("file://"), where)


def _base64(data: str, where: str) -> bytes:
    try:
        decoded = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as error:
        raise bad_request(f"{where}: not valid base64 ({error})", where, "invalid_base64") from error
    if not decoded:
        raise bad_request(f"{where}: empty", where, "invalid_media")
    return decoded


def _clip(source: bytes | str) -> Any:
    # The limit goes to the decoder: a longer file is refused from its header or as it decodes.
    wave = load_audio(source, max_seconds=MAX_CLIP_SECONDS)
    seconds = len(wave) / SAMPLING_RATE
    if seconds > MAX_CLIP_SECONDS:
        raise MediaError(
            f"audio is {seconds:.1f} s; a chat message holds clips of at most {MAX_CLIP_SECONDS} s "
            "(transcribe longer recordings with /v1/audio/transcriptions, which cuts them on pauses)"
        )
    return wave
