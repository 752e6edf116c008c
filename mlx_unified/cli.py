"""`mlx-unified-generate` (and `python generate.py`): one reply, or an interactive chat, from the terminal.

The reply streams to stdout; progress, statistics and warnings go to stderr, so stdout can be piped.
Exit codes: 0 done, 2 bad arguments or media (one line on stderr), 1 anything else.
Only the argument parser is loaded up front: `--help` and refused arguments answer without loading MLX,
mlx-lm or transformers, which the functions that need them import.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from .errors import InputError
from .generation_flags import FLAG_NAMES, add_generation_flags, generation_params
from .generation_params import ContextLengthError, ParameterError
from .model_source import add_source_arguments
from .processing.limits import SUPPORTED_BUDGETS

if TYPE_CHECKING:
    from .conversation import Media
    from .generation_params import GenerationParams
    from .prefill import ProgressCallback
    from .prefix_cache import PrefixCache

PROG = "mlx-unified-generate"
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
CHAT_HELP = (
    "Chat: type a message and press Enter. /image F, /audio F, /video F attach a file to your next "
    "message; /clear forgets the conversation; /quit (or Ctrl-D) leaves."
)


class BadInput(InputError):
    """A refused argument or file: reported as one line, exit code 2."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse prints the whole usage block; one line is what a script's caller can read.
        raise BadInput(f"{message} (see {self.prog} --help)")


