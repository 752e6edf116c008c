"""Decode steps, ours against mlx-vlm's gemma4_unified, at long contexts without prefilling them.

    python benchmarks/bench_decode.py CKPT [--contexts 512,3072,8192,32768] [--steps 12]

Both libraries' caches are filled with the same random keys/values (ours: one tensor on global K=V
layers) to each context, then greedy decode steps are timed one at a time, alternating: each step is
the per-token work of the library's own loop (ours: `stream_generate`, the forward of one token and
an argmax of its logits; mlx-vlm: `generate_step`, the forward, the logsumexp normalization and the
argmax). A step is evaluated before the next starts, so the figures are step latencies, without the
overlap of graph building that both loops get from `mx.async_eval`. `bench_generate.py` times the
whole loops, but a long context there costs minutes of prefill for a few noisy decode rounds.
The "shared" column times alone the matrix products both libraries compute alike in a step (the
projections and MLPs of one token, and the tied head: see `bench_prefill_split.py`); the rest of a
step is where the two can differ. Writes benchmarks/results/decode-steps.json.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import mlx.core as mx
from bench_generate import (
    RESULTS,
    checkpoint_parser,
    fill_caches,
    load_both,
    machine_description,
    machine_name,
)
from bench_prefill_split import time_shared


def bench_context(ours, theirs, context: int, steps: int) -> dict:
    ours_cache, vlm_cache = fill_caches(ours, theirs, context, random=True)
    return dict(context=context, **time_steps(ours, theirs, ours_cache, vlm_cache, steps))


def time_steps(ours, theirs, ours_cache: list, vlm_cache: list, steps: int) -> dict:
    """Each library's greedy decode step over its filled cache, `steps` times, alternating: every step's
    seconds, the medians and their ratio (mlx-vlm's over ours: above 1, ours is faster)."""
    token = mx.array([[5]])

    def ours_step() -> mx.array:
        logits = ours.forward_embeddings(ours.embed_text(token), cache=ours_cache)[:, -1, :]
        return mx.argmax(logits, axis=-1)

    def vlm_step() -> mx.array:
        logits = theirs.language_model(token, cache=vlm_cache).logits[:, -1, :]
        return mx.argmax(logits - mx.logsumexp(logits, axis=-1, keepdims=True), axis=-1)

    times = {"ours": [], "mlx_vlm": []}
    for _ in range(steps):
        for name, step in (("ours", ours_step), ("mlx_vlm", vlm_step)):
            start = time.perf_counter()
            mx.eval(step())
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    return {
        "step_s": times,
        "median_step_s": median,
        "decode_ratio_ours_over_mlx_vlm": median["mlx_vlm"] / median["ours"],
    }


def main() -> None:
    parser = checkpoint_parser(__doc__)
    parser.add_argument("--contexts", default="512,3072,8192,32768")
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    path = Path(args.checkpoint)
    ours, theirs = load_both(path)
    contexts = [int(c) for c in args.contexts.split(",") if c]
    print(f"checkpoint {path}, {args.steps} steps each (medians), device {mx.default_device()} ({machine_name()})")
    shared = time_shared(ours, 1, args.steps)
    print(f"{'context':>10}{'ours ms':>12}{'mlx-vlm ms':>12}{'shared ms':>12}{'decode ours/vlm':>18}")
    rows = []
    for context in contexts:
        row = bench_context(ours, theirs, context, args.steps)
        rows.append(row)
        ms = {name: 1e3 * t for name, t in row["median_step_s"].items()}
        print(f"{context:>10}{ms['ours']:12.1f}{ms['mlx_vlm']:12.1f}{1e3 * shared:12.1f}"
              f"{row['decode_ratio_ours_over_mlx_vlm']:18.2f}")
        mx.clear_cache()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "decode-steps.json"
    out.write_text(json.dumps({
        "command": f"python benchmarks/bench_decode.py {path} --contexts {args.contexts} --steps {args.steps}",
        "machine": machine_description(),
        "checkpoint_text_config": ours.config.raw.get("text_config"),
        "shared_products_step_s": shared,
        "rows": rows,
    }, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
