"""Kernel benchmark.

    python benchmarks/bench_kernels.py [--out benchmarks/results/kernels-<machine>.json]

On Metal: each kernel against its pure-MLX reference at the 12B's shapes (median time, bytes/s).
Elsewhere: the emulator check of every kernel, plus, everywhere, the table of bytes read per
decoded token (weights + KV) for our cache layout and mlx-vlm's at 8K, 32K, 128K and 256K.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import mlx.core as mx

CONTEXTS = (8_192, 32_768, 131_072, 262_144)

# Gemma 4 12B unified (config.json): 48 layers, 5 sliding : 1 global, last global.
HIDDEN, MLP, VOCAB, LAYERS = 3840, 15360, 262_144, 48
N_HEADS, SLIDING_KV, SLIDING_DIM, WINDOW = 16, 8, 256, 1024
GLOBAL_KV, GLOBAL_DIM = 1, 512
GLOBAL_LAYERS = LAYERS // 6
SLIDING_LAYERS = LAYERS - GLOBAL_LAYERS
CACHE_BYTES = 2  # bfloat16 cache
WEIGHT_BYTES = {"bf16": 2.0, "4bit": 0.5 + 2 * 2 / 64}  # 4 bits + bf16 scale and bias per 64


def decode_weight_params() -> int:
    """Parameters read per decoded token: every layer plus the tied embedding as LM head."""
    mlp = 3 * HIDDEN * MLP
    sliding = HIDDEN * N_HEADS * SLIDING_DIM * 2 + 2 * HIDDEN * SLIDING_KV * SLIDING_DIM
    global_ = HIDDEN * N_HEADS * GLOBAL_DIM * 2 + HIDDEN * GLOBAL_KV * GLOBAL_DIM  # K=V: no v_proj
    norms = LAYERS * (4 * HIDDEN + SLIDING_DIM + GLOBAL_DIM) + HIDDEN
    return SLIDING_LAYERS * (sliding + mlp) + GLOBAL_LAYERS * (global_ + mlp) + VOCAB * HIDDEN + norms


def kv_bytes(context: int, layout: str) -> int:
    """KV bytes attention reads for one decoded token at `context` tokens."""
    sliding = SLIDING_LAYERS * min(context, WINDOW) * SLIDING_KV * SLIDING_DIM * 2 * CACHE_BYTES
    # Ours: one tensor per global layer (keys derived in-kernel); mlx-vlm caches keys and values.
    tensors = 1 if layout == "ours" else 2
    return sliding + GLOBAL_LAYERS * context * GLOBAL_KV * GLOBAL_DIM * tensors * CACHE_BYTES


def bytes_table() -> list[dict]:
    params = decode_weight_params()
    rows = []
    for context in CONTEXTS:
        for weights, per_param in WEIGHT_BYTES.items():
            w = params * per_param
            ours, vlm = w + kv_bytes(context, "ours"), w + kv_bytes(context, "mlx-vlm")
            rows.append({
                "context": context, "weights": weights, "weight_GB": w / 1e9,
                "kv_GB_ours": kv_bytes(context, "ours") / 1e9, "kv_GB_mlx_vlm": kv_bytes(context, "mlx-vlm") / 1e9,
                "total_GB_ours": ours / 1e9, "total_GB_mlx_vlm": vlm / 1e9, "saving": 1 - ours / vlm,
            })
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"\nBytes read per decoded token, Gemma 4 12B ({decode_weight_params() / 1e9:.2f}B params read), bf16 KV")
    print(f"{'context':>8} {'weights':>7} {'weights GB':>10} {'KV ours':>8} {'KV mlx-vlm':>10} "
          f"{'total ours':>10} {'total vlm':>9} {'saving':>7}")
    for r in rows:
        print(f"{r['context']:>8} {r['weights']:>7} {r['weight_GB']:>10.2f} {r['kv_GB_ours']:>8.2f} "
              f"{r['kv_GB_mlx_vlm']:>10.2f} {r['total_GB_ours']:>10.2f} {r['total_GB_mlx_vlm']:>9.2f} "
              f"{r['saving']:>7.1%}")


def _median_time(fn, repeats: int = 20) -> float:
    mx.eval(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def metal_timings() -> list[dict]:
    """Each kernel vs its reference at the model's decode shapes (Metal only)."""
    from mlx_unified.kernels import attention_global as ag
    from mlx_unified.kernels import attention_sliding as asl
    from mlx_unified.kernels import audio_norm as an
    from mlx_unified.kernels import norm_rope as nr
    from mlx_unified.kernels import vision_tail as vt

    metal = mx.fast.metal_kernel
    bf16 = mx.bfloat16
    results = []
    for context in CONTEXTS:
        q = mx.random.normal((1, N_HEADS, 1, GLOBAL_DIM)).astype(bf16)
        v = mx.random.normal((1, 1, context, GLOBAL_DIM)).astype(bf16)
        w = mx.ones((GLOBAL_DIM,), dtype=bf16)
        results.append(("global_kv_attention", f"T={context}", v.nbytes,
                        lambda q=q, v=v, w=w, n=context: ag.global_kv_attention_kernel(metal, q, v, w, n),
                        lambda q=q, v=v, w=w, n=context: ag.global_kv_attention_reference(q, v, w, n)))
    q = mx.random.normal((1, N_HEADS, 1, SLIDING_DIM)).astype(bf16)
    k = mx.random.normal((1, SLIDING_KV, WINDOW, SLIDING_DIM)).astype(bf16)
    results.append(("sliding_window_attention", f"W={WINDOW}", 2 * k.nbytes,
                    lambda: asl.sliding_window_attention_kernel(metal, q, k, k, 5000, WINDOW),
                    lambda: asl.sliding_window_attention_reference(q, k, k, 5000, WINDOW)))
    x = mx.random.normal((1, 1, N_HEADS, GLOBAL_DIM)).astype(bf16)
    wq = mx.ones((GLOBAL_DIM,), dtype=bf16)
    from mlx_unified.kernels.rope_tables import PROPORTIONAL_ROPE

    results.append(("norm_rope", "q 16x512", x.nbytes,
                    lambda: nr.norm_rope_kernel(metal, x, wq, 9000, rope=PROPORTIONAL_ROPE),
                    lambda: nr.norm_rope_reference(x, wq, 9000, rope=PROPORTIONAL_ROPE)))
    patches = mx.random.normal((1, 280, HIDDEN)).astype(bf16)
    pos = mx.random.randint(0, 40, (1, 280, 2))
    p = [mx.ones((HIDDEN,), dtype=bf16) for _ in range(4)]
    table = mx.random.normal((1120, 2, HIDDEN)).astype(bf16)
    args = (patches, pos, p[0], p[1], table, p[2], p[3])
    results.append(("vision_tail", "280 patches", patches.nbytes,
                    lambda: vt.vision_tail_kernel(metal, *args), lambda: vt.vision_tail_reference(*args)))
    frames = mx.random.normal((1, 750, 640)).astype(bf16)
    results.append(("audio_norm", "750 frames", frames.nbytes,
                    lambda: an.audio_norm_kernel(metal, frames), lambda: an.audio_norm_reference(frames)))
    rows = []
    for name, shape, nbytes, kernel, reference in results:
        tk, tr = _median_time(kernel), _median_time(reference)
        rows.append({"kernel": name, "shape": shape, "kernel_ms": tk * 1e3, "reference_ms": tr * 1e3,
                     "kernel_GBps": nbytes / tk / 1e9, "reference_GBps": nbytes / tr / 1e9})
        print(f"{name:26s} {shape:14s} kernel {tk * 1e3:8.3f} ms ({nbytes / tk / 1e9:7.1f} GB/s)  "
              f"reference {tr * 1e3:8.3f} ms ({nbytes / tr / 1e9:7.1f} GB/s)")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="JSON results file")
    args = parser.parse_args()
    report: dict = {"machine": f"{platform.system()} {platform.machine()} ({platform.processor() or 'cpu'})",
                    "mlx": mx.__version__, "metal": mx.metal.is_available()}
    if mx.metal.is_available():
        report["timings"] = metal_timings()
    else:
        from mlx_unified.kernels.selfcheck import run_selfcheck
        from mlx_unified.testing.metal_emulator import metal_kernel

        print("No Metal here: checking every kernel on the CPU emulator (no speed figures).")
        start = time.perf_counter()
        failures = run_selfcheck(metal_kernel)
        report["emulator_check"] = {"failed_kernels": failures, "seconds": time.perf_counter() - start}
    report["bytes_per_decoded_token"] = bytes_table()
    print_table(report["bytes_per_decoded_token"])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
