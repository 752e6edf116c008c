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
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from .errors import InputError
from .kv_quantization import DEFAULT_KV_GROUP_SIZE, DEFAULT_QUANTIZED_KV_START, KV_BITS, KV_GROUP_SIZES
from .processing.limits import SUPPORTED_BUDGETS

if TYPE_CHECKING:
    from .conversation import Media
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


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def probability(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def seed_value(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"must be between 0 and 2**64 - 1, got {text}")
    return value


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
    parser.add_argument("--model", required=True, help="local checkpoint folder or hub id (owner/name)")
    parser.add_argument("--prompt", help="the user message (optional with --chat: the first message)")
    system = parser.add_mutually_exclusive_group()
    system.add_argument("--system", help="system prompt text")
    system.add_argument("--system-file", type=Path, help="UTF-8 text file holding the system prompt")
    parser.add_argument("--image", nargs="+", action="extend", default=[], metavar="F", help="image file(s)")
    parser.add_argument("--audio", nargs="+", action="extend", default=[], metavar="F", help="audio file(s)")
    parser.add_argument("--video", nargs="+", action="extend", default=[], metavar="F", help="video file(s)")
    parser.add_argument("--max-tokens", type=positive_int, default=256, help="most tokens to generate (256)")
    parser.add_argument("--temp", type=non_negative_float, default=0.0, help="temperature; 0 is greedy (0)")
    parser.add_argument("--top-p", type=probability, default=1.0, help="nucleus sampling mass (1.0: off)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0: off)")
    parser.add_argument("--min-p", type=probability, default=0.0, help="min-p sampling threshold (0: off)")
    parser.add_argument("--seed", type=seed_value, help="random seed for sampling (0 to 2**64 - 1)")
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
    add_kv_cache_arguments(parser)
    parser.add_argument("--task-reminder", metavar="TEXT", help="restate the task after the media and the text")
    parser.add_argument(
        "--text-first", action="store_true", help="put the text before the media in the user turn"
    )
    return parser


def add_kv_cache_arguments(parser: argparse.ArgumentParser) -> None:
    """mlx-lm's KV-cache quantization flags (the app takes them too)."""
    parser.add_argument(
        "--kv-bits",
        type=int,
        choices=KV_BITS,
        help="quantize the KV cache to this many bits (default: no quantization)",
    )
    parser.add_argument(
        "--kv-group-size",
        type=int,
        choices=KV_GROUP_SIZES,
        default=DEFAULT_KV_GROUP_SIZE,
        help=f"group size for KV cache quantization ({DEFAULT_KV_GROUP_SIZE})",
    )
    parser.add_argument(
        "--quantized-kv-start",
        type=non_negative_int,
        default=DEFAULT_QUANTIZED_KV_START,
        metavar="N",
        help=f"with --kv-bits, quantize the KV cache once it holds N tokens ({DEFAULT_QUANTIZED_KV_START})",
    )


def emphasis(text: str) -> float:
    value = non_negative_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


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


def load_model(name: str) -> tuple[Any, Any, Path]:
    """(model, processor, folder), telling on stderr what happens: download (the hub's progress bars), load."""
    from .checkpoint import resolve
    from .config import RANDOM_WEIGHTS_WARNING
    from .loading import load

    if not Path(name).expanduser().exists():
        print(f"Fetching {name} from the hub (cached after the first run) ...", file=sys.stderr, flush=True)
    path = resolve(name)
    print(f"Loading {path} ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    model, processor = load(path, progress=True)
    print(f"Loaded in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    if model.config.random_weights:
        print(f"WARNING: {RANDOM_WEIGHTS_WARNING}", file=sys.stderr, flush=True)
    return model, processor, path


def generation_settings(args: argparse.Namespace, prefix_cache: PrefixCache | None) -> dict[str, Any]:
    """stream_generate's arguments; `prefix_cache` persists system-prompt prefixes across runs."""
    return {
        "max_tokens": args.max_tokens,
        "temperature": args.temp,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "min_p": args.min_p,
        "seed": args.seed,
        "image_tokens": args.image_tokens,
        "audio_emphasis": args.audio_emphasis,
        "media_first": not args.text_first,
        "task_reminder": args.task_reminder,
        "use_prefix_cache": not args.no_prefix_cache,
        "prefix_cache": prefix_cache,
        "kv_bits": args.kv_bits,
        "kv_group_size": args.kv_group_size,
        "quantized_kv_start": args.quantized_kv_start,
        "prefill_progress": prefill_progress_bar(),
    }


def answer(
    model: Any,
    processor: Any,
    history: list[dict],
    text: str,
    media: Media,
    args: argparse.Namespace,
    system: str | None,
    prefix_cache: PrefixCache | None,
) -> str:
    """Run one turn: stream it to stdout (or print it as JSON), statistics to stderr; the reply text."""
    from .conversation import ReplyStats, SegmentStart, stream_reply

    stats = ReplyStats()
    pieces: list[str] = []
    for event in stream_reply(
        model,
        processor,
        history,
        text,
        media,
        stats,
        system=system,
        **generation_settings(args, prefix_cache),
    ):
        if isinstance(event, SegmentStart):
            print(f"[{event.label()}]", file=sys.stderr, flush=True)
            event_text = "\n" if event.index > 1 else ""
        else:
            event_text = event
        pieces.append(event_text)
        if not args.json:
            sys.stdout.write(event_text)
            sys.stdout.flush()
    reply = "".join(pieces)
    if args.json:
        print(json.dumps({"text": reply, **stats.as_dict()}, ensure_ascii=False), flush=True)
    else:
        print(flush=True)
    print(stats.summary(), file=sys.stderr, flush=True)
    return reply


def chat(
    model: Any,
    processor: Any,
    args: argparse.Namespace,
    system: str | None,
    first_media: Media,
    prefix_cache: PrefixCache | None,
) -> None:
    """Read turns from stdin until /quit or end of input; a refused turn is reported and skipped."""
    from .conversation import Media, assistant_message, load_media, user_message
    from .processing import MediaError

    print(CHAT_HELP, file=sys.stderr, flush=True)
    history: list[dict] = []
    attached: dict[str, list[str]] = {"image": [], "audio": [], "video": []}
    pending_media = first_media
    pending_text = args.prompt
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
            reply = answer(model, processor, history, text, media, args, system, prefix_cache)
        except MediaError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            continue
        except KeyboardInterrupt:
            print("\n(reply stopped)", file=sys.stderr, flush=True)
            continue
        finally:
            attached = {"image": [], "audio": [], "video": []}
            pending_media = Media()
        history += [user_message(text, media), assistant_message(reply)]


def run(argv: Sequence[str] | None) -> int:
    if sys.stdout is None:
        raise BadInput("standard output is closed: there is nowhere to write the reply")
    args = build_parser().parse_args(argv)
    for name in ("prompt", "system", "task_reminder"):
        utf8_text(getattr(args, name), f"--{name.replace('_', '-')}")
    if not args.chat and args.prompt is None:
        raise BadInput(f"--prompt is required (or use --chat) (see {PROG} --help)")
    system = read_system_prompt(args.system_file) if args.system_file else args.system
    from .budgets import prefix_cache_bytes
    from .conversation import load_media
    from .prefix_cache import PrefixCache

    # Media are checked before the model loads: a bad file costs no wait.
    media = load_media(args.image, args.audio, args.video)
    model, processor, folder = load_model(args.model)
    prefix_cache = (
        None
        if args.no_prefix_cache
        else PrefixCache.for_checkpoint(folder, max_bytes=prefix_cache_bytes(model.nbytes))
    )
    if args.chat:
        chat(model, processor, args, system, media, prefix_cache)
    else:
        answer(model, processor, [], args.prompt, media, args, system, prefix_cache)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit code (also raised as SystemExit by the script wrappers)."""
    try:
        return run(argv)
    except InputError as e:
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
