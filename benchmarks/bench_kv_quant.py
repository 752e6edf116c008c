"""The quantized KV cache, ours against mlx-vlm with the same --kv-bits: bytes at the released 12B shapes,
decode steps on the scaled checkpoint.

    python benchmarks/bench_kv_quant.py CKPT [--kv-bits 8,4] [--contexts 8192,32768,131072]
        [--bytes-contexts 8192,32768,131072,262144] [--steps 12] [--decode-group-size 32]

Bytes: both libraries' caches for the released shapes (no weights needed) are filled with the same
bf16 keys/values to each context (as `bench_generate.kv_table`), quantized as each library does with
those bits, settled by one decode step, and their arrays counted. Decode: both libraries' caches of
the scaled checkpoint (CKPT, from `bench_generate.py --make-checkpoint`) are filled with random
keys/values without prefilling, quantized, and greedy steps timed one at a time, alternating
(`bench_decode.time_steps`).

mlx-vlm 0.7.10 has two paths for --kv-bits. Its default scheme ("uniform", what an integer --kv-bits
selects) converts every cache with `to_quantized`, and this model's sliding layers (RotatingKVCache)
raise NotImplementedError there: its generation stops once the cache reaches --quantized-kv-start. The
benchmark records the error and measures mlx-vlm's caches as far as that path gets ("uniform*": its
global layers' KVCache as its QuantizedKVCache, keys and values, the sliding layers in bf16). Its
"turboquant" scheme (--kv-quant-scheme turboquant) runs: TurboQuantKVCache on the global layers but the
last, the sliding layers in bf16 (on the scaled checkpoint, whose one global layer is the last, it
quantizes nothing). Its bytes past TURBO_MEASURED_UP_TO are extrapolated per position (it takes
minutes a layer to quantize there). Ours quantizes every layer: the rings and the one K=V tensor.

Groups of 64 at the released shapes; on the scaled checkpoint, whose sliding heads are 32 wide,
--decode-group-size (32) for both libraries. Writes benchmarks/results/kv-quant.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from bench_decode import time_steps
from bench_generate import (
    RESULTS,
    _vlm_released_config,
    checkpoint_parser,
    fill_caches,
    load_both,
    machine_description,
    machine_name,
)
from mlx_vlm.generate.common import maybe_quantize_kv_cache as vlm_maybe_quantize
from mlx_vlm.models.cache import KVCache as VlmKVCache

import mlx_unified
from mlx_unified.cache import maybe_quantize
from mlx_unified.config import ModelConfig
from mlx_unified.kv_quantization import KVQuantization

SCHEMES = ("uniform*", "turboquant")


def quantized_ours(cache: list, bits: int, group_size: int) -> list:
    quantized = list(cache)
    maybe_quantize(quantized, KVQuantization(bits, group_size, start=0))
    return quantized


def quantized_vlm(cache: list, scheme: str, bits: int, group_size: int) -> tuple[list, str | None]:
    """mlx-vlm's caches quantized by its own `maybe_quantize_kv_cache` (quantized_kv_start 0), and the
    error its uniform path raises; "uniform*" then converts what that path can (its KVCache layers)."""
    quantized = list(cache)
    if scheme == "turboquant":
        vlm_maybe_quantize(quantized, 0, group_size, bits, kv_quant_scheme="turboquant")
        return quantized, None
    try:
        vlm_maybe_quantize(quantized, 0, group_size, bits)
        return quantized, None
    except NotImplementedError as e:
        error = f"{type(e).__name__}: {e}"
    quantized = [c.to_quantized(group_size=group_size, bits=bits) if type(c) is VlmKVCache else c for c in cache]
    return quantized, error


def settle(ours_model, ours_cache: list, vlm_cache: list) -> None:
    """One decode step's keys/values into every layer: rotating caches reach their steady state."""
    for layer, ours_c, vlm_c in zip(ours_model.language_model.layers, ours_cache, vlm_cache, strict=True):
        shape = layer.self_attn.shape
        one = mx.zeros((1, shape.num_kv_heads, 1, shape.head_dim), dtype=mx.bfloat16)
        ours_c.update_and_fetch(one) if shape.k_eq_v else ours_c.update_and_fetch(one, one)
        vlm_c.update_and_fetch(one, one)
    mx.eval([c.state for c in ours_cache], [c.state for c in vlm_cache])


