"""`mlx-unified-app` (and `python app.py`): a local Gradio chat with Gemma 4 unified.

Text plus image, audio and video files (or a microphone recording) per message, streamed replies, one
generation at a time behind a visible queue. Model work is `mlx_unified`'s: this module only wires it
to the page.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import socket
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cli import port_number
from .config import RANDOM_WEIGHTS_WARNING, ConfigError, ModelConfig, load_config
from .conversation import (
    Media,
    ReplyStats,
    SegmentStart,
    Thought,
    assistant_message,
    format_memory,
    load_attachments,
    stream_reply,
    user_message,
)
from .errors import InputError
from .generation_flags import add_kv_cache_flags, generation_params
from .kv_quantization import DEFAULT_KV_GROUP_SIZE, DEFAULT_QUANTIZED_KV_START, KV_BITS
from .model_source import add_source_arguments
from .processing.errors import MediaError
from .processing.limits import SUPPORTED_BUDGETS
from .tool_calls import ToolCall

if TYPE_CHECKING:
    from .prefill import ProgressCallback
    from .prefix_cache import PrefixCache

EMPTY_REPLY = "(no visible text in this reply)"
THINKING_TITLE = "💭 Thinking"
ERROR_TITLE = "⚠️ Could not answer"
CONTEXT_FOR_ESTIMATE = 8192
# Prompts of at least this many tokens show a note with the progress of reading them.
PREFILL_NOTE_TOKENS = 2048
# The max-tokens slider's range.
MAX_TOKENS_SETTING = 8192
MAX_TEMPERATURE_SETTING = 2.0
# While a prompt is read, the reply is sent again this often: each send is a point where Stop can end it.
HEARTBEAT_S = 0.5


# ---------------------------------------------------------------- settings that survive restarts


def default_settings_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "mlx-unified" / "app.json"


def read_settings(path: Path) -> dict[str, Any]:
    """The saved settings; an unreadable file counts as none (the app must still start)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def save_setting(path: Path, key: str, value: Any) -> None:
    settings = read_settings(path)
    settings[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(settings, ensure_ascii=False, indent=2), encoding="utf-8")
    temporary.replace(path)  # atomic: a crash mid-write never leaves half a file


# ---------------------------------------------------------------- the loaded model


