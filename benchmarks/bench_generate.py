"""Ours against mlx-vlm's gemma4_unified on one checkpoint, in one process, alternating.

    python benchmarks/bench_generate.py CKPT [--prompt-tokens 512[,2048,...]] [--decode-tokens 32] [--rounds 3]
    python benchmarks/bench_generate.py --make-checkpoint DIR     # a scaled random checkpoint (bf16)
    python benchmarks/bench_generate.py --make-checkpoint DIR --released-shapes [--layers 48]
                                        # the released 12B layer shapes (bf16, 24 GB at 48 layers): for a GPU

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
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

import mlx_unified
from mlx_unified.config import ModelConfig, released_config
from mlx_unified.generation import stream_generate
from mlx_unified.testing import scaled_text, tiny_checkpoint

RESULTS = Path(__file__).parent / "results"
# A scaled model with the released proportions: 5:1 sliding/global, K=V global layers with one KV
# head of twice the head dim, 16 query heads, GeGLU 4x, the full 262144-token vocabulary.
# The window is scaled with the prompt: 128 of a 2048-token prompt, as 1024 is of a 16K prompt.
SCALED_SHAPES = scaled_text(hidden=256, heads=16, head_dim=32, window=128, vocab_size=262144)
KV_CONTEXTS = (8192, 32768, 131072, 262144)


class TokenizerOnly:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer


def run_ours(model, tokenizer, ids: np.ndarray, decode_tokens: int, prefill_chunk: int | None = None) -> dict:
    mx.reset_peak_memory()
    start = time.perf_counter()
    first = last = None
    count = 0
    # Library defaults (chunked prefill) unless a chunk is given; the prefix cache is off so every
    # round prefills the whole prompt.
    chunk = {} if prefill_chunk is None else {"prefill_chunk_size": prefill_chunk}
    for response in stream_generate(
        model, TokenizerOnly(tokenizer), {"input_ids": ids}, max_tokens=decode_tokens, use_prefix_cache=False,
        **chunk,
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


def fill_caches(ours_model, vlm_model, context: int, random: bool = False, chunk: int = 4096) -> tuple[list, list]:
    """New caches of both models holding `context` positions of the same bf16 keys/values (zeros, or
    random ones), fed `chunk` positions at a time (ours: only the values on global K=V layers)."""
    ours_cache, vlm_cache = ours_model.make_cache(), vlm_model.make_cache()
    for layer, ours_c, vlm_c in zip(ours_model.language_model.layers, ours_cache, vlm_cache, strict=True):
        shape = layer.self_attn.shape
        done = 0
        while done < context:
            n = min(chunk, context - done)
            size = (1, shape.num_kv_heads, n, shape.head_dim)
            x = (0.3 * mx.random.normal(size) if random else mx.zeros(size)).astype(mx.bfloat16)
            ours_c.update_and_fetch(x) if shape.k_eq_v else ours_c.update_and_fetch(x, x)
            vlm_c.update_and_fetch(x, x)
            done += n
        mx.eval([ours_c.state, vlm_c.state])
    return ours_cache, vlm_cache


def kv_table(contexts=KV_CONTEXTS) -> list[dict]:
    """KV bytes of both libraries' caches for the released 12B shapes at long contexts."""
    from mlx_vlm.models.gemma4_unified import Model as VlmModel
    from mlx_vlm.models.gemma4_unified import ModelConfig as VlmConfig

    released = {"model_type": "gemma4_unified", "text_config": {}, "vision_config": {}, "audio_config": {}}
    ours_model = mlx_unified.Model(ModelConfig.from_dict(released))
    vlm_model = VlmModel(VlmConfig.from_dict(_vlm_released_config()))
    rows = []
    for context in contexts:
        ours_cache, vlm_cache = fill_caches(ours_model, vlm_model, context)
        for layer, ours_c, vlm_c in zip(ours_model.language_model.layers, ours_cache, vlm_cache, strict=True):
            # one decode step settles rotating caches to their steady state
            shape = layer.self_attn.shape
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


