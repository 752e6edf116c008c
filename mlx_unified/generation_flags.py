"""The generation flags of the command lines (`generate.py`, the server, the app), in the peers' spellings.

Flags are parsed as plain numbers and checked by `GenerationParams`, the one validation that the Python
API and the server's requests go through too; a refused value is a `ParameterError` naming the flag
(front ends print it as one line and exit 2). Sampling flags left unset take the checkpoint's
`generation_config.json` (`generation_params.checkpoint_sampling`), as mlx-vlm does, then the API's
defaults (greedy).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from .generation_params import (
    CHECKPOINT_SAMPLING,
    DEFAULT_KV_GROUP_SIZE,
    DEFAULT_QUANTIZED_KV_START,
    GenerationParams,
    ParameterError,
    check_template_variables,
)

# API parameter -> the flag that sets it (mlx-lm's or mlx-vlm's name for it), to name a refused value.
FLAG_NAMES = {
    "max_tokens": "--max-tokens",
    "temperature": "--temperature",
    "top_p": "--top-p",
    "top_k": "--top-k",
    "min_p": "--min-p",
    "repetition_penalty": "--repetition-penalty",
    "repetition_context_size": "--repetition-context-size",
    "presence_penalty": "--presence-penalty",
    "frequency_penalty": "--frequency-penalty",
    "seed": "--seed",
    "prefill_chunk_size": "--prefill-step-size",
    "max_kv_size": "--max-kv-size",
    "num_draft_tokens": "--num-draft-tokens",
    "kv_bits": "--kv-bits",
    "kv_group_size": "--kv-group-size",
    "quantized_kv_start": "--quantized-kv-start",
    "extra_eos_tokens": "--extra-eos-token",
}
FROM_CHECKPOINT = "default: the checkpoint's generation_config.json, else"


def template_variables(text: str) -> dict[str, Any]:
    """`--chat-template-config`: a JSON object of chat-template variables, checked as the API checks
    them (`check_template_variables`: no template, no tokenizing or framing switches)."""
    try:
        value = json.loads(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not JSON ({error})") from error
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"enable_thinking\": true}'")
    try:
        return check_template_variables(value, "")
    except ParameterError as error:
        key = error.param.lstrip(".")
        raise argparse.ArgumentTypeError(f"{key}: {error.reason}" if key else error.reason) from None


def add_generation_flags(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    """The sampling, penalty, prefill and chat-template flags, with mlx-lm's and mlx-vlm's spellings."""
    parser.add_argument(
        "--max-tokens", "-m", type=int, default=max_tokens, metavar="N", help=f"most tokens to generate ({max_tokens})"
    )
    parser.add_argument(
        "--temperature",
        "--temp",
        dest="temperature",
        type=float,
        metavar="T",
        help=f"sampling temperature, 0 is greedy ({FROM_CHECKPOINT} 0)",
    )
    parser.add_argument("--top-p", type=float, metavar="P", help=f"nucleus sampling mass ({FROM_CHECKPOINT} 1.0: off)")
    parser.add_argument("--top-k", type=int, metavar="K", help=f"sample among the k likeliest tokens ({FROM_CHECKPOINT} 0: off)")
    parser.add_argument("--min-p", type=float, default=0.0, metavar="P", help="min-p sampling threshold (0: off)")
    parser.add_argument(
        "--repetition-penalty",
        type=float,
        metavar="X",
        help="mlx-lm's multiplicative penalty on the logits of recent tokens (1: off)",
    )
    parser.add_argument(
        "--repetition-context-size", type=int, default=20, metavar="N", help="recent tokens the repetition penalty reads (20)"
    )
    parser.add_argument(
        "--presence-penalty", type=float, default=0.0, metavar="X", help="subtract this from recent tokens' logits (0: off)"
    )
    parser.add_argument(
        "--frequency-penalty",
        type=float,
        default=0.0,
        metavar="X",
        help="subtract this times each recent token's count from its logit (0: off)",
    )
    parser.add_argument(
        "--prefill-step-size",
        dest="prefill_chunk_size",
        type=int,
        metavar="N",
        help="prompt tokens per prefill pass (default 2048); fewer take less memory",
    )
    parser.add_argument(
        "--max-kv-size",
        type=int,
        metavar="N",
        help="most positions the KV cache holds, prompt and reply together: the reply ends there "
        "(default: the model's context). No position is dropped, unlike mlx-lm's rotating cache",
    )
    add_kv_cache_flags(parser)
    parser.add_argument(
        "--draft-model",
        metavar="PATH_OR_ID",
        help="MTP drafter for speculative decoding (gemma4_unified_assistant: a folder or hub id); "
        "greedy replies are unchanged, sampled ones keep their distribution",
    )
    parser.add_argument(
        "--num-draft-tokens",
        default="auto",
        metavar="N|auto",
        help="with --draft-model, tokens drafted per round: auto (default) follows the acceptance, down to "
        "plain decoding; N a fixed count (0: plain decoding)",
    )
    parser.add_argument(
        "--chat-template-config",
        "--chat-template-args",
        dest="chat_template_kwargs",
        type=template_variables,
        default={},
        metavar="JSON",
        help="variables for the chat template, e.g. '{\"enable_thinking\": true}'",
    )


def add_kv_cache_flags(parser: argparse.ArgumentParser) -> None:
    """mlx-lm's KV-cache quantization flags (the app takes them alone)."""
    parser.add_argument(
        "--kv-bits",
        type=int,
        metavar="B",
        help="quantize the KV cache to 4 or 8 bits, as mlx-lm (default: not quantized); "
        "--max-kv-size may be given with it",
    )
    parser.add_argument(
        "--kv-group-size",
        type=int,
        default=DEFAULT_KV_GROUP_SIZE,
        metavar="G",
        help=f"group size of the KV cache quantization: 32, 64 or 128 ({DEFAULT_KV_GROUP_SIZE})",
    )
    parser.add_argument(
        "--quantized-kv-start",
        type=int,
        default=DEFAULT_QUANTIZED_KV_START,
        metavar="N",
        help=f"quantize the KV cache once it holds N positions ({DEFAULT_QUANTIZED_KV_START})",
    )


def generation_params(
    args: argparse.Namespace, checkpoint: Mapping[str, Any] | None = None, vocab_size: int | None = None
) -> GenerationParams:
    """The flags in `args` as checked GenerationParams. Unset sampling flags take `checkpoint`
    (`checkpoint_sampling`), then the defaults. Raises ParameterError naming the flag; without
    `vocab_size` (before the model loads) token ids are not checked against the vocabulary."""
    values = {f.name: getattr(args, f.name) for f in fields(GenerationParams) if hasattr(args, f.name)}
    for name in CHECKPOINT_SAMPLING:
        if values.get(name) is None:
            values.pop(name, None)
            if checkpoint and name in checkpoint:
                values[name] = checkpoint[name]
    try:
        return GenerationParams(**values).validate(vocab_size)
    except ParameterError as e:
        raise e.renamed(FLAG_NAMES) from None