# mlx-vlm's TurboQuant takes about 0.8 ms a position and layer to quantize on this CPU (27 s for 32K
# positions of one layer): past this context its bytes are extrapolated, per position, from this one.
TURBO_MEASURED_UP_TO = 32768


def bytes_table(contexts: list[int], bits_list: list[int]) -> tuple[list[dict], dict]:
    """Cache bytes of both libraries for the released 12B shapes, bf16 and each of `bits_list`."""
    from mlx_vlm.models.gemma4_unified import Model as VlmModel
    from mlx_vlm.models.gemma4_unified import ModelConfig as VlmConfig
    from mlx_vlm.turboquant import TurboQuantKVCache

    released = {"model_type": "gemma4_unified", "text_config": {}, "vision_config": {}, "audio_config": {}}
    ours_model = mlx_unified.Model(ModelConfig.from_dict(released))
    vlm_model = VlmModel(VlmConfig.from_dict(_vlm_released_config()))
    rows, errors, turbo_per_position = [], {}, {}
    for context in sorted(contexts):
        ours_cache, vlm_cache = fill_caches(ours_model, vlm_model, context)
        for bits in bits_list:
            row = {"context": context, "kv_bits": bits}
            for scheme in SCHEMES:
                ours_q = quantized_ours(ours_cache, bits, 64)
                measured = scheme != "turboquant" or context <= TURBO_MEASURED_UP_TO
                vlm_q, error = quantized_vlm(vlm_cache, scheme if measured else "uniform*", bits, 64)
                if error and measured:
                    errors[f"{scheme} {bits}-bit"] = error
                settle(ours_model, ours_q, vlm_q)
                row["ours_bytes"] = sum(c.nbytes for c in ours_q)
                if measured:
                    vlm_bytes = sum(c.nbytes for c in vlm_q)
                    turbo = [c for c in vlm_q if isinstance(c, TurboQuantKVCache)]
                    if turbo:
                        turbo_per_position[bits] = sum(c.nbytes for c in turbo) / len(turbo) / (context + 1)
                else:  # TurboQuant's layers (every KVCache but the last) extrapolated, the others measured
                    turbo = [i for i, c in enumerate(vlm_cache) if type(c) is VlmKVCache][:-1]
                    kept = [c for i, c in enumerate(vlm_q) if i not in turbo]
                    vlm_bytes = sum(c.nbytes for c in kept) + len(turbo) * turbo_per_position[bits] * (context + 1)
                    row["turboquant_extrapolated_from"] = TURBO_MEASURED_UP_TO
                row[f"mlx_vlm_{scheme}_bytes"] = int(vlm_bytes)
                row[f"ratio_vs_{scheme}"] = row["ours_bytes"] / vlm_bytes
                del vlm_q, ours_q
                mx.clear_cache()
            rows.append(row)
        settle(ours_model, ours_cache, vlm_cache)
        ours_bytes, vlm_bytes = sum(c.nbytes for c in ours_cache), sum(c.nbytes for c in vlm_cache)
        rows.append({"context": context, "kv_bits": None, "ours_bytes": ours_bytes, "mlx_vlm_bytes": vlm_bytes,
                     "ratio": ours_bytes / vlm_bytes})
        del ours_cache, vlm_cache
        mx.clear_cache()
    return rows, errors


