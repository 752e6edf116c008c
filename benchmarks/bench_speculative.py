"""Speculative decoding with an MTP drafter: ours and mlx-vlm's MTP on the same target and drafter
checkpoints, the same prompts, in one process, alternating.

    python benchmarks/bench_speculative.py [--regimes random,trained] [--decode-tokens 64] [--rounds 3]

Two regimes:
- `random`: the scaled checkpoint of bench_generate (6 layers, hidden 256, window 128, the 262144-token
  vocabulary; made once under benchmarks/checkpoints/scaled) and a random drafter for it (2 layers of its
  width, the released kind of head: 2048 centroids, top 32), whose drafts are all but never accepted:
  speculative decoding must then cost almost nothing (ours >= 0.95x plain decoding).
- `trained`: the target fine-tuned on patterned text and the drafter distilled from it by
  `benchmarks/train_drafter.py` (run it first), on held-out prompts of its corpus: a realistic acceptance.

Each round runs, in turn: ours plain, ours speculative (auto draft length), ours with K drafts a round,
mlx-vlm plain, mlx-vlm's MTP with K drafts a round (its block size K + 1), all greedy through each
library's own generation loop (`generation.generate_step`, `mlx_vlm.generate.ar.generate_step`), timed
from outside: decode tokens/s after the first token. Acceptance is accepted / drafted tokens, mean accepted
length the tokens emitted per verifying target pass, as mlx-vlm reports them. Each speculative run must
give its library's plain greedy tokens.

Then the parts a projection needs, measured here: one target pass of n = 1..8 tokens at the prompt's
context against a decode step (`verify_cost`), and one draft step against a decode step. This backend is
compute-bound (the CPU), so verifying k + 1 tokens costs more than one step; on a bandwidth-bound GPU a
pass of a few tokens reads the same weights and costs about one step. The projection (labelled so) takes
the released 12B 4-bit pair's bytes read per step (target, and a draft step of the released drafter with
its centroid head), the trained regime's measured acceptance, and that cost model, and gives the
speed-up it implies at each k.

Writes benchmarks/results/speculative.json (command, machine, every run, medians, ratios, costs, projection).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from bench_generate import SCALED_SHAPES, machine_description

import mlx_unified
from mlx_unified.cache import snapshot
from mlx_unified.config import released_config
from mlx_unified.convert.estimate import weights_bytes
from mlx_unified.convert.recipes import base_params, quantized_outputs
from mlx_unified.drafter import DrafterConfig, load_drafter
from mlx_unified.generation import generate_step
from mlx_unified.prefill import prefill
from mlx_unified.speculative import SpeculativeStats, prepare_cache, shared_kv
from mlx_unified.testing import tiny_checkpoint, tiny_drafter

HERE = Path(__file__).parent
CHECKPOINTS = HERE / "checkpoints"
RESULTS = HERE / "results" / "speculative.json"
SCALED = CHECKPOINTS / "scaled"
RANDOM_DRAFTER = CHECKPOINTS / "scaled-random-drafter"
TRAINED_TARGET, TRAINED_DRAFTER = CHECKPOINTS / "drafter-target", CHECKPOINTS / "drafter-trained"
# The released drafter (google/gemma-4-12B-it-assistant) as its config describes it.
RELEASED_DRAFTER = {
    "model_type": "gemma4_unified_assistant",
    "backbone_hidden_size": 3840,
    "use_ordered_embeddings": True,
    "num_centroids": 2048,
    "centroid_intermediate_top_k": 32,
    "tie_word_embeddings": True,
    "text_config": {
        "hidden_size": 1024, "intermediate_size": 8192, "num_hidden_layers": 4, "num_attention_heads": 16,
        "num_key_value_heads": 8, "head_dim": 256, "global_head_dim": 512, "num_global_key_value_heads": 1,
        "attention_k_eq_v": True, "vocab_size": 262144, "sliding_window": 1024, "num_kv_shared_layers": 4,
        "layer_types": ["sliding_attention"] * 3 + ["full_attention"],
    },
}


def regime_checkpoints(regime: str) -> tuple[Path, Path]:
    if regime == "random":
        if not (SCALED / "config.json").exists():
            tiny_checkpoint(SCALED, seed=0, **SCALED_SHAPES)
        if not (RANDOM_DRAFTER / "config.json").exists():
            tiny_drafter(RANDOM_DRAFTER, SCALED, seed=1, centroids=2048)
        return SCALED, RANDOM_DRAFTER
    if not (TRAINED_TARGET / "config.json").exists() or not (TRAINED_DRAFTER / "config.json").exists():
        sys.exit(f"{TRAINED_TARGET} or {TRAINED_DRAFTER} is missing: run benchmarks/train_drafter.py first")
    return TRAINED_TARGET, TRAINED_DRAFTER


def regime_prompts(regime: str, tokenizer, count: int, tokens: int) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    if regime == "random":
        return [np.concatenate([[[2]], rng.integers(20, 600, (1, tokens - 1))], axis=1) for _ in range(count)]
    from train_drafter import PROMPT_TOKENS, corpus_windows

    return [row[None, :PROMPT_TOKENS] for row in corpus_windows(tokenizer, rng, count)]


def timed(tokens) -> tuple[list[int], float]:
    """Drain a (token, ...) generator: the tokens and the decode rate after the first one."""
    out, first = [], None
    for item in tokens:
        out.append(int(item[0]))
        first = first or time.perf_counter()
    last = time.perf_counter()
    return out, (len(out) - 1) / (last - first) if len(out) > 1 else 0.0


def run_ours(model, drafter, ids: np.ndarray, decode_tokens: int, drafts) -> dict:
    stats = SpeculativeStats()
    options = {} if drafter is None else {"draft_model": drafter, "num_draft_tokens": drafts, "draft_stats": stats}
    tokens, tps = timed(generate_step(model, {"input_ids": ids}, max_tokens=decode_tokens, **options))
    return {"tokens": tokens, "decode_tps": tps, "acceptance": stats.acceptance_rate,
            "mean_accepted_length": stats.mean_accepted_length, "rounds": stats.rounds, "drafted": stats.drafted}


def run_mlx_vlm(model, drafter, ids: np.ndarray, decode_tokens: int, drafts: int) -> dict:
    from mlx_vlm.generate.ar import generate_step as vlm_generate_step
    from mlx_vlm.speculative.common import speculative_stats_since, speculative_stats_snapshot

    options = {}
    if drafter is not None:
        options = {"draft_model": drafter, "draft_kind": "mtp", "draft_block_size": drafts + 1}
        before = speculative_stats_snapshot(drafter)
    tokens, tps = timed(vlm_generate_step(mx.array(ids), model, None, None, max_tokens=decode_tokens,
                                          temperature=0.0, **options))
    result = {"tokens": tokens, "decode_tps": tps}
    if drafter is not None:
        rounds, accepted, drafted = speculative_stats_since(drafter, before)
        rounds, accepted, drafted = rounds or 0, accepted or 0, drafted or 0
        result |= {"acceptance": accepted / drafted if drafted else 0.0,
                   "mean_accepted_length": (accepted + rounds) / rounds if rounds else 0.0,
                   "rounds": rounds, "drafted": drafted}
    return result


RUNS = ("ours plain", "ours speculative auto", "ours speculative K", "mlx-vlm plain", "mlx-vlm MTP K")


def bench_regime(regime: str, args) -> dict:
    from mlx_vlm.utils import load_model as vlm_load_model
    from transformers import AutoTokenizer

    target, drafter_path = regime_checkpoints(regime)
    tokenizer = AutoTokenizer.from_pretrained(target)
    ours, ours_drafter = mlx_unified.load_model(target), load_drafter(drafter_path)
    theirs, theirs_drafter = vlm_load_model(target), vlm_load_model(drafter_path)
    prompts = regime_prompts(regime, tokenizer, args.prompts, args.prompt_tokens)
    k = args.num_draft_tokens

    def run(name: str, ids: np.ndarray, decode_tokens: int) -> dict:
        if name == "ours plain":
            return run_ours(ours, None, ids, decode_tokens, None)
        if name == "ours speculative auto":
            return run_ours(ours, ours_drafter, ids, decode_tokens, "auto")
        if name == "ours speculative K":
            return run_ours(ours, ours_drafter, ids, decode_tokens, k)
        if name == "mlx-vlm plain":
            return run_mlx_vlm(theirs, None, ids, decode_tokens, k)
        return run_mlx_vlm(theirs, theirs_drafter, ids, decode_tokens, k)

    for name in RUNS:  # warm-up: kernels and compiled functions built outside the timings
        run(name, prompts[0], 8)
    runs: dict[str, list[dict]] = {name: [] for name in RUNS}
    for round_index in range(args.rounds):
        for p, ids in enumerate(prompts):
            for name in RUNS:
                result = run(name, ids, args.decode_tokens)
                runs[name].append(result | {"round": round_index, "prompt": p})
            print(f"  {regime} round {round_index + 1}/{args.rounds}, prompt {p + 1}/{len(prompts)}", flush=True)
    identical = {
        "ours": all(a["tokens"] == b["tokens"] == c["tokens"] for a, b, c in
                    zip(runs["ours plain"], runs["ours speculative auto"], runs["ours speculative K"], strict=True)),
        "mlx_vlm": all(a["tokens"] == b["tokens"] for a, b in zip(runs["mlx-vlm plain"], runs["mlx-vlm MTP K"], strict=True)),
    }
    median = {name: {key: statistics.median(r[key] for r in results) for key in results[0] if key not in ("tokens", "round", "prompt")}
              for name, results in runs.items()}
    ratio = {
        "ours speculative auto / ours plain": median["ours speculative auto"]["decode_tps"] / median["ours plain"]["decode_tps"],
        "ours speculative K / ours plain": median["ours speculative K"]["decode_tps"] / median["ours plain"]["decode_tps"],
        "mlx-vlm MTP K / mlx-vlm plain": median["mlx-vlm MTP K"]["decode_tps"] / median["mlx-vlm plain"]["decode_tps"],
        "ours speculative auto / mlx-vlm MTP K": median["ours speculative auto"]["decode_tps"] / median["mlx-vlm MTP K"]["decode_tps"],
        "ours plain / mlx-vlm plain": median["ours plain"]["decode_tps"] / median["mlx-vlm plain"]["decode_tps"],
    }
    costs = pass_costs(ours, ours_drafter, prompts[0], args.cost_repeats)
    for runs_of in runs.values():
        for r in runs_of:
            r["tokens"] = len(r["tokens"])
    return {"target": str(target.relative_to(HERE.parent)), "drafter": str(drafter_path.relative_to(HERE.parent)),
            "prompts": len(prompts), "prompt_tokens": int(prompts[0].shape[1]), "identical_greedy_tokens": identical,
            "median": median, "ratio": ratio, "costs": costs, "runs": runs}


def pass_costs(model, drafter, ids: np.ndarray, repeats: int) -> dict:
    """Median seconds of one target pass of n = 1..8 tokens after the prompt (relative to n = 1, a decode
    step), each from the same cache (its new positions trimmed off again), and of one draft step."""
    cache = model.make_cache()
    prepare_cache(cache, 7)
    logits, hidden = prefill(model, {"input_ids": ids}, cache, return_hidden=True)
    base = snapshot(cache)
    seconds = {}
    for n in range(1, 9):
        times = []
        for _ in range(repeats):
            work = snapshot(base)
            tokens = mx.array(ids[:, -n:])
            start = time.perf_counter()
            mx.eval(model.forward_embeddings(model.embed_text(tokens), cache=work, logits_to_keep=n))
            times.append(time.perf_counter() - start)
        seconds[n] = statistics.median(times)
    target = shared_kv(model, cache)
    embedded = model.language_model.embed(mx.array(ids[:, -1:]))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(drafter(embedded, hidden[:, -1:], target, cache[0].offset))
        times.append(time.perf_counter() - start)
    return {"pass_seconds": seconds, "verify_over_decode_step": {n: seconds[n] / seconds[1] for n in seconds},
            "draft_step_over_decode_step": statistics.median(times) / seconds[1]}


def released_step_bytes() -> dict:
    """Bytes read per step on a bandwidth-bound device, the released pair at 4 bits (group 64): a target
    decode step reads all its weights (the KV cache at a short context is small beside them); a draft
    step reads the drafter's layers, its centroids and the top 32 clusters' embedding rows (1/64 of the
    vocabulary), not its whole embedding."""
    q4 = base_params(4, 64)
    drafter = DrafterConfig.from_dict(RELEASED_DRAFTER)
    whole = weights_bytes(drafter, q4)
    shape = (drafter.text.vocab_size, drafter.text.hidden_size)
    embedding = sum(t.nbytes for t in quantized_outputs("model.embed_tokens.weight", shape, q4, mx.bfloat16))
    scored = embedding * drafter.centroid_intermediate_top_k // drafter.num_centroids
    return {"target_bytes": weights_bytes(released_config(), q4), "drafter_bytes": whole,
            "draft_step_bytes": whole - embedding + scored}


def per_draft_acceptance(mean_accepted_drafts: float, k: int) -> float:
    """The per-draft acceptance a whose rounds of k drafts accept a + a^2 + ... + a^k on average."""
    low, high = 0.0, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if sum(mid**i for i in range(1, k + 1)) < mean_accepted_drafts else (low, mid)
    return low


def projection(acceptance: float, step_bytes: dict, verify_extra_per_token: float) -> dict:
    """Projected decode speed-up at each k for a bandwidth-bound device, from a per-draft acceptance and
    the bytes a round reads: a round of k drafts emits (1 - a^(k+1)) / (1 - a) tokens and costs one target
    step (plus `verify_extra_per_token` of a step per extra verified token) and k draft steps."""
    draft_step = step_bytes["draft_step_bytes"] / step_bytes["target_bytes"]
    rows = {}
    for k in range(1, 8):
        tokens = (1 - acceptance ** (k + 1)) / (1 - acceptance) if acceptance < 1 else k + 1.0
        rows[k] = tokens / (1 + k * verify_extra_per_token + k * draft_step)
    return {"draft_step_over_target_step": draft_step, "speedup_by_k": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regimes", default="random,trained")
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=256, help="the random regime's prompt length")
    parser.add_argument("--num-draft-tokens", type=int, default=3, help="K of the fixed-length runs")
    parser.add_argument("--cost-repeats", type=int, default=7)
    args = parser.parse_args()
    results = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
               "machine": machine_description(), "regimes": {}}
    for regime in [r for r in args.regimes.split(",") if r]:
        print(f"regime {regime}", flush=True)
        result = results["regimes"][regime] = bench_regime(regime, args)
        print(f"{'run':28}{'tokens/s':>10}{'acceptance':>12}{'mean accepted':>15}")
        for name, m in result["median"].items():
            print(f"{name:28}{m['decode_tps']:10.2f}{m.get('acceptance', 0):12.3f}{m.get('mean_accepted_length', 0):15.2f}")
        for name, value in result["ratio"].items():
            print(f"  {name}: {value:.2f}x")
        costs = result["costs"]
        print("  one pass of n tokens / one decode step: "
              + ", ".join(f"n={n}: {v:.2f}" for n, v in costs["verify_over_decode_step"].items())
              + f"; one draft step: {costs['draft_step_over_decode_step']:.2f}")
        print(f"  greedy tokens identical to plain: {result['identical_greedy_tokens']}")
    if "trained" in results["regimes"]:
        fixed = results["regimes"]["trained"]["median"]["ours speculative K"]
        measured = per_draft_acceptance(fixed["mean_accepted_length"] - 1, args.num_draft_tokens)
        step_bytes = released_step_bytes()
        results["projection"] = {
            "label": "PROJECTION, not a measurement: the released 12B 4-bit pair on a bandwidth-bound device",
            "assumptions": "a pass reads the weights once whatever its few tokens (verify_extra_per_token of a step "
                           "per extra token for the compute that does not hide under the memory time); a draft step "
                           "reads the drafter's layers, centroids and 1/64 of its embedding; the per-draft "
                           "acceptance whose rounds of K drafts accept what ours accepted in the trained regime",
            "acceptance": measured,
            "step_bytes": step_bytes,
            "by_verify_extra_per_token": {x: projection(measured, step_bytes, x) for x in (0.0, 0.02, 0.05)},
        }
        p = results["projection"]["by_verify_extra_per_token"][0.02]
        print(f"PROJECTION (bandwidth-bound device, released 12B 4-bit pair, per-draft acceptance {measured:.3f}, 2% per extra "
              "verified token): " + ", ".join(f"k={k}: {v:.2f}x" for k, v in p["speedup_by_k"].items()))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
