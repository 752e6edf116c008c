"""Convert a full-size random Gemma 4 12B unified checkpoint; report wall time and peak memory.

    python benchmarks/bench_convert.py                # make the checkpoint once, then measure ours and mlx-vlm's
    python benchmarks/bench_convert.py --only ours    # skip the peer

The checkpoint (the released shapes and names, bf16, about 24 GB) is written once under
benchmarks/checkpoints/ shard by shard, never whole in memory. Each conversion runs in a fresh process
that reports its own peak resident set (`ru_maxrss`); the parent also samples it and stops a run that
passes `--rss-cap-gb`, so a peer that needs more than this machine has cannot take the machine down.
Results go to benchmarks/results/convert_12b.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from transformers import Gemma4UnifiedConfig

from mlx_unified.checkpoint import tensor_shapes
from mlx_unified.config import released_config
from mlx_unified.convert.estimate import estimate
from mlx_unified.safetensors_format import OutputTensor, ShardWriter
from mlx_unified.testing import TINY_TEXT
from mlx_unified.testing.tokenizer import write_tokenizer

ROOT = Path(__file__).resolve().parents[1]

CHECKPOINTS = ROOT / "benchmarks" / "checkpoints"
SOURCE = CHECKPOINTS / "gemma4-12b-random-bf16"
RESULTS = ROOT / "benchmarks" / "results" / "convert_12b.json"
SHARD_BYTES = 5 * 10**9 - (1 << 20)
# Random values are drawn once into a pool and written from random offsets: generating 12 billion
# normals would dominate the run, and the converter's cost does not depend on the values.
POOL_VALUES = 1 << 24
WRITE_CHUNK_VALUES = 1 << 24


def released_hf_config() -> Gemma4UnifiedConfig:
    """The released 12B's config as the reference writes it: the text settings a tiny checkpoint spells
    out (`TINY_TEXT`), at their released values (`released_config()`)."""
    text, vision = released_config().text, released_config().vision
    config = Gemma4UnifiedConfig(
        text_config={**{name: getattr(text, name) for name in TINY_TEXT}, "vocab_size": text.vocab_size},
        vision_config=dict(
            mm_embed_dim=vision.mm_embed_dim,
            output_proj_dims=vision.output_proj_dims,
            mm_posemb_size=vision.mm_posemb_size,
        ),
        audio_config=dict(audio_embed_dim=released_config().audio.audio_embed_dim),
    )
    config.architectures = ["Gemma4UnifiedForConditionalGeneration"]
    config.dtype = "bfloat16"
    return config


def make_checkpoint(path: Path) -> None:
    """The released layout (`model.` names, bf16 shards <= 5 GB with an index), random values."""
    shapes = {f"model.{name}": shape for name, shape in tensor_shapes(released_config()).items()}
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for name, shape in shapes.items():
        tensor = OutputTensor(name, "BF16", shape)
        if size + tensor.nbytes > SHARD_BYTES and shards[-1]:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    staging = path.with_name(path.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    rng = np.random.default_rng(0)
    # bf16 bit patterns: the top half of float32 normals (std 0.02, like an initialised layer).
    pool = ((rng.standard_normal(2 * POOL_VALUES, dtype=np.float32) * 0.02).view(np.uint32) >> 16).astype(
        "<u2"
    )
    weight_map = {}
    for number, tensors in enumerate(shards, start=1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        writer = ShardWriter(staging / file, tensors, {"format": "pt"})
        for tensor in tensors:
            total = math.prod(tensor.shape)
            for start in range(0, total, WRITE_CHUNK_VALUES):
                count = min(WRITE_CHUNK_VALUES, total - start)
                offset = int(rng.integers(0, POOL_VALUES))
                writer.write(tensor.name, start * 2, pool[offset : offset + count].tobytes())
            weight_map[tensor.name] = file
        writer.close()
        print(f"  wrote {file}", flush=True)
    total_size = sum(t.nbytes for shard in shards for t in shard)
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    released_hf_config().save_pretrained(staging)
    # Tokenizer and processor files, so that mlx-vlm's converter (which loads the processor) runs.
    write_tokenizer(staging)
    staging.rename(path)


OURS = """
import resource, sys
from mlx_unified.convert import convert
convert(sys.argv[1], sys.argv[2], quantize=True, q_bits=4, q_group_size=64)
print("MAXRSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
PEER = """
import resource, sys
from mlx_vlm.convert import convert
convert(sys.argv[1], sys.argv[2], quantize=True, q_bits=4, q_group_size=64)
print("MAXRSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def measure(code: str, source: Path, output: Path, rss_cap: int) -> dict:
    shutil.rmtree(output, ignore_errors=True)
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-c", code, str(source), str(output)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    sampled_peak, stopped = 0, False
    while process.poll() is None:
        rss = _rss_bytes(process.pid)
        sampled_peak = max(sampled_peak, rss)
        if rss > rss_cap:
            process.kill()
            stopped = True
            break
        time.sleep(0.2)
    log = process.communicate()[0]
    wall = time.perf_counter() - started
    reported = [int(line.split()[1]) * 1024 for line in log.splitlines() if line.startswith("MAXRSS_KB")]
    result = {
        "wall_s": round(wall, 1),
        "peak_rss_gb": round((reported[0] if reported else sampled_peak) / 10**9, 2),
        "exit_code": process.returncode,
    }
    if stopped:
        result["stopped"] = f"resident memory passed the {rss_cap / 10**9:.0f} GB cap; peak is at least this"
    elif process.returncode != 0:
        result["log_tail"] = log[-2000:]
    if output.exists():
        written = sum(f.stat().st_size for f in output.glob("*.safetensors"))
        result["weights_bytes_written"] = written
    return result


def _rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("ours", "peer"))
    parser.add_argument(
        "--rss-cap-gb", type=float, default=18.0, help="stop a conversion past this resident size"
    )
    args = parser.parse_args()
    if not SOURCE.exists():
        print(f"making {SOURCE} (once)", flush=True)
        started = time.perf_counter()
        make_checkpoint(SOURCE)
        print(f"  {time.perf_counter() - started:.0f} s", flush=True)
    source_bytes = sum(f.stat().st_size for f in SOURCE.glob("*.safetensors"))
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results.update(
        {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
            f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, "
            f"{platform.system()}, MLX on CPU",
            "source": {"path": str(SOURCE.relative_to(ROOT)), "bytes": source_bytes, "dtype": "bfloat16"},
            "settings": "4-bit affine, group 64 (mlx-lm's -q defaults) for both",
        }
    )
    cap = int(args.rss_cap_gb * 10**9)
    expected = estimate(released_config(), bits=4, group_size=64)["weights_bytes"]
    if args.only in (None, "ours"):
        ours = {"command": "python benchmarks/bench_convert.py --only ours"}
        ours.update(measure(OURS, SOURCE, CHECKPOINTS / "out-mlx-unified-4bit", cap))
        if "weights_bytes_written" in ours:
            ours["estimate_weights_bytes"] = expected
            ours["estimate_error_pct"] = round(100 * (expected - ours["weights_bytes_written"]) / expected, 3)
        results["mlx_unified.convert"] = ours
        print("ours:", ours, flush=True)
    if args.only in (None, "peer"):
        peer = {"command": "python benchmarks/bench_convert.py --only peer"}
        peer.update(measure(PEER, SOURCE, CHECKPOINTS / "out-mlx-vlm-4bit", cap))
        results["mlx_vlm.convert"] = peer
        print("mlx-vlm:", peer, flush=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