def decode_table(path: Path, contexts: list[int], bits_list: list[int], group_size: int, steps: int) -> list[dict]:
    ours, theirs = load_both(path)
    rows = []
    for context in contexts:
        ours_cache, vlm_cache = fill_caches(ours, theirs, context, random=True)
        for bits in bits_list:
            for scheme in SCHEMES:
                ours_q = quantized_ours(ours_cache, bits, group_size)
                vlm_q, _ = quantized_vlm(vlm_cache, scheme, bits, group_size)
                mx.eval([c.state for c in ours_q], [c.state for c in vlm_q])
                timed = time_steps(ours, theirs, ours_q, vlm_q, steps)
                rows.append({"context": context, "kv_bits": bits, "mlx_vlm_scheme": scheme, **timed})
                del ours_q, vlm_q
                mx.clear_cache()
        del ours_cache, vlm_cache
        mx.clear_cache()
    return rows


def main() -> None:
    parser = checkpoint_parser(__doc__)
    parser.add_argument("--kv-bits", default="8,4")
    parser.add_argument("--contexts", default="8192,32768,131072", help="decode contexts (scaled checkpoint)")
    parser.add_argument("--bytes-contexts", default="8192,32768,131072,262144", help="released-shape contexts")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--decode-group-size", type=int, default=32)
    args = parser.parse_args()
    bits_list = [int(b) for b in args.kv_bits.split(",") if b]
    contexts = [int(c) for c in args.contexts.split(",") if c]
    bytes_contexts = [int(c) for c in args.bytes_contexts.split(",") if c]
    print(f"device {mx.default_device()} ({machine_name()})")

    sizes, errors = bytes_table(bytes_contexts, bits_list)
    print("\nKV cache MB, released 12B shapes, groups of 64, after one decode step")
    print(f"{'context':>9}{'bits':>6}{'ours':>10}{'vlm uniform*':>14}{'ratio':>7}{'vlm turbo':>11}{'ratio':>7}")
    for row in sizes:
        if row["kv_bits"] is None:
            print(f"{row['context']:>9}{'bf16':>6}{row['ours_bytes'] / 1e6:10.1f}{row['mlx_vlm_bytes'] / 1e6:14.1f}"
                  f"{row['ratio']:7.2f}")
            continue
        print(f"{row['context']:>9}{row['kv_bits']:>6}{row['ours_bytes'] / 1e6:10.1f}"
              f"{row['mlx_vlm_uniform*_bytes'] / 1e6:14.1f}{row['ratio_vs_uniform*']:7.2f}"
              f"{row['mlx_vlm_turboquant_bytes'] / 1e6:11.1f}{row['ratio_vs_turboquant']:7.2f}")
    for name, error in errors.items():
        print(f"mlx-vlm {name}: {error}")

    steps = decode_table(Path(args.checkpoint), contexts, bits_list, args.decode_group_size, args.steps)
    print(f"\nDecode steps, {args.checkpoint}, groups of {args.decode_group_size}, {args.steps} steps (medians)")
    print(f"{'context':>9}{'bits':>6}{'mlx-vlm':>12}{'ours ms':>10}{'vlm ms':>10}{'decode ours/vlm':>17}")
    for row in steps:
        ms = {name: 1e3 * t for name, t in row["median_step_s"].items()}
        print(f"{row['context']:>9}{row['kv_bits']:>6}{row['mlx_vlm_scheme']:>12}{ms['ours']:10.1f}"
              f"{ms['mlx_vlm']:10.1f}{row['decode_ratio_ours_over_mlx_vlm']:17.2f}")

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "kv-quant.json"
    out.write_text(json.dumps({
        "command": f"python benchmarks/bench_kv_quant.py {args.checkpoint} --kv-bits {args.kv_bits} "
                   f"--contexts {args.contexts} --bytes-contexts {args.bytes_contexts} --steps {args.steps} "
                   f"--decode-group-size {args.decode_group_size}",
        "machine": machine_description(),
        "mlx_vlm_uniform_errors": errors,
        "bytes_released_shapes": sizes,
        "decode_scaled_checkpoint": steps,
        "target": "ours <= 0.6x mlx-vlm's bytes at 128K with the same bits",
    }, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
