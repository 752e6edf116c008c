"""What the prefix cache's integrity checks cost: writing and reading a stored prefix of the released 12B's
cache shapes (with its sha256 and layout check) against what the unchecked format did with the same
arrays (`mx.save_safetensors` to a temporary file renamed into place; `mx.load`), and identifying a checkpoint's weights (`checkpoint.model_identity`) the first time
(a sha256 of every weight file) and afterwards (its records: a `stat` per file).

    python benchmarks/bench_cache_integrity.py --system-tokens 4096 --weights-gb 2

Random bfloat16 arrays, no model: the prefix holds 40 sliding layers (8 KV heads x 256, window 1024)
and 8 global K=V layers (1 x 512) after `--system-tokens` tokens. Each timing is the best of
`--rounds`. Writes benchmarks/results/cache_integrity.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_unified.cache import SharedKVCache, SlidingWindowCache
from mlx_unified.checkpoint import model_identity
from mlx_unified.config import SLIDING, released_config
from mlx_unified.prefix_cache import CacheLayout, LayerLayout, PrefixState, load_prefix, save_prefix

RESULTS = Path(__file__).parent / "results" / "cache_integrity.json"


def released_prefix(tokens: int) -> tuple[PrefixState, CacheLayout]:
    text = released_config().text
    layers, specs = [], []
    for i in range(text.num_hidden_layers):
        shape = text.layer(i)
        if shape.layer_type == SLIDING:
            rows = min(tokens, text.sliding_window)
            k, v = (mx.random.normal((1, shape.num_kv_heads, rows, shape.head_dim)).astype(mx.bfloat16) for _ in "kv")
            layers.append(SlidingWindowCache.from_state((k, v, tokens, text.sliding_window)))
            specs.append(LayerLayout("SlidingWindowCache", shape.num_kv_heads, shape.head_dim, text.sliding_window))
        else:
            v = mx.random.normal((1, shape.num_kv_heads, tokens, shape.head_dim)).astype(mx.bfloat16)
            layers.append(SharedKVCache.from_state((v, tokens)))
            specs.append(LayerLayout("SharedKVCache", shape.num_kv_heads, shape.head_dim, None))
    mx.eval([layer.state for layer in layers])
    ids = np.arange(tokens, dtype=np.int32) % 1000
    return PrefixState("bench", ids, layers), CacheLayout(tuple(specs), mx.bfloat16)


def save_unchecked(path: Path, arrays: dict[str, mx.array]) -> None:
    temporary = path.with_name(".partial-" + path.name)
    mx.save_safetensors(str(temporary), arrays)
    os.replace(temporary, path)


def best(rounds: int, run) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--system-tokens", type=int, default=4096)
    parser.add_argument("--weights-gb", type=float, default=2.0, help="size of the weights file to identify")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    state, layout = released_prefix(args.system_tokens)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        ours, plain = folder / "ours.safetensors", folder / "plain.safetensors"
        arrays = {f"layer.{i}.{j}": a for i, c in enumerate(state.layers) for j, a in enumerate(c.state) if isinstance(a, mx.array)}
        save_ours = best(args.rounds, lambda: save_prefix(ours, state, "identity"))
        save_plain = best(args.rounds, lambda: save_unchecked(plain, arrays))
        load_ours = best(args.rounds, lambda: load_prefix(ours, "identity", state.token_ids, layout))
        load_plain = best(args.rounds, lambda: mx.eval(list(mx.load(str(plain)).values())))
        checkpoint = folder / "checkpoint"
        checkpoint.mkdir()
        (checkpoint / "config.json").write_text(json.dumps({"model_type": "gemma4_unified"}))
        weights_bytes = int(args.weights_gb * 1e9)
        with open(checkpoint / "model.safetensors", "wb") as f:
            block = np.random.default_rng(0).bytes(64 << 20)
            for start in range(0, weights_bytes, len(block)):
                f.write(block[: min(len(block), weights_bytes - start)])
        records = folder / "identities"
        started = time.perf_counter()
        model_identity(checkpoint, records)
        first = time.perf_counter() - started
        later = best(args.rounds, lambda: model_identity(checkpoint, records))
    results = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": f"{platform.system()} {platform.machine()}, {platform.processor() or 'cpu'}, MLX {mx.__version__}",
        "prefix_tokens": args.system_tokens,
        "prefix_bytes": state.nbytes,
        "save_s": {"ours": round(save_ours, 3), "unchecked_mx_save_and_rename": round(save_plain, 3)},
        "load_s": {"ours_checked": round(load_ours, 3), "mx_load": round(load_plain, 3)},
        "identity_weights_bytes": weights_bytes,
        "identity_first_s": round(first, 3),
        "identity_first_gb_per_s": round(weights_bytes / first / 1e9, 2),
        "identity_recorded_s": round(later, 5),
    }
    print(f"prefix of {args.system_tokens} tokens, {state.nbytes / 1e6:.0f} MB:")
    print(f"  save   ours {save_ours:.3f} s   unchecked (mx.save_safetensors, rename) {save_plain:.3f} s")
    print(f"  load   ours (checksum + layout) {load_ours:.3f} s   mx.load {load_plain:.3f} s")
    print(f"identity of {weights_bytes / 1e9:.1f} GB of weights: first {first:.2f} s "
          f"({results['identity_first_gb_per_s']} GB/s), recorded {later * 1e3:.2f} ms")  # fmt: skip
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
