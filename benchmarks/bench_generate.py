"""Ours against mlx-vlm's gemma4_unified on one checkpoint, in one process, alternating.

    python benchmarks/bench_generate.py CKPT [--prompt-tokens 512] [--decode-tokens 32] [--rounds 3]
    python benchmarks/bench_generate.py --make-checkpoint DIR     # a scaled random checkpoint (bf16)

Each round runs both libraries' own generation loops (ours: `stream_generate`; mlx-vlm:
`mlx_vlm.generate.ar.generate_step`) on the same token ids, greedy, and times them from outside:
time to first token, prefill tokens/s (prompt tokens / TTFT), decode tokens/s after the first token,
peak memory (MLX's allocator) and the KV cache bytes left after generation. The KV table then fills
both libraries' caches for the released 12B shapes with dummy bf16 keys/values at long contexts
(no weights needed) and reports their bytes. Writes benchmarks/results/generate-<prompt tokens>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

import mlx_unified
from mlx_unified.config import ModelConfig
from mlx_unified.generation import stream_generate
from mlx_unified.testing import tiny_checkpoint

RESULTS = Path(__file__).parent / "results"
# A scaled model with the released proportions: 5:1 sliding/global, K=V global layers with one KV
# head of twice the head dim, 16 query heads, GeGLU 4x, the full 262144-token vocabulary.
# The window is scaled with the prompt: 128 of a 2048-token prompt, as 1024 is of a 16K prompt.
SCALED_SHAPES = dict(
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=6,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=32,
    global_head_dim=64,
    num_global_key_value_heads=1,
    sliding_window=128,
    vocab_size=262144,
)
KV_CONTEXTS = (8192, 32768, 131072, 262144)


class TokenizerOnly:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer


def run_ours(model, tokenizer, ids: np.ndarray, decode_tokens: int) -> dict:
    start = time.perf_counter()
    first = last = None
    count = 0
    # Library defaults (chunked prefill); the prefix cache is off so every round prefills the whole prompt.
    for response in stream_generate(
        model, TokenizerOnly(tokenizer), {"input_ids": ids}, max_tokens=decode_tokens, use_prompt_cache=False
    ):
        now = time.perf_counter()
        first = first or now
        last, count = now, count + 1
        peak = response.peak_memory_gb
    return _stats(ids.shape[1], start, first, last, count, peak)


def run_mlx_vlm(model, ids: np.ndarray, decode_tokens: int) -> dict:
    from mlx_vlm.generate.ar import generate_step

    mx.reset_peak_memory()
    start = time.perf_counter()
    first = last = None
    count = 0
    for _ in generate_step(mx.array(ids), model, None, None, max_tokens=decode_tokens, temperature=0.0):
        now = time.perf_counter()
        first = first or now
        last, count = now, count + 1
    return _stats(ids.shape[1], start, first, last, count, mx.get_peak_memory() / 1e9)


def _stats(prompt_tokens, start, first, last, count, peak_gb) -> dict:
    ttft = first - start
    return {
        "ttft_s": ttft,
        "prefill_tps": prompt_tokens / ttft,
        "decode_tps": (count - 1) / (last - first) if count > 1 else 0.0,
        "peak_memory_gb": peak_gb,
    }


def kv_table(contexts=KV_CONTEXTS, chunk: int = 4096) -> list[dict]:
    """KV bytes of both libraries' caches for the released 12B shapes at long contexts."""
    from mlx_vlm.models.gemma4_unified import Model as VlmModel
    from mlx_vlm.models.gemma4_unified import ModelConfig as VlmConfig

    released = {"model_type": "gemma4_unified", "text_config": {}, "vision_config": {}, "audio_config": {}}
    ours_model = mlx_unified.Model(ModelConfig.from_dict(released))
    vlm_model = VlmModel(VlmConfig.from_dict(_vlm_released_config()))
    rows = []
    for context in contexts:
        ours_cache, vlm_cache = ours_model.make_cache(), vlm_model.make_cache()
        for layer, ours_c, vlm_c in zip(ours_model.language_model.layers, ours_cache, vlm_cache, strict=True):
            shape = layer.self_attn.shape
            done = 0
            while done < context:
                n = min(chunk, context - done)
                x = mx.zeros((1, shape.num_kv_heads, n, shape.head_dim), dtype=mx.bfloat16)
                if shape.k_eq_v:
                    ours_c.update_and_fetch(x)
                else:
                    ours_c.update_and_fetch(x, x)
                vlm_c.update_and_fetch(x, x)
                done += n
            # one decode step settles rotating caches to their steady state
            one = mx.zeros((1, shape.num_kv_heads, 1, shape.head_dim), dtype=mx.bfloat16)
            ours_c.update_and_fetch(one) if shape.k_eq_v else ours_c.update_and_fetch(one, one)
            vlm_c.update_and_fetch(one, one)
            mx.eval([ours_c.state, vlm_c.state])
        ours_bytes = sum(c.nbytes for c in ours_cache)
        vlm_bytes = sum(c.nbytes for c in vlm_cache)
        rows.append({"context": context, "ours_bytes": ours_bytes, "mlx_vlm_bytes": vlm_bytes,
                     "ratio": ours_bytes / vlm_bytes})
        del ours_cache, vlm_cache
        mx.clear_cache()
    return rows


