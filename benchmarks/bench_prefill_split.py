"""Where prefill time goes: the matrix products both libraries compute alike, and the rest.

    python benchmarks/bench_prefill_split.py CKPT [--prompt-tokens 256,512,2048] [--rounds 3]

Both libraries run the same linear layers on every prompt token: each decoder layer's q/k/v/o
projections and its three MLP products, and the tied head on the last position. Only the rest differs
(attention, norms, RoPE, masks, the caches). This times, on the same backend and in the same process:

- each library's prefill, as time to the first token of its own generation loop (as `bench_generate.py`);
- the shared products alone: those linear layers of our model, with its weights, on random inputs of
  the pass's shapes, evaluated together;
- our attention calls alone: MLX's fused attention over every query block our prefill computes
  (`attention.prefill_attention` on random queries and keys), without the norms, RoPE or residuals.

The ratio a prefill could reach if everything but the shared products took no time is
mlx-vlm's prefill time over the shared time: a ceiling for `prefill ours / mlx-vlm` on that backend.
Reaching 1.5x needs everything but the shared products, our attention calls included, to fit in
mlx-vlm's time / 1.5 - shared ("budget 1.5x").
Writes benchmarks/results/prefill-split-<prompt tokens>.json (e.g. prefill-split-256-512-2048.json).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from bench_generate import (
    RESULTS,
    checkpoint_parser,
    load_both,
    machine_description,
    machine_name,
    run_mlx_vlm,
    run_ours,
)

from mlx_unified.attention import AttentionContext, prefill_attention


def decoder_linears(layers) -> list[nn.Linear]:
    """Every Linear of these decoder layers (q/k/(v)/o projections, the MLP's three products)."""
    return [module for layer in layers for _, module in layer.named_modules() if isinstance(module, nn.Linear)]


def shared_inputs(model, prompt_tokens: int) -> dict[int, mx.array]:
    """Random inputs of a `prompt_tokens` pass for every shared product, by input width (model dtype)."""
    widths = {linear.weight.shape[1] for linear in decoder_linears(model.language_model.layers)}
    widths.add(model.config.text.hidden_size)  # the head's
    return {width: mx.random.normal((1, prompt_tokens, width)).astype(model.dtype) for width in widths}


def shared_products(model, inputs: dict[int, mx.array]) -> list[mx.array]:
    """The linear layers every library computes in a prefill pass: each decoder layer's Linears, and
    the tied head on the last position."""
    text = model.language_model
    outputs = [linear(inputs[linear.weight.shape[1]]) for linear in decoder_linears(text.layers)]
    outputs.append(text.embed_tokens.as_linear(inputs[text.config.hidden_size][:, -1:]))
    return outputs


def median_seconds(build, rounds: int) -> float:
    """Median over `rounds` of building and evaluating the arrays `build()` returns, after one untimed
    round (as the prefills get one)."""
    times = []
    for _ in range(rounds + 1):
        start = time.perf_counter()
        mx.eval(build())
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def time_shared(model, prompt_tokens: int, rounds: int) -> float:
    inputs = shared_inputs(model, prompt_tokens)
    mx.eval(inputs)
    return median_seconds(lambda: shared_products(model, inputs), rounds)


def time_attention(model, prompt_tokens: int, rounds: int) -> float:
    """Our prefill attention calls alone: every layer's query blocks over a fresh pass's keys."""
    layers = [layer.self_attn for layer in model.language_model.layers]
    inputs = []
    for attn in layers:
        shape = attn.shape
        queries = mx.random.normal((1, attn.num_heads, prompt_tokens, shape.head_dim)).astype(model.dtype)
        keys = mx.random.normal((1, shape.num_kv_heads, prompt_tokens, shape.head_dim)).astype(model.dtype)
        inputs.append((queries, keys))
    mx.eval(inputs)

    def calls() -> list[mx.array]:
        ctx = AttentionContext(0, None)
        # keys stand for the values too: the cost is the same, and K=V layers do share them
        pairs = zip(layers, inputs, strict=True)
        return [prefill_attention(q, k, k, ctx, 0, attn.sliding_window, None) for attn, (q, k) in pairs]

    return median_seconds(calls, rounds)


def bench_length(ours, theirs, tokenizer, prompt_tokens: int, rounds: int) -> dict:
    ids = np.random.default_rng(0).integers(3, 300, (1, prompt_tokens)).astype(np.int32)
    ids[0, 0] = ours.config.text.bos_token_id
    run_ours(ours, tokenizer, ids, 1)  # untimed: GPU backends compile kernels per shape on first use
    run_mlx_vlm(theirs, ids, 1)
    prefill = {"ours": [], "mlx_vlm": []}
    for _ in range(rounds):
        prefill["ours"].append(run_ours(ours, tokenizer, ids, 1)["ttft_s"])
        prefill["mlx_vlm"].append(run_mlx_vlm(theirs, ids, 1)["ttft_s"])
        mx.clear_cache()
    shared = time_shared(ours, prompt_tokens, rounds)
    attention = time_attention(ours, prompt_tokens, rounds)
    median = {name: statistics.median(t) for name, t in prefill.items()}
    return {
        "prompt_tokens": prompt_tokens,
        "prefill_s": prefill,
        "median_prefill_s": median,
        "shared_products_s": shared,
        "our_attention_calls_s": attention,
        "budget_for_1_5x_s": median["mlx_vlm"] / 1.5 - shared,
        "rest_s": {name: t - shared for name, t in median.items()},
        "prefill_ratio_ours_over_mlx_vlm": median["mlx_vlm"] / median["ours"],
        "ceiling_ratio": median["mlx_vlm"] / shared,
    }


def main() -> None:
    parser = checkpoint_parser(__doc__)
    parser.add_argument("--prompt-tokens", default="256,512,2048")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    path = Path(args.checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ours, theirs = load_both(path)
    lengths = [int(n) for n in args.prompt_tokens.split(",") if n]
    rows = [bench_length(ours, theirs, tokenizer, n, args.rounds) for n in lengths]
    print(f"\ncheckpoint {path}, {args.rounds} rounds (medians), device {mx.default_device()} ({machine_name()})")
    print(f"{'tokens':>7}{'ours s':>9}{'vlm s':>9}{'ratio':>7}{'shared s':>10}{'ours rest':>11}{'vlm rest':>10}"
          f"{'ceiling':>9}{'budget 1.5x':>13}{'our attention':>15}")
    for r in rows:
        m, rest = r["median_prefill_s"], r["rest_s"]
        print(f"{r['prompt_tokens']:7d}{m['ours']:9.3f}{m['mlx_vlm']:9.3f}{r['prefill_ratio_ours_over_mlx_vlm']:7.2f}"
              f"{r['shared_products_s']:10.3f}{rest['ours']:11.3f}{rest['mlx_vlm']:10.3f}{r['ceiling_ratio']:9.2f}"
              f"{r['budget_for_1_5x_s']:13.3f}{r['our_attention_calls_s']:15.3f}")
    out = RESULTS / f"prefill-split-{'-'.join(map(str, lengths))}.json"
    out.write_text(json.dumps({
        "command": f"python benchmarks/bench_prefill_split.py {path} --prompt-tokens {args.prompt_tokens} "
                   f"--rounds {args.rounds}",
        "machine": machine_description(),
        "rows": rows,
    }, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