def port_number(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a port number (1 to 65535)")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def emphasis(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def true_or_false(text: str) -> bool:
    """mlx-lm's `--verbose True` / `--verbose False` (T/F, yes/no, 1/0 too)."""
    value = text.strip().lower()
    if value not in ("true", "t", "yes", "1", "false", "f", "no", "0"):
        raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")
    return value in ("true", "t", "yes", "1")


def utf8_text(text: str | None, name: str) -> str | None:
    """`text` when it is valid UTF-8; the interpreter passes other bytes on as lone surrogates."""
    if text is not None:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise BadInput(f"{name}: not valid UTF-8 text (byte {e.start})") from None
    return text


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog=PROG,
        description="Generate with Gemma 4 unified (text, image, audio, video) on MLX.",
        epilog="Exit codes: 0 done, 2 bad arguments or media, 1 anything else.",
    )
    add_source_arguments(parser, "run")
    parser.add_argument(
        "--prompt",
        "-p",
        nargs="+",
        metavar="TEXT",
        help="the user message, its words joined by spaces; - reads it from standard input "
        "(optional with --chat: the first message)",
    )
    system = parser.add_mutually_exclusive_group()
    system.add_argument("--system", "--system-prompt", dest="system", help="system prompt text")
    system.add_argument("--system-file", type=Path, help="UTF-8 text file holding the system prompt")
    parser.add_argument("--image", nargs="+", action="extend", default=[], metavar="F", help="image file(s)")
    parser.add_argument("--audio", nargs="+", action="extend", default=[], metavar="F", help="audio file(s)")
    parser.add_argument("--video", nargs="+", action="extend", default=[], metavar="F", help="video file(s)")
    add_generation_flags(parser, max_tokens=256)
    parser.add_argument("--seed", type=int, help="random seed for sampling (0 to 2**64 - 1)")
    parser.add_argument(
        "--extra-eos-token",
        dest="extra_eos_tokens",
        nargs="+",
        action="extend",
        default=[],
        metavar="TOKEN",
        help="tokens (their text, or ids) that also end the reply, as the end of turn does",
    )
    parser.add_argument(
        "--verbose",
        nargs="?",
        const=True,
        default=True,
        type=true_or_false,
        metavar="BOOL",
        help="True (the default): loading messages, the prefill progress bar and statistics on stderr; "
        "False (or --no-verbose): only the reply",
    )
    parser.add_argument("--no-verbose", dest="verbose", action="store_false", help=argparse.SUPPRESS)
    parser.add_argument(
        "--image-tokens",
        type=int,
        choices=SUPPORTED_BUDGETS,
        help="soft tokens per image (default: the checkpoint's, 280)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object with the text and statistics"
    )
    parser.add_argument("--chat", action="store_true", help="interactive multi-turn session (history kept)")
    parser.add_argument(
        "--audio-emphasis",
        type=emphasis,
        default=1.0,
        metavar="E",
        help="0 < E <= 1: global layers scale the attention paid outside the audio by E (1: off)",
    )
    parser.add_argument(
        "--no-prefix-cache",
        action="store_true",
        help="do not reuse or store prompt prefixes (in memory or in ~/.cache/mlx-unified)",
    )
    # The flag's earlier name, still accepted.
    parser.add_argument("--no-prompt-cache", dest="no_prefix_cache", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--task-reminder", metavar="TEXT", help="restate the task after the media and the text")
    parser.add_argument(
        "--text-first", action="store_true", help="put the text before the media in the user turn"
    )
    parser.add_argument(
        "--thinking",
        "--enable-thinking",
        dest="thinking",
        action="store_true",
        help="Gemma 4's thinking mode: the model thinks before it answers (thoughts shown dimmed)",
    )
    parser.add_argument("--hide-thinking", action="store_true", help="with --thinking: do not show the thoughts")
    return parser


def read_system_prompt(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise BadInput(f"--system-file {path}: no such file") from e
    except UnicodeDecodeError as e:
        raise BadInput(f"--system-file {path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except OSError as e:
        raise BadInput(f"--system-file {path}: cannot read ({e.strerror or e})") from e


def prefill_progress_bar(min_tokens: int = 2048, file: Any = None) -> ProgressCallback:
    """A `prefill_progress` callback drawing a tqdm bar (on stderr) for prompts of at least
    `min_tokens` tokens; a new bar starts with each prefill (it opens at the restored prefix)."""
    from tqdm import tqdm

    bar: tqdm | None = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(
                total=total,
                initial=done,
                unit="tok",
                desc="prefill",
                file=file or sys.stderr,
                leave=False,
                disable=total < min_tokens,
            )
        else:
            bar.update(done - bar.n)
        if done >= total:
            bar.close()
            bar = None

    return update


def load_model(args: argparse.Namespace) -> tuple[Any, Any, Path]:
    """(model, processor, folder) of --model (or the default, or --demo), telling on stderr what happens
    (unless not `--verbose`): the memory check, a download (the hub's progress bars) or a conversion, the
    load."""
    from .config import RANDOM_WEIGHTS_WARNING
    from .loading import load
    from .model_source import GUARD_PROMPT_TOKENS, describe, prepare

    def say(message: str) -> None:
        if args.verbose:
            print(message, file=sys.stderr, flush=True)

    prepared = prepare(
        args.model,
        context_tokens=min(GUARD_PROMPT_TOKENS + args.max_tokens, args.max_kv_size or sys.maxsize),
        demo=args.demo,
        quantize=args.quantize,
        draft_model=args.draft_model,
        kv_bits=args.kv_bits,
        kv_group_size=args.kv_group_size,
    )
    path = prepared.folder
    say(f"Loading {describe(prepared)} from {path} ...")
    started = time.perf_counter()
    model, processor = load(path, progress=args.verbose)
    say(f"Loaded in {time.perf_counter() - started:.1f} s")
    if model.config.random_weights:
        print(f"WARNING: {RANDOM_WEIGHTS_WARNING}", file=sys.stderr, flush=True)
    return model, processor, path


def load_draft_model(name: str, model: Any) -> Any:
    """The drafter of --draft-model, checked against the model it drafts for."""
    from .drafter import load_drafter

    if not Path(name).expanduser().exists():
        print(f"Fetching {name} from the hub (cached after the first run) ...", file=sys.stderr, flush=True)
    return load_drafter(name, target=model.config.text)


def generation_settings(
    args: argparse.Namespace, params: GenerationParams, prefix_cache: PrefixCache | None, draft_model: Any = None
) -> dict[str, Any]:
    """stream_generate's arguments: the checked `params`, and the rest of the flags; `prefix_cache`
    persists system-prompt prefixes across runs; `draft_model` speculates (--draft-model)."""
    return {
        **asdict(params),
        "draft_model": draft_model,
        "extra_eos_tokens": args.extra_eos_tokens,
        "image_tokens": args.image_tokens,
        "audio_emphasis": args.audio_emphasis,
        "media_first": not args.text_first,
        "task_reminder": args.task_reminder,
        "use_prefix_cache": not args.no_prefix_cache,
        "prefix_cache": prefix_cache,
        "prefill_progress": prefill_progress_bar() if args.verbose else None,
        # --thinking turns thinking on; without it the chat template (and --chat-template-config) decide.
        "enable_thinking": True if args.thinking else None,
        "chat_template_kwargs": args.chat_template_kwargs,
    }


class ThoughtDisplay:
    """Thoughts as they stream: dimmed on a terminal; on stderr when stdout is piped (stdout stays the
    answer); not at all when hidden."""

    DIM, RESET = "\x1b[2m", "\x1b[0m"

    def __init__(self, hidden: bool) -> None:
        self.hidden = hidden
        self.terminal = sys.stdout.isatty()
        self.stream = sys.stdout if self.terminal else sys.stderr
        self.open = False

    def show(self, text: str) -> None:
        if self.hidden:
            return
        if not self.open and self.terminal:
            self.stream.write(self.DIM)
        self.open = True
        self.stream.write(text)
        self.stream.flush()

    def close(self) -> None:
        """End the thought before the answer (or the reply) goes on."""
        if self.open:
            self.stream.write((self.RESET if self.terminal else "") + "\n\n")
            self.stream.flush()
            self.open = False


def answer(
    model: Any,
    processor: Any,
    history: list[dict],
    text: str,
    media: Media,
    args: argparse.Namespace,
    system: str | None,
    settings: dict[str, Any],
) -> str:
    """Run one turn with stream_generate's `settings`: stream it to stdout (or print it as JSON),
    statistics to stderr (when verbose); the reply text."""
    from .conversation import ReplyStats, SegmentStart, Thought, stream_reply
    from .tool_calls import ToolCall

    stats = ReplyStats()
    pieces: list[str] = []
    thoughts: list[str] = []
    calls: list[ToolCall] = []
    display = ThoughtDisplay(hidden=args.hide_thinking or args.json)
    for event in stream_reply(
        model,
        processor,
        history,
        text,
        media,
        stats,
        system=system,
        **settings,
    ):
        if isinstance(event, Thought):
            thoughts.append(event.text)
            display.show(event.text)
            continue
        display.close()
        if isinstance(event, ToolCall):
            calls.append(event)
            print(f"[tool call] {event.name} {json.dumps(event.arguments)}", file=sys.stderr, flush=True)
            continue
        if isinstance(event, SegmentStart):
            if args.verbose:
                print(f"[{event.label()}]", file=sys.stderr, flush=True)
            event_text = "\n" if event.index > 1 else ""
        else:
            event_text = event
        pieces.append(event_text)
        if not args.json:
            sys.stdout.write(event_text)
            sys.stdout.flush()
    display.close()
    reply = "".join(pieces)
    if args.json:
        record = {"text": reply, "reasoning": "".join(thoughts), "tool_calls": [c.as_openai() for c in calls]}
        print(json.dumps({**record, **stats.as_dict()}, ensure_ascii=False), flush=True)
    else:
        print(flush=True)
    if args.verbose:
        print(stats.summary(), file=sys.stderr, flush=True)
    return reply


def chat(
    model: Any,
    processor: Any,
    args: argparse.Namespace,
    system: str | None,
    first_text: str | None,
    first_media: Media,
    settings: dict[str, Any],
) -> None:
    """Read turns from stdin until /quit or end of input (the first may be given); a refused turn is
    reported and skipped."""
    from .conversation import Media, assistant_message, load_media, user_message
    from .processing import MediaError

    print(CHAT_HELP, file=sys.stderr, flush=True)
    history: list[dict] = []
    attached: dict[str, list[str]] = {"image": [], "audio": [], "video": []}
    pending_media = first_media
    pending_text = first_text
    while True:
        if pending_text is None:
            print("> ", end="", file=sys.stderr, flush=True)
            raw = sys.stdin.buffer.readline()
            if not raw:
                return
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                print(f"error: that line is not valid UTF-8 text (byte {e.start}); type it again", file=sys.stderr, flush=True)
                continue
            command, _, argument = line.partition(" ")
            if command in ("/quit", "/exit"):
                return
            if command == "/clear":
                history.clear()
                print("(conversation cleared)", file=sys.stderr, flush=True)
                continue
            if command in ("/image", "/audio", "/video"):
                if not argument.strip():
                    print(f"error: {command} needs a file path", file=sys.stderr, flush=True)
                else:
                    attached[command[1:]].append(argument.strip())
                continue
            if not line:
                continue
            pending_text = line
        text, pending_text = pending_text, None
        try:
            media = load_media(attached["image"], attached["audio"], attached["video"])
            media = pending_media + media
            reply = answer(model, processor, history, text, media, args, system, settings)
        except MediaError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            continue
        except ContextLengthError as e:  # the conversation outgrew the context: the session goes on
            print(f"error: {e.renamed(FLAG_NAMES)} (/clear starts a new conversation)", file=sys.stderr, flush=True)
            continue
        except KeyboardInterrupt:
            print("\n(reply stopped)", file=sys.stderr, flush=True)
            continue
        finally:
            attached = {"image": [], "audio": [], "video": []}
            pending_media = Media()
        history += [user_message(text, media), assistant_message(reply)]


def read_prompt(args: argparse.Namespace) -> str | None:
    """The --prompt text, its words joined as mlx-vlm joins them; `-` reads it from standard input."""
    if args.prompt is None:
        return None
    if args.prompt != ["-"]:
        return utf8_text(" ".join(args.prompt), "--prompt")
    if args.chat:
        raise BadInput("--prompt -: standard input holds the chat's lines with --chat; give the first message as text")
    raw = sys.stdin.buffer.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(f"--prompt -: standard input is not valid UTF-8 text (byte {e.start})") from None


def run(argv: Sequence[str] | None) -> int:
    if sys.stdout is None:
        raise BadInput("standard output is closed: there is nowhere to write the reply")
    args = build_parser().parse_args(argv)
    for name in ("system", "task_reminder"):
        utf8_text(getattr(args, name), f"--{name.replace('_', '-')}")
    prompt = read_prompt(args)
    if not args.chat and prompt is None:
        raise BadInput(f"--prompt is required (or use --chat) (see {PROG} --help)")
    generation_params(args)  # every value checked before the model loads
    system = read_system_prompt(args.system_file) if args.system_file else args.system
    from .budgets import prefix_cache_bytes
    from .conversation import load_media
    from .generation import stop_token_ids
    from .generation_params import checkpoint_sampling
    from .prefix_cache import PrefixCache

    # Media are checked before the model loads: a bad file costs no wait.
    media = load_media(args.image, args.audio, args.video)
    model, processor, folder = load_model(args)
    draft_model = load_draft_model(args.draft_model, model) if args.draft_model else None
    weights = model.nbytes + (draft_model.nbytes if draft_model is not None else 0)
    # Now with the checkpoint's sampling defaults and its vocabulary (--top-k, --extra-eos-token).
    params = generation_params(args, checkpoint_sampling(folder), model.config.text.vocab_size)
    try:
        stop_token_ids(model, processor.tokenizer, args.extra_eos_tokens)
    except ParameterError as e:
        raise e.renamed(FLAG_NAMES) from None
    prefix_cache = (
        None if args.no_prefix_cache else PrefixCache.for_checkpoint(folder, max_bytes=prefix_cache_bytes(weights))
    )
    settings = generation_settings(args, params, prefix_cache, draft_model)
    if args.chat:
        chat(model, processor, args, system, prompt, media, settings)
    else:
        answer(model, processor, [], prompt, media, args, system, settings)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit code (also raised as SystemExit by the script wrappers)."""
    try:
        return run(argv)
    except InputError as e:
        if isinstance(e, ParameterError):  # named by its flag, also when found while generating
            e = e.renamed(FLAG_NAMES)
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr, flush=True)
        return EXIT_FAILED
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, and keep the interpreter's last flush from failing.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
