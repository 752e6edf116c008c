"""`mlx-unified-convert` (and `python convert.py`): convert, dequantize, or print the memory plan."""

from __future__ import annotations

import argparse
import signal
import sys

from mlx_unified.budgets import GB, GIB, device_gpu_limit, gpu_budget_bytes, parse_size
from mlx_unified.checkpoint import FLOAT_DTYPES, ModelLoadError
from mlx_unified.config import ConfigError, ModelConfig, load_config, released_config
from mlx_unified.convert.conversion import convert
from mlx_unified.convert.estimate import parameter_count, plan, recommend
from mlx_unified.convert.planning import ConvertError
from mlx_unified.convert.recipes import MODES, RECIPES, QuantizationError
from mlx_unified.drafter.config import DrafterConfig, load_drafter_config
from mlx_unified.footprint import DEFAULT_MIN_CONTEXT


def print_plan(config: ModelConfig, memory: str | None, min_context: int, drafter: DrafterConfig | None = None) -> None:
    """A table of candidate conversions against what the GPU may use on this (or the given) Mac; with
    a drafter, the weights counted are the model's and the drafter's, each converted as the row says."""
    real_limit = None if memory else device_gpu_limit()
    if real_limit is not None:
        budget, where = real_limit, "this Mac's GPU limit (from MLX)"
    else:
        ram = parse_size(memory or "16GB")
        budget = gpu_budget_bytes(ram)
        where = f"a {ram / GIB:g} GB Mac{'' if memory else ' (pass --memory for another size)'}: macOS default GPU limit"
    print(f"GPU memory budget: {budget / GB:.2f} GB, {where}")
    if drafter is not None:
        print("Weights include the draft model's (speculative decoding), converted alike")
    header = (
        f"{'conversion':<15} {'weights GB':>10} {'bits/w':>7} {'bf16 KV':>13} {'8-bit KV':>13} "
        f"{'4-bit KV':>13}  flags"
    )
    print(f"{'':<34} {'---- max context, with a KV cache of ----':^41}")
    print(header)
    print("-" * len(header))
    parameters = parameter_count(config)
    rows = plan(config, budget, drafter)
    for row in rows:
        print(
            f"{row.label:<15} {row.weights_bytes / GB:>10.2f} {8 * row.weights_bytes / parameters:>7.2f} "
            f"{_tokens(row.context_bf16_kv):>13} {_tokens(row.context_kv8):>13} {_tokens(row.context_kv4):>13}  "
            f"{row.convert_flags}"
        )
    best = recommend(rows, min_context)
    if best is None:
        print(f"\nNothing leaves {min_context} tokens of context in {budget / GB:.2f} GB.")
    else:
        print(
            f"\nRecommended: {best.label} (the most bits that leave at least {min_context} tokens):\n"
            f"  python convert.py --hf-path google/gemma-4-12B-it --mlx-path gemma-4-12b-mlx {best.convert_flags}"
        )
    print(
        "Context counts the KV cache (sliding layers capped at the window, one tensor on K=V layers; 8- and "
        "4-bit: generate.py --kv-bits 8 or 4) and one prefill pass's activations (passes shorten when "
        "memory is tight). The recommendation assumes a bf16 cache."
    )


def _tokens(n: int) -> str:
    return "does not fit" if n == 0 else f"{n:,}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convert.py",
        description="Convert Gemma 4 12B unified, or its MTP drafter, to MLX (optionally quantized), "
        "or plan which conversion fits.",
    )
    parser.add_argument("--hf-path", "--model", help="local folder or hub id, e.g. google/gemma-4-12B-it")
    parser.add_argument("--mlx-path", default="mlx_model", help="output folder (default: mlx_model)")
    parser.add_argument("-q", "--quantize", action="store_true", help="quantize the weights")
    parser.add_argument("--q-bits", type=int, choices=(2, 3, 4, 5, 6, 8), help="bits per weight (default 4)")
    parser.add_argument("--q-group-size", type=int, choices=(16, 32, 64, 128), help="group size (default 64)")
    parser.add_argument("--q-mode", default="affine", choices=tuple(MODES), help="quantization mode")
    parser.add_argument(
        "--recipe",
        "--quant-predicate",
        choices=tuple(RECIPES),
        help="; ".join(f"{r.name}: {r.description}" for r in RECIPES.values()),
    )
    parser.add_argument(
        "--dtype", choices=FLOAT_DTYPES, help="dtype of unquantized tensors (default: source's)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --mlx-path")
    parser.add_argument(
        "-d",
        "--dequantize",
        action="store_true",
        help="turn a converted folder (ours, mlx-vlm's or mlx-lm's, quantized or not) back into the released "
        "layout, bf16 unless --dtype",
    )
    parser.add_argument("--plan", action="store_true", help="print which conversion fits a Mac's memory")
    parser.add_argument(
        "--memory", help="the Mac's memory for --plan, e.g. 16GB (default: this Mac's, or 16GB)"
    )
    parser.add_argument(
        "--min-context",
        type=int,
        default=DEFAULT_MIN_CONTEXT,
        help=f"context the --plan recommendation must leave (tokens, default {DEFAULT_MIN_CONTEXT})",
    )
    parser.add_argument(
        "--draft-model",
        metavar="PATH",
        help="with --plan: also count this MTP drafter (speculative decoding); convert a drafter itself "
        "with --hf-path",
    )
    return parser


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.plan:
            config = load_config(args.hf_path) if args.hf_path else released_config()
            drafter = load_drafter_config(args.draft_model) if args.draft_model else None
            print_plan(config, args.memory, args.min_context, drafter)
            return 0
        if not args.hf_path:
            raise ConvertError("--hf-path is required (a local folder or a hub id)")
        signal.signal(signal.SIGTERM, _raise_interrupt)  # clean up on `kill` as on Ctrl-C
        out = convert(
            args.hf_path,
            args.mlx_path,
            quantize=args.quantize,
            q_bits=args.q_bits,
            q_group_size=args.q_group_size,
            q_mode=args.q_mode,
            recipe=args.recipe,
            dtype=args.dtype,
            overwrite=args.overwrite,
            dequantize=args.dequantize,
            report=print,
        )
    except KeyboardInterrupt:
        print(f"error: interrupted; nothing was written to {args.mlx_path}", file=sys.stderr)
        return 130
    except (ConvertError, QuantizationError, ModelLoadError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a folder the user named cannot be read or listed
        print(f"error: {e.filename or args.hf_path}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