class ModelSlot:
    """The one loaded model; the lock keeps a model switch from landing in the middle of a reply."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.name: str | None = None  # as the user (or the default) named it; the demo: its folder
        self.note = ""  # why this one, e.g. "the default model for this machine"
        self.problem: str | None = None  # why no model is loaded, shown in the page
        self.model: Any = None
        self.processor: Any = None
        self.prefix_cache: PrefixCache | None = None
        self.drafter: Any = None  # the loaded MTP drafter of `drafter_name`, for this model
        self.drafter_name: str | None = None

    def load(
        self,
        name: str | None,
        demo: bool = False,
        quantize: str | None = None,
        kv_bits: int | None = None,
        kv_group_size: int = DEFAULT_KV_GROUP_SIZE,
    ) -> None:
        """Load `name` (None: the default for this machine; see `model_source.prepare`), after the
        memory check (with the KV cache setting's `kv_bits`), downloading or converting it first when
        needed."""
        from .budgets import prefix_cache_bytes
        from .loading import load
        from .model_source import prepare
        from .prefix_cache import PrefixCache

        prepared = prepare(
            name,
            context_tokens=CONTEXT_FOR_ESTIMATE,
            demo=demo,
            quantize=quantize,
            kv_bits=kv_bits,
            kv_group_size=kv_group_size,
        )
        model, processor = load(prepared.folder)
        # Reuses the system prompt's prefix across turns, and across restarts from ~/.cache/mlx-unified.
        prefix_cache = PrefixCache.for_checkpoint(prepared.folder, max_bytes=prefix_cache_bytes(model.nbytes))
        with self.lock:
            self.name = str(prepared.folder) if demo else prepared.name
            self.note, self.problem = prepared.note, None
            self.model, self.processor = model, processor
            self.prefix_cache = prefix_cache
            self.drafter, self.drafter_name = None, None  # drafted for the previous model

    def draft_model(self, name: str | None) -> Any:
        """The drafter `name` (a folder or hub id; loaded on first use and checked against the model),
        None for none. Call with the lock held."""
        name = (name or "").strip()
        if not name:
            return None
        if name != self.drafter_name:
            from .drafter import load_drafter

            drafter = load_drafter(name)
            drafter.config.check_target(self.model.config.text)
            self.drafter, self.drafter_name = drafter, name
        return self.drafter

    @property
    def random_weights(self) -> bool:
        return self.model is not None and self.model.config.random_weights


def banner_markdown(slot: ModelSlot) -> str:
    if slot.model is None:
        if slot.problem:
            return (
                f"⚠️ **No model loaded**: {slot.problem}. Or pick a checkpoint folder or hub id below and "
                "press *Load*."
            )
        return "**No model loaded.** Pick a checkpoint folder or hub id below and press *Load*."
    name = f"{slot.name} ({slot.note})" if slot.note else slot.name
    if slot.random_weights:
        return f"⚠️ **{name}**: {RANDOM_WEIGHTS_WARNING}."
    return f"Model: **{name}**"


def known_models(extra: Sequence[str] = ()) -> list[str]:
    """Picker choices: the given names, then Gemma 4 unified checkpoints already in the hub cache."""
    names = [name for name in extra if name]
    try:
        from huggingface_hub import scan_cache_dir

        repos = scan_cache_dir().repos
    except Exception:  # no cache yet, or an unreadable one: nothing to suggest
        repos = []
    for repo in sorted(repos, key=lambda r: r.repo_id):
        for revision in repo.revisions:
            config = revision.snapshot_path / "config.json"
            if config.is_file() and _is_unified_config(config) and repo.repo_id not in names:
                names.append(repo.repo_id)
                break
    return names


def _is_unified_config(path: Path) -> bool:
    try:
        return str(json.loads(path.read_text()).get("model_type", "")).startswith("gemma4_unified")
    except (OSError, ValueError):
        return False


# ---------------------------------------------------------------- memory estimate


def model_config(name: str) -> ModelConfig:
    """The config of a local folder, or of a hub id (config.json alone is fetched)."""
    local = Path(name).expanduser()
    if local.exists():
        return load_config(local)
    from huggingface_hub import hf_hub_download

    try:
        return load_config(hf_hub_download(name, "config.json"))
    except Exception as e:  # offline, unknown repo, gated: the estimate waits for the download
        raise ConfigError(f"{name}: config not available yet ({type(e).__name__})") from e


def memory_markdown(name: str | None, kv_bits: int | None = None) -> str:
    if not name:
        return ""
    from .budgets import GB, memory_budget_bytes
    from .convert.estimate import estimate

    try:
        config = model_config(name)
    except ConfigError as e:
        return f"Memory estimate: {e}"
    quantization = config.quantization or {}
    bits = quantization.get("bits")
    group_size = quantization.get("group_size", 64)
    needed = estimate(
        config, bits=bits, group_size=group_size, context_tokens=CONTEXT_FOR_ESTIMATE, kv_bits=kv_bits
    )
    budget, source = memory_budget_bytes()
    verdict = "fits" if needed["total_bytes"] <= budget else "**does not fit**"
    weights = f"{bits}-bit" if bits else "16-bit"
    return (
        f"Memory estimate ({weights} weights, {CONTEXT_FOR_ESTIMATE // 1024}K-token context): "
        f"about **{needed['total_bytes'] / GB:.2f} GB** (weights {needed['weights_bytes'] / GB:.2f} GB, "
        f"KV cache {needed['kv_bytes'] / GB:.2f} GB{f', {kv_bits}-bit' if kv_bits else ''}); {source}: "
        f"{budget / GB:.1f} GB, {verdict}."
    )


# ---------------------------------------------------------------- chat history <-> model messages


def uploaded_file(path: Any) -> str | None:
    """`path`, resolved, when it is a file in Gradio's upload folder (one a user of the page uploaded);
    else None. Anything else a request names, a file of this machine's included, is never read."""
    from gradio.utils import get_upload_folder

    if not isinstance(path, str) or not path:
        return None
    try:
        resolved = Path(path).resolve()
    except (OSError, RuntimeError):
        return None
    root = Path(get_upload_folder()).resolve()
    return str(resolved) if resolved.is_relative_to(root) and resolved.is_file() else None


def _upload(path: Any) -> str:
    found = uploaded_file(path)
    if found is None:
        raise MediaError(f"{Path(str(path)).name}: not a file uploaded to this app")
    return found


def _parts(content: Any) -> tuple[list[str], list[str]]:
    """(texts, uploaded file paths) of one Gradio message's content, in any of the shapes Gradio uses.

    Strings are text (Gradio's API sends a text turn as a list of strings); a file is only ever one
    Gradio stored on upload: a file part naming anything else is refused."""
    if isinstance(content, str):
        return [content], []
    if isinstance(content, (tuple, list)) and content and all(isinstance(x, str) for x in content):
        upload = uploaded_file(content[0])
        # The (path, alt_text) tuple form, or plain text.
        return ([], [upload]) if upload is not None else (list(content), [])
    if isinstance(content, dict):
        content = [content]
    texts, files = [], []
    for part in content or []:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict):
            if part.get("type") == "text":
                texts.append(part.get("text", ""))
            elif isinstance(part.get("file"), dict):
                files.append(_upload(part["file"].get("path")))
            elif "path" in part:
                files.append(_upload(part["path"]))
    return texts, files


