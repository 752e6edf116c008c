"""The server's command line: flags (mlx-lm's and mlx-vlm's names where they have one), loading, serving.

Exit codes: 0 after a clean shutdown, 2 for a bad flag, a checkpoint that does not load or a port that
is taken (one line on stderr), 1 anything else.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ..cli import ArgumentParser, BadInput, port_number, positive_int
from ..errors import InputError
from ..generation_flags import FLAG_NAMES, add_generation_flags, generation_params
from ..generation_params import ParameterError
from .chat import DEFAULT_MAX_TOKENS

PROG = "mlx-unified-server"
API_KEY_VARIABLE = "MLX_UNIFIED_SERVER_API_KEY"
EXIT_OK, EXIT_BAD_INPUT = 0, 2


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog=PROG,
        description="Serve Gemma 4 unified through OpenAI's API (chat completions, transcriptions, models).",
        epilog="Exit codes: 0 clean shutdown, 2 bad flags, checkpoint or port, 1 anything else. "
        "Limits and error codes: docs/SERVER.md.",
    )
    parser.add_argument("--model", required=True, help="local checkpoint folder or hub id (owner/name)")
    parser.add_argument("--served-model-name", help="the model id clients send (default: --model as given)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=port_number, default=8080, help="port (8080)")
    parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_VARIABLE),
        help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_VARIABLE}; none: no key asked)",
    )
    generation = parser.add_argument_group("what a request gets for the fields it leaves out")
    add_generation_flags(generation, max_tokens=DEFAULT_MAX_TOKENS)
    generation.add_argument(
        "--enable-thinking", action="store_true", help="think before answering unless a request says otherwise"
    )
    parser.add_argument(
        "--max-queue", type=positive_int, default=8, help="requests that may wait for the model; more get a 503 (8)"
    )
    parser.add_argument("--max-request-mb", type=positive_int, default=64, help="largest request body in MB (64)")
    parser.add_argument(
        "--media-root",
        action="append",
        default=[],
        type=Path,
        metavar="DIR",
        help="a folder whose files requests may name as local media (repeatable; default: none)",
    )
    parser.add_argument(
        "--no-prefix-cache",
        action="store_true",
        help="do not share prompt prefixes across requests (in memory and in ~/.cache/mlx-unified)",
    )
    # The flag's earlier name, still accepted.
    parser.add_argument("--no-prompt-cache", dest="no_prefix_cache", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def check_flags(args: argparse.Namespace) -> None:
    """Refuse what would fail later, before the model loads."""
    generation_params(args)
    for folder in args.media_root:
        if not folder.expanduser().is_dir():
            raise BadInput(f"--media-root {folder}: not a folder")
    with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((args.host, args.port))
        except OSError as error:
            raise BadInput(f"cannot listen on {args.host}:{args.port} ({error.strerror or error})") from error


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    check_flags(args)
    if not is_loopback(args.host) and not args.api_key:
        print(
            f"{PROG}: WARNING: listening on {args.host} without --api-key: anyone who can reach this port "
            "can use the model",
            file=sys.stderr,
            flush=True,
        )
    import mlx.core as mx
    import uvicorn

    from ..budgets import prefix_cache_bytes
    from ..checkpoint import resolve
    from ..config import RANDOM_WEIGHTS_WARNING
    from ..generation import model_kv_quantization, stop_token_ids
    from ..generation_params import checkpoint_sampling
    from ..loading import load
    from ..prefix_cache import PrefixCache
    from .app import Service, create_app
    from .chat import ServerDefaults
    from .media import MediaPolicy
    from .worker import Worker

    path = resolve(args.model)
    print(f"Loading {path} ...", file=sys.stderr, flush=True)
    model, processor = load(path)
    if model.config.random_weights:
        print(f"WARNING: {RANDOM_WEIGHTS_WARNING}", file=sys.stderr, flush=True)
    params = generation_params(args, checkpoint_sampling(path), model.config.text.vocab_size)
    try:  # a KV group size this model's heads cannot take: refused now, not on every request
        model_kv_quantization(model, params.kv_bits, params.kv_group_size, params.quantized_kv_start)
    except ParameterError as error:
        raise error.renamed(FLAG_NAMES) from None
    draft_model = None
    if args.draft_model:
        from ..drafter import load_drafter

        print(f"Loading the draft model {args.draft_model} ...", file=sys.stderr, flush=True)
        draft_model = load_drafter(args.draft_model, target=model.config.text)
    weights = model.nbytes + (draft_model.nbytes if draft_model is not None else 0)
    service = Service(
        model=model,
        processor=processor,
        name=args.served_model_name or args.model,
        worker=Worker(args.max_queue, after_job=mx.clear_cache),
        stop_ids=stop_token_ids(model, processor.tokenizer),
        prefix_cache=None
        if args.no_prefix_cache
        else PrefixCache.for_checkpoint(path, max_bytes=prefix_cache_bytes(weights)),
        draft_model=draft_model,
        policy=MediaPolicy.from_folders(args.media_root),
        defaults=ServerDefaults(params, args.enable_thinking, args.chat_template_kwargs),
        max_request_bytes=args.max_request_mb << 20,
        api_key=args.api_key,
        created=int(time.time()),
    )
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    print(
        f"Serving {service.name!r} on http://{args.host}:{args.port}/v1 (OpenAI API); Ctrl-C stops",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(create_app(service), host=args.host, port=args.port, log_level=args.log_level)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run(argv)
    except InputError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return EXIT_OK