def bench_prompt(path: Path, ours, theirs, tokenizer, prompt_tokens: int, args) -> dict:
    ids = np.random.default_rng(0).integers(3, 300, (1, prompt_tokens)).astype(np.int32)
    ids[0, 0] = ours.config.text.bos_token_id
    rounds = {"ours": [], "mlx_vlm": []}
    # One untimed round of the same prompt first: GPU backends compile kernels per shape on first use.
    run_ours(ours, tokenizer, ids, 2, args.prefill_chunk)
    run_mlx_vlm(theirs, ids, 2)
    for _ in range(args.rounds):
        rounds["ours"].append(run_ours(ours, tokenizer, ids, args.decode_tokens, args.prefill_chunk))
        rounds["mlx_vlm"].append(run_mlx_vlm(theirs, ids, args.decode_tokens))
        mx.clear_cache()
    summary = {
        name: {key: statistics.median(r[key] for r in runs) for key in runs[0]} for name, runs in rounds.items()
    }
    ratios = {
        key: summary["ours"][key] / summary["mlx_vlm"][key]
        for key in ("prefill_tps", "decode_tps", "ttft_s", "peak_memory_gb")
    }
    print(f"\ncheckpoint {path}  prompt {prompt_tokens} tokens, decode {args.decode_tokens}, "
          f"our prefill chunk {args.prefill_chunk or 'default'}, "
          f"{args.rounds} rounds (medians), device {mx.default_device()} ({machine_name()})")
    print(f"{'':16}{'ours':>12}{'mlx-vlm':>12}{'ours/vlm':>10}")
    for key in ratios:
        print(f"{key:16}{summary['ours'][key]:12.3f}{summary['mlx_vlm'][key]:12.3f}{ratios[key]:10.2f}")
    return {
        "command": "python benchmarks/bench_generate.py " + " ".join(
            [str(path), f"--prompt-tokens {prompt_tokens}", f"--decode-tokens {args.decode_tokens}",
             f"--rounds {args.rounds}"] + ([f"--quantize {args.quantize}"] if args.quantize else [])
            + ([f"--prefill-chunk {args.prefill_chunk}"] if args.prefill_chunk else [])),
        "machine": machine_description(),
        "checkpoint_text_config": ours.config.raw.get("text_config"),
        "quantized_in_memory_bits": args.quantize,
        "rounds": rounds,
        "median": summary,
        "ratio_ours_over_mlx_vlm": ratios,
        "targets": {"prefill_tps": ">= 1.5", "decode_tps": ">= 1.0", "kv_bytes_long_context": "<= 0.6"},
    }


def machine_name() -> str:
    return str(mx.device_info().get("device_name", "unknown"))


def machine_description() -> str:
    """The machine line every result JSON of the ours-against-mlx-vlm benchmarks records."""
    return f"{platform.system()} {platform.machine()}, {mx.default_device()} ({machine_name()}), mlx {mx.__version__}"


def load_both(path: Path) -> tuple:
    """Our model and mlx-vlm's gemma4_unified, loaded from the same checkpoint folder."""
    from mlx_vlm.utils import load_model as vlm_load_model

    return mlx_unified.load_model(path), vlm_load_model(path)


def checkpoint_parser(doc: str, **checkpoint: Any) -> argparse.ArgumentParser:
    """A benchmark's command line: its docstring as help, then the checkpoint folder it runs on."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", **checkpoint)
    return parser


def main() -> None:
    parser = checkpoint_parser(__doc__, nargs="?")
    parser.add_argument("--make-checkpoint", metavar="DIR")
    parser.add_argument("--released-shapes", action="store_true", help="with --make-checkpoint: the 12B shapes")
    parser.add_argument("--layers", type=int, default=48, help="with --released-shapes: decoder layers")
    parser.add_argument("--prompt-tokens", default="512", help="one length or a comma list")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kv-contexts", default=",".join(map(str, KV_CONTEXTS)))
    parser.add_argument("--quantize", type=int, metavar="BITS",
                        help="quantize both language models in memory (affine, group 64) before timing")
    parser.add_argument("--prefill-chunk", type=int, help="our prefill chunk (default: the library's)")
    parser.add_argument("--results-suffix", default="", help="appended to generate-<tokens> in the file name")
    args = parser.parse_args()
    if args.make_checkpoint:
        if args.released_shapes:
            # The released google/gemma-4-12B-it text shapes, with --layers layers (5:1 kept).
            released = released_config().text
            shapes = {key: getattr(released, key) for key in SCALED_SHAPES} | {"num_hidden_layers": args.layers}
            tiny_checkpoint(args.make_checkpoint, seed=0, device_random=True, **shapes)
        else:
            tiny_checkpoint(args.make_checkpoint, seed=0, **SCALED_SHAPES)
        print(f"wrote a random checkpoint to {args.make_checkpoint}")
        return
    if not args.checkpoint:
        parser.error("give a checkpoint folder, or --make-checkpoint DIR")
    prompt_lengths = [int(n) for n in args.prompt_tokens.split(",") if n]

    from transformers import AutoTokenizer

    path = Path(args.checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ours, theirs = load_both(path)
    if args.quantize:
        # The same modules in both: every Linear and Embedding of the language model (the tied head too).
        for model in (ours, theirs):
            nn.quantize(model.language_model, group_size=64, bits=args.quantize)
        mx.eval(ours.parameters(), theirs.parameters())
    results = {n: bench_prompt(path, ours, theirs, tokenizer, n, args) for n in prompt_lengths}
    contexts = [int(c) for c in args.kv_contexts.split(",") if c]
    del ours, theirs
    mx.clear_cache()
    kv = kv_table(contexts)
    print("\nKV cache bytes, released 12B shapes (bf16), after prefill + one decode step")
    print(f"{'context':>10}{'ours MB':>12}{'mlx-vlm MB':>12}{'ratio':>8}")
    for row in kv:
        print(f"{row['context']:>10}{row['ours_bytes'] / 1e6:12.1f}{row['mlx_vlm_bytes'] / 1e6:12.1f}{row['ratio']:8.2f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    for n, result in results.items():
        out = RESULTS / f"generate-{n}{args.results_suffix}.json"
        out.write_text(json.dumps(dict(result, kv_bytes_12b=kv), indent=2))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
