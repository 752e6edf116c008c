"""Logit error and top-1 agreement of each quantization recipe against the float model.

    python benchmarks/quant_quality.py

Reference checkpoints (random weights built with transformers' gemma4_unified, mlx_unified/testing/reference.py) are
converted with every recipe and compared with the same checkpoint loaded in float32, on a text prompt
and an image+audio prompt. Random weights have no structure for quantization to preserve or destroy,
so these figures bound the error the quantizer introduces; they do not predict quality on the
released weights. Results: benchmarks/results/quant_quality.json.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_unified.config import ModelConfig
from mlx_unified.convert import convert
from mlx_unified.convert.estimate import parameter_count
from mlx_unified.convert.recipes import supported_modes
from mlx_unified.loading import load_model
from mlx_unified.testing import scaled_text
from mlx_unified.testing.reference import (
    build_reference_checkpoint,
    compare,
    image_audio_prompt,
    logits,
    text_prompt,
)

RESULTS = Path(__file__).parent / "results" / "quant_quality.json"
# The reference's tiny shapes, with an MLP width that groups of 64 divide, so every Linear is quantized.
CHECKPOINTS = {
    "tiny-4-layers": dict(intermediate_size=128),
    "small-6-layers": scaled_text(hidden=128, heads=4, head_dim=32, window=8, intermediate_size=256),
}
# label -> convert() keyword arguments. Plain -q and mixed_* are mlx-vlm's rules (vision projectors in
# float); float_projectors and mixed_*_attn are ours.
CONVERSIONS: dict[str, dict[str, Any]] = {
    "8-bit": dict(quantize=True, q_bits=8),
    "6-bit": dict(quantize=True, q_bits=6),
    "5-bit": dict(quantize=True, q_bits=5),
    "4-bit": dict(quantize=True, q_bits=4),
    "4-bit float_projectors": dict(quantize=True, q_bits=4, recipe="float_projectors"),
    "4-bit group 32": dict(quantize=True, q_bits=4, q_group_size=32),
    "3-bit": dict(quantize=True, q_bits=3),
    "mixed_4_8": dict(recipe="mixed_4_8"),
    "mixed_4_6": dict(recipe="mixed_4_6"),
    "mixed_3_6": dict(recipe="mixed_3_6"),
    "mixed_3_4": dict(recipe="mixed_3_4"),
    "mixed_4_8_attn": dict(recipe="mixed_4_8_attn"),
    "mixed_4_6_attn": dict(recipe="mixed_4_6_attn"),
    "mixed_3_6_attn": dict(recipe="mixed_3_6_attn"),
    "mixed_3_4_attn": dict(recipe="mixed_3_4_attn"),
    "mxfp8": dict(quantize=True, q_mode="mxfp8"),
    "nvfp4": dict(quantize=True, q_mode="nvfp4"),
    "mxfp4": dict(quantize=True, q_mode="mxfp4"),
}
CAVEAT = (
    "Random weights only bound, not predict, quality: they have none of the structure (outliers, "
    "redundancy) that decides how real weights quantize. Read these figures as the error the quantizer "
    "introduces on weights of the released scale of values, not as the quality of a converted 12B."
)


def measure(workdir: Path) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    prompts = [text_prompt(rng), image_audio_prompt(rng)]
    results: dict[str, Any] = {}
    for name, shapes in CHECKPOINTS.items():
        source = workdir / name
        build_reference_checkpoint(source, seed=11, **shapes)
        float_model = load_model(source, dtype="float32")
        reference = [logits(float_model, p) for p in prompts]
        for label, kwargs in CONVERSIONS.items():
            mode = kwargs.get("q_mode", "affine")
            if mode not in supported_modes():
                results.setdefault(label, {})[name] = {"skipped": f"this MLX has no {mode} quantizer"}
                continue
            out = convert(source, workdir / f"{name}-{label.replace(' ', '-')}", **kwargs)
            model = load_model(out, dtype="float32")
            quantized = np.concatenate([logits(model, p).reshape(-1, 512) for p in prompts])
            expected = np.concatenate([r.reshape(-1, 512) for r in reference])
            entry = compare(quantized, expected)
            entry["bits_per_weight"] = round(_bits_per_weight(out), 3)
            results.setdefault(label, {})[name] = entry
            print(f"{name:>15} {label:<24} {entry}", flush=True)
    return results


def _bits_per_weight(folder: Path) -> float:
    """Stored bits per model parameter (packed weights, scales and biases included)."""
    config = json.loads((folder / "config.json").read_text())
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return 8 * index["metadata"]["total_size"] / parameter_count(ModelConfig.from_dict(config))


def main() -> None:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        results = measure(Path(tmp))
    report = {
        "caveat": CAVEAT,
        "command": "python benchmarks/quant_quality.py",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}, MLX {mx.__version__} on CPU",
        "reference": "float32 model from the same checkpoint; logits of a 48-token text prompt and an "
        "image (7 patches) + audio (6 frames) + text prompt, all positions; affine group 64 unless named",
        "checkpoints": {name: {"random_seed": 11, **shapes} for name, shapes in CHECKPOINTS.items()},
        "results": results,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
