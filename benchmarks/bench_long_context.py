"""The 12 GB Mac configuration of `convert.py --plan --memory 12GB` (4-bit weights, 8-bit KV cache, the whole
262,144-token context), run on the scaled checkpoint.

    python benchmarks/bench_long_context.py CKPT [--context 262144] [--kv-bits 8] [--kv-group-size 32]
        [--decode-tokens 8]

Converts CKPT (from `bench_generate.py --make-checkpoint`) to 4 bits with the converter, loads the
conversion, then:
- a short chat reply through `stream_generate` with the KV cache quantized from the start;
- `generate_step` at the full context: the 8-bit cache is filled to context - 1 positions with random
  keys/values (quantized as they are written, without prefilling them: prefill at this length takes
  hours on a CPU), and the last prompt token and `--decode-tokens` more run through the real loop;
- the KV bytes held against `footprint.kv_bytes` for this config, and the plan row for the released
  model on a 12 GB Mac.
The scaled checkpoint's sliding heads are 32 wide, so its KV groups are 32 (the released heads take
mlx-lm's 64). Writes benchmarks/results/long-context.json.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from bench_generate import RESULTS, checkpoint_parser, machine_description

import mlx_unified
from mlx_unified.budgets import GIB, gpu_budget_bytes
from mlx_unified.cache import maybe_quantize
from mlx_unified.config import released_config
from mlx_unified.convert import convert
from mlx_unified.convert.estimate import plan
from mlx_unified.footprint import kv_bytes
from mlx_unified.generation import generate_step, peak_memory_gb, stream_generate
from mlx_unified.kv_quantization import KVQuantization


def filled_cache(model, positions: int, kv: KVQuantization, chunk: int = 8192) -> list:
    """A quantized cache holding `positions` random positions, written `chunk` at a time."""
    cache = model.make_cache()
    maybe_quantize(cache, kv)
    for layer, c in zip(model.language_model.layers, cache, strict=True):
        shape = layer.self_attn.shape
        done = 0
        while done < positions:
            n = min(chunk, positions - done)
            x = (0.3 * mx.random.normal((1, shape.num_kv_heads, n, shape.head_dim))).astype(model.dtype)
            c.update_and_fetch(x) if shape.k_eq_v else c.update_and_fetch(x, x)
            done += n
            mx.eval(c.state)
    return cache


def main() -> None:
    parser = checkpoint_parser(__doc__)
    parser.add_argument("--context", type=int, default=262144)
    parser.add_argument("--kv-bits", type=int, default=8)
    parser.add_argument("--kv-group-size", type=int, default=32)
    parser.add_argument("--decode-tokens", type=int, default=8)
    args = parser.parse_args()
    kv = KVQuantization(args.kv_bits, args.kv_group_size, start=0)
    with tempfile.TemporaryDirectory() as folder:
        converted = convert(args.checkpoint, Path(folder) / "4bit", quantize=True, q_bits=4, q_group_size=64)
        model, processor = mlx_unified.load(converted)
        started = time.perf_counter()
        reply = "".join(
            r.text for r in stream_generate(model, processor, "Hello", max_tokens=8, kv_bits=kv.bits,
                                            kv_group_size=kv.group_size, quantized_kv_start=0,
                                            use_prefix_cache=False)
        )
        reply_s = time.perf_counter() - started
        print(f"4-bit conversion of {args.checkpoint}: {model.nbytes / 1e6:.1f} MB of weights; "
              f"a {kv.bits}-bit-KV reply in {reply_s:.1f} s: {reply!r}")

        mx.reset_peak_memory()
        cache = filled_cache(model, args.context - 1, kv)
        ids = np.random.default_rng(0).integers(3, 300, (1, args.context)).astype(np.int32)
        steps = []
        last = time.perf_counter()
        for token, _ in generate_step(model, {"input_ids": ids}, prompt_cache=cache, max_tokens=args.decode_tokens,
                                      kv_bits=kv.bits, kv_group_size=kv.group_size, quantized_kv_start=0):
            now = time.perf_counter()
            steps.append((token, now - last))
            last = now
        held = sum(c.nbytes for c in cache)
        expected = kv_bytes(model.config, cache[0].offset, kv.bits, kv.group_size)
        decode_s = [s for _, s in steps[1:]]
        print(f"generate_step at {args.context:,} context: first token {steps[0][1]:.2f} s, then "
              f"{len(decode_s) / sum(decode_s):.2f} tokens/s; cache offset {cache[0].offset:,}")
        print(f"KV cache held {held / 1e6:.1f} MB, footprint.kv_bytes {expected / 1e6:.1f} MB; "
              f"peak memory {peak_memory_gb():.2f} GB")

    rows = {row.label: row for row in plan(released_config(), gpu_budget_bytes(12 * GIB))}
    four_bit = rows["4-bit"]
    print(f"released model, 12 GB Mac, 4-bit weights: context {four_bit.context_bf16_kv:,} (bf16 KV), "
          f"{four_bit.context_kv8:,} (8-bit KV), {four_bit.context_kv4:,} (4-bit KV)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "long-context.json"
    out.write_text(json.dumps({
        "command": f"python benchmarks/bench_long_context.py {args.checkpoint} --context {args.context} "
                   f"--kv-bits {args.kv_bits} --kv-group-size {args.kv_group_size} "
                   f"--decode-tokens {args.decode_tokens}",
        "machine": machine_description(),
        "checkpoint_text_config": model.config.raw.get("text_config"),
        "weights_bytes_4bit": model.nbytes,
        "short_reply": {"text": reply, "seconds": reply_s},
        "context": args.context,
        "cache_offset_after": cache[0].offset,
        "tokens": [t for t, _ in steps],
        "first_token_s": steps[0][1],
        "decode_tokens_per_s": len(decode_s) / sum(decode_s),
        "kv_bytes_held": held,
        "kv_bytes_estimated": expected,
        "peak_memory_gb": peak_memory_gb(),
        "released_12gb_plan_4bit": {"bf16_kv": four_bit.context_bf16_kv, "kv8": four_bit.context_kv8,
                                    "kv4": four_bit.context_kv4},
    }, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