def _vlm_released_config() -> dict:
    text = {
        "model_type": "gemma4_unified_text",
        "hidden_size": 3840,
        "intermediate_size": 15360,
        "num_hidden_layers": 48,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 256,
        "global_head_dim": 512,
        "num_global_key_value_heads": 1,
        "attention_k_eq_v": True,
        "sliding_window": 1024,
        "vocab_size": 262144,
        "layer_types": ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(48)],
        "final_logit_softcapping": 30.0,
        "use_bidirectional_attention": "vision",
    }
    return {
        "model_type": "gemma4_unified",
        "text_config": text,
        "vision_config": {"model_type": "gemma4_unified_vision"},
        "audio_config": {"model_type": "gemma4_unified_audio"},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?")
    parser.add_argument("--make-checkpoint", metavar="DIR")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kv-contexts", default=",".join(map(str, KV_CONTEXTS)))
    args = parser.parse_args()
    if args.make_checkpoint:
        tiny_checkpoint(args.make_checkpoint, seed=0, **SCALED_SHAPES)
        print(f"wrote a scaled random checkpoint to {args.make_checkpoint}")
        return
    if not args.checkpoint:
        parser.error("give a checkpoint folder, or --make-checkpoint DIR")

    from mlx_vlm.utils import load_model as vlm_load_model
    from transformers import AutoTokenizer

    path = Path(args.checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ours = mlx_unified.load_model(path)
    theirs = vlm_load_model(path)
    ids = np.random.default_rng(0).integers(3, 300, (1, args.prompt_tokens)).astype(np.int32)
    ids[0, 0] = ours.config.text.bos_token_id
    rounds = {"ours": [], "mlx_vlm": []}
    run_ours(ours, tokenizer, ids[:, :16], 2)  # warm up both
    run_mlx_vlm(theirs, ids[:, :16], 2)
    for _ in range(args.rounds):
        rounds["ours"].append(run_ours(ours, tokenizer, ids, args.decode_tokens))
        rounds["mlx_vlm"].append(run_mlx_vlm(theirs, ids, args.decode_tokens))
    summary = {
        name: {key: statistics.median(r[key] for r in runs) for key in runs[0]} for name, runs in rounds.items()
    }
    ratios = {
        "prefill_tps": summary["ours"]["prefill_tps"] / summary["mlx_vlm"]["prefill_tps"],
        "decode_tps": summary["ours"]["decode_tps"] / summary["mlx_vlm"]["decode_tps"],
        "ttft_s": summary["ours"]["ttft_s"] / summary["mlx_vlm"]["ttft_s"],
        "peak_memory_gb": summary["ours"]["peak_memory_gb"] / summary["mlx_vlm"]["peak_memory_gb"],
    }
    print(f"checkpoint {path}  prompt {args.prompt_tokens} tokens, decode {args.decode_tokens}, "
          f"{args.rounds} rounds (medians), device {mx.default_device()}")
    print(f"{'':16}{'ours':>12}{'mlx-vlm':>12}{'ours/vlm':>10}")
    for key in ("prefill_tps", "decode_tps", "ttft_s", "peak_memory_gb"):
        print(f"{key:16}{summary['ours'][key]:12.3f}{summary['mlx_vlm'][key]:12.3f}{ratios[key]:10.2f}")
    contexts = [int(c) for c in args.kv_contexts.split(",") if c]
    kv = kv_table(contexts)
    print("\nKV cache bytes, released 12B shapes (bf16), after prefill + one decode step")
    print(f"{'context':>10}{'ours MB':>12}{'mlx-vlm MB':>12}{'ratio':>8}")
    for row in kv:
        print(f"{row['context']:>10}{row['ours_bytes'] / 1e6:12.1f}{row['mlx_vlm_bytes'] / 1e6:12.1f}{row['ratio']:8.2f}")
    out = RESULTS / f"generate-{args.prompt_tokens}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": "python benchmarks/bench_generate.py " + " ".join(
            [str(path), f"--prompt-tokens {args.prompt_tokens}", f"--decode-tokens {args.decode_tokens}",
             f"--rounds {args.rounds}"]),
        "machine": f"{platform.system()} {platform.machine()}, {mx.default_device()}, mlx {mx.__version__}",
        "checkpoint_text_config": ours.config.raw.get("text_config"),
        "rounds": rounds,
        "median": summary,
        "ratio_ours_over_mlx_vlm": ratios,
        "targets": {"prefill_tps": ">= 1.5", "decode_tps": ">= 1.0", "kv_bytes_long_context": "<= 0.6"},
        "kv_bytes_12b": kv,
    }, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