def history_messages(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The model's view of the chat so far: answered turns only, notes (statistics, segments) left out.

    A turn whose only answer is an error note is dropped, so a bad file does not poison later turns.
    """
    turns: list[tuple[list[str], list[str], list[str]]] = []  # (user texts, user files, reply texts)
    previous_role = None
    for message in history:
        texts, files = _parts(message.get("content"))
        role = message.get("role")
        if role == "user":
            # Gradio stores each file and the text of one turn as separate user messages.
            if previous_role != "user":
                turns.append(([], [], []))
            turns[-1][0].extend(texts)
            turns[-1][1].extend(files)
        elif turns and not (message.get("metadata") or {}).get("title"):
            turns[-1][2].extend("" if text == EMPTY_REPLY else text for text in texts)
        previous_role = role
    messages = []
    for texts, files, replies in turns:
        if replies:
            messages += [
                user_message("\n".join(texts), load_attachments(files)),
                assistant_message("".join(replies)),
            ]
    return messages


class ReplyCancelled(Exception):
    """Raised in the generation thread at the next prefill chunk once the user pressed Stop."""


@dataclass
class PrefillProgress:
    done: int  # prompt tokens in the cache so far
    total: int


def background_events(start: Callable[[ProgressCallback], Iterator[Any]]) -> Iterator[Any]:
    """Run the iterator `start(progress)` in its own thread and yield its items, PrefillProgress as
    `progress` reports it, and None every HEARTBEAT_S while nothing comes.

    Gradio stops a reply by no longer asking for the next item, so a reply that sits in a long prefill
    could not be stopped: here the consumer is never blocked longer than HEARTBEAT_S. Closing this
    iterator ends the work at the next prefill chunk or token and waits for it, so the model is free
    when close() returns. The worker's exceptions are raised here."""
    items: queue.Queue[Any] = queue.Queue()
    cancel = threading.Event()
    finished = object()

    def progress(done: int, total: int) -> None:
        if cancel.is_set():
            raise ReplyCancelled
        items.put(PrefillProgress(done, total))

    def work() -> None:
        try:
            for item in start(progress):
                if cancel.is_set():
                    break
                items.put(item)
        except ReplyCancelled:
            pass
        except Exception as e:
            items.put(e)
        finally:
            items.put(finished)

    worker = threading.Thread(target=work, name="mlx-unified-reply", daemon=True)
    worker.start()
    try:
        while True:
            try:
                item = items.get(timeout=HEARTBEAT_S)
            except queue.Empty:
                yield None
                continue
            if item is finished:
                return
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        cancel.set()
        worker.join()


def _note(title: str, content: str = "", status: str | None = None) -> dict[str, Any]:
    metadata = {"title": title} if status is None else {"title": title, "status": status}
    return {"role": "assistant", "content": content, "metadata": metadata}


def _stats_note(stats: ReplyStats) -> dict[str, Any]:
    title = (
        f"{stats.ttft_s:.2f} s to first token · {stats.generation_tps:.1f} tokens/s · "
        f"{format_memory(stats.peak_memory_gb)} peak memory"
    )
    if stats.draft_tokens:
        title += f" · {stats.acceptance_rate:.0%} of drafts accepted"
    return _note(title, stats.summary(), status="done")


def respond(
    slot: ModelSlot,
    message: dict[str, Any] | str,
    history: list[dict[str, Any]],
    system: str,
    temperature: float,
    top_p: float,
    max_tokens: float,
    image_tokens: int,
    audio_emphasis: float = 1.0,
    use_prefix_cache: bool = True,
    enable_thinking: bool = False,
    kv_bits: int | None = None,
    kv_cache: KVCacheSettings | None = None,
    draft_model: str = "",
    num_draft_tokens: str = "auto",
) -> Iterator[list[dict[str, Any]]]:
    """The chat function: yields the growing list of assistant messages for this turn. `kv_bits`: the
    KV cache setting (None or 0: not quantized); `kv_cache`: its group size and start. draft_model: a
    drafter's folder or hub id for speculative decoding ("" off), num_draft_tokens "auto" or a count."""
    text, files = (
        (message, []) if isinstance(message, str) else (message.get("text") or "", message.get("files") or [])
    )
    files = [f if isinstance(f, str) else f.get("path") for f in files]
    notes: list[dict[str, Any]] = []
    reply = ""

    def shown() -> list[dict[str, Any]]:
        return [*notes, {"role": "assistant", "content": reply}] if reply else list(notes)

    try:
        if slot.model is None:
            raise InputError("no model loaded: pick one above and press Load")
        with slot.lock:
            drafter = slot.draft_model(draft_model)
            media: Media = load_attachments([_upload(path) for path in files])
            earlier = history_messages(history)
            stats = ReplyStats()
            reading: dict[str, Any] | None = None  # the prompt-reading note, once the prompt is long
            thinking: dict[str, Any] | None = None  # the collapsible block of the thought channel

            def reply_events(progress: ProgressCallback) -> Iterator[str | SegmentStart]:
                return stream_reply(
                    slot.model,
                    slot.processor,
                    earlier,
                    text,
                    media,
                    stats,
                    system=system or None,
                    max_tokens=int(max_tokens),
                    temperature=float(temperature),
                    top_p=float(top_p),
                    image_tokens=int(image_tokens),
                    audio_emphasis=float(audio_emphasis),
                    prefix_cache=slot.prefix_cache,
                    use_prefix_cache=bool(use_prefix_cache),
                    prefill_progress=progress,
                    enable_thinking=bool(enable_thinking),
                    draft_model=drafter,
                    num_draft_tokens=num_draft_tokens,
                    **(kv_cache or KVCacheSettings()).arguments(kv_bits),
                )

            # Closed inside the lock: after a Stop, the next reply waits for this one's thread.
            with contextlib.closing(background_events(reply_events)) as events:
                for event in events:
                    if isinstance(event, PrefillProgress):
                        if event.total >= PREFILL_NOTE_TOKENS:
                            if reading is None:
                                reading = _note("")
                                notes.append(reading)
                            reading["metadata"]["title"] = (
                                f"Reading the prompt: {event.done:,} / {event.total:,} tokens"
                            )
                            reading["metadata"]["status"] = "done" if event.done == event.total else "pending"
                    elif isinstance(event, Thought):
                        if thinking is None:
                            thinking = _note(THINKING_TITLE, status="pending")
                            notes.append(thinking)
                        thinking["content"] += event.text
                    elif isinstance(event, ToolCall):
                        notes.append(_note(f"Tool call: {event.name}", json.dumps(event.arguments), status="done"))
                    elif isinstance(event, SegmentStart):
                        for note in notes:
                            note["metadata"]["status"] = "done"
                        notes.append(_note(f"Processing {event.label()}", status="pending"))
                        reply += "\n" if event.index > 1 else ""
                    elif event is not None:  # None: nothing new, sent again so that Stop can act
                        reply += event
                        if thinking is not None:
                            thinking["metadata"]["status"] = "done"
                    yield shown()
        for note in notes:
            note["metadata"]["status"] = "done"
        yield [*notes, {"role": "assistant", "content": reply or EMPTY_REPLY}, _stats_note(stats)]
    except (InputError, ValueError) as e:
        # Bad input of one turn: say so in the chat; the next turn starts clean. Uploads live under
        # Gradio's cache folder: the message names them as the user does, by file name.
        error = str(e)
        for path in files:
            error = error.replace(str(path), Path(path).name)
        yield [*notes, _note(ERROR_TITLE, error)]
    except Exception as e:  # a bug must not take the page down: report it, keep serving
        traceback.print_exc()
        yield [*notes, _note(ERROR_TITLE, f"internal error ({type(e).__name__}: {e})")]


# ---------------------------------------------------------------- the page


@dataclass(frozen=True)
class KVCacheSettings:
    """The app's KV cache quantization: the bits come from the page's setting, the rest from the
    command line (mlx-lm's flags)."""

    group_size: int = DEFAULT_KV_GROUP_SIZE
    start: int = DEFAULT_QUANTIZED_KV_START

    def arguments(self, kv_bits: int | None) -> dict[str, Any]:
        return {"kv_bits": kv_bits or None, "kv_group_size": self.group_size, "quantized_kv_start": self.start}


# The KV cache setting's choices: (label, kv_bits), 0 for no quantization.
KV_CACHE_CHOICES = [("not quantized", 0), *((f"{bits}-bit", bits) for bits in sorted(KV_BITS, reverse=True))]


def build_app(
    slot: ModelSlot,
    settings_file: Path,
    choices: list[str],
    max_tokens: int = 512,
    temperature: float = 1.0,
    kv_bits: int | None = None,
    kv_cache: KVCacheSettings | None = None,
    draft_model: str | None = None,
) -> Any:
    """The page; `draft_model` (else the saved setting) starts the speculative-decoding setting."""
    import gradio as gr

    from .speculative import AUTO_MAX_DRAFTS

    settings = read_settings(settings_file)

    def pick(name: str, bits: int) -> str:
        return memory_markdown(name, bits or None)

    # Gradio spots a progress parameter by its default; tqdm tracking shows the hub download bars.
    download_progress = gr.Progress(track_tqdm=True)

    def load_picked(name: str, bits: int = 0, progress: Any = download_progress) -> tuple[str, str]:
        if not name:
            return banner_markdown(slot), "Pick a model first."
        progress(0, desc=f"Loading {name}")
        try:
            slot.load(name, kv_bits=bits or None, kv_group_size=(kv_cache or KVCacheSettings()).group_size)
        except InputError as e:
            return banner_markdown(slot), f"⚠️ {e}"
        return banner_markdown(slot), memory_markdown(name, bits or None)

    def chat(
        message, history, system, temperature, top_p, tokens, image_tokens, emphasis, reuse_prefix, think, bits,
        drafter, drafts,
    ):
        yield from respond(
            slot, message, history, system, temperature, top_p, tokens, image_tokens, emphasis, reuse_prefix,
            think, bits, kv_cache, drafter, drafts,
        )  # fmt: skip

    with gr.Blocks(title="mlx-unified") as page:
        gr.Markdown("## Gemma 4 unified on MLX")
        banner = gr.Markdown(banner_markdown(slot), elem_id="model-banner")
        with gr.Row():
            picker = gr.Dropdown(
                choices=choices,
                value=slot.name,
                allow_custom_value=True,
                label="Model: checkpoint folder or hub id",
                scale=4,
            )
            load_button = gr.Button("Load", scale=1)
        memory = gr.Markdown(memory_markdown(slot.name, kv_bits), elem_id="memory-estimate")
        with gr.Accordion("System prompt (saved across restarts)", open=False):
            system = gr.Textbox(value=settings.get("system_prompt", ""), lines=4, show_label=False)
        with gr.Accordion("Settings", open=False):
            temperature_slider = gr.Slider(
                0.0, MAX_TEMPERATURE_SETTING, value=temperature, step=0.05, label="Temperature (0: greedy)"
            )
            top_p = gr.Slider(0.0, 1.0, value=0.95, step=0.01, label="Top-p")
            tokens = gr.Slider(1, MAX_TOKENS_SETTING, value=max_tokens, step=1, label="Max tokens")
            image_tokens = gr.Dropdown(
                choices=list(SUPPORTED_BUDGETS), value=280, label="Image budget (soft tokens per image)"
            )
            emphasis = gr.Slider(
                0.05,
                1.0,
                value=1.0,
                step=0.05,
                label="Audio emphasis (1: off; lower: global layers attend more to the recording)",
            )
            reuse_prefix = gr.Checkbox(value=True, label="Reuse the system prompt's cached prefix")
            thinking_switch = gr.Checkbox(
                value=False, label="Thinking (the model thinks first; its thoughts in a collapsible block)"
            )
            kv_cache_bits = gr.Dropdown(
                choices=KV_CACHE_CHOICES,
                value=kv_bits or 0,
                label="KV cache (quantized: less memory for long contexts, slightly different replies)",
                elem_id="kv-cache",
            )
            drafter = gr.Textbox(
                value=draft_model if draft_model is not None else settings.get("draft_model", ""),
                label="Draft model for speculative decoding (MTP drafter folder or hub id; empty: off)",
            )
            drafts = gr.Dropdown(
                choices=["auto", *map(str, range(AUTO_MAX_DRAFTS + 1))],
                value="auto",
                label="Draft tokens per round (auto: follows the acceptance, down to plain decoding)",
            )
        gr.ChatInterface(
            chat,
            multimodal=True,
            textbox=gr.MultimodalTextbox(
                placeholder="Message, plus image, audio or video files (or record)",
                file_types=["image", "audio", "video"],
                file_count="multiple",
                sources=["upload", "microphone"],
                # A custom box has no stop button unless asked; ChatInterface shows it while a reply runs.
                stop_btn=True,
            ),
            chatbot=gr.Chatbot(height=480, elem_id="chat"),
            additional_inputs=[
                system,
                temperature_slider,
                top_p,
                tokens,
                image_tokens,
                emphasis,
                reuse_prefix,
                thinking_switch,
                kv_cache_bits,
                drafter,
                drafts,
            ],
            concurrency_limit=1,
            show_progress="full",
        )
        picker.change(pick, [picker, kv_cache_bits], memory)
        kv_cache_bits.change(pick, [picker, kv_cache_bits], memory)
        load_button.click(load_picked, [picker, kv_cache_bits], [banner, memory], concurrency_limit=1)
        system.change(lambda text: save_setting(settings_file, "system_prompt", text), system, None)
        drafter.change(lambda name: save_setting(settings_file, "draft_model", name.strip()), drafter, None)
    return page


def check_port_free(host: str, port: int) -> None:
    """Refuse, before the model loads, a port another program already serves on."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as e:
            raise InputError(f"cannot serve on {host}:{port} ({e.strerror or e}); pick another --port or --host") from e


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlx-unified-app", description="Chat with Gemma 4 unified in a browser."
    )
    add_source_arguments(parser, "load")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this Mac only)"
    )
    parser.add_argument("--port", type=port_number, default=7860, help="port to serve on (default 7860)")
    parser.add_argument("--share", action="store_true", help="also open a public Gradio share link (opt-in)")
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=512,
        help=f"initial value of the max-tokens setting (1 to {MAX_TOKENS_SETTING})",
    )
    parser.add_argument(
        "--temperature",
        "--temp",
        dest="temperature",
        type=float,
        default=1.0,
        help=f"initial value of the temperature setting (0: greedy, at most {MAX_TEMPERATURE_SETTING})",
    )
    parser.add_argument(
        "--draft-model",
        metavar="PATH_OR_ID",
        help="initial draft model (MTP drafter) for speculative decoding; default: the saved setting",
    )
    parser.add_argument("--settings-file", type=Path, default=None, help="where the system prompt is saved")
    add_kv_cache_flags(parser)  # --kv-bits sets the KV cache setting's initial value
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        generation_params(args)  # the values every surface accepts
    except InputError as e:
        parser.error(str(e))
    for flag, value, low, high in (
        ("--max-tokens", args.max_tokens, 1, MAX_TOKENS_SETTING),
        ("--temperature", args.temperature, 0, MAX_TEMPERATURE_SETTING),
    ):
        if value > high:
            parser.error(f"argument {flag}: {value} is outside {low:g} to {high:g} (the slider's range)")
    slot = ModelSlot()
    try:
        check_port_free(args.host, args.port)
        named = args.model or args.demo or args.quantize is not None
        what = args.model or ("the demo checkpoint" if args.demo else "the default model for this machine")
        print(f"Loading {what} ...", file=sys.stderr, flush=True)
        try:
            slot.load(
                args.model, demo=args.demo, quantize=args.quantize, kv_bits=args.kv_bits, kv_group_size=args.kv_group_size
            )
        except InputError as e:
            if named:
                raise
            # The default model is not here (offline, say): the page opens and says so, and how to go on.
            slot.problem = str(e)
            print(f"mlx-unified-app: {e}", file=sys.stderr, flush=True)
    except InputError as e:
        print(f"mlx-unified-app: error: {e}", file=sys.stderr)
        return 2
    if slot.random_weights:
        print(f"WARNING: {RANDOM_WEIGHTS_WARNING}", file=sys.stderr, flush=True)
    from .model_source import default_model

    page = build_app(
        slot,
        args.settings_file or default_settings_file(),
        known_models([slot.name or default_model()]),
        args.max_tokens,
        args.temperature,
        args.kv_bits,
        KVCacheSettings(args.kv_group_size, args.quantized_kv_start),
        args.draft_model,
    )
    try:
        page.queue(default_concurrency_limit=1).launch(
            server_name=args.host, server_port=args.port, share=args.share
        )
    except OSError as e:  # the port was taken between the check and the launch
        print(f"mlx-unified-app: error: cannot serve on {args.host}:{args.port} ({e})", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
