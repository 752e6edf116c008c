"""A user's first run: the default model for the memory found, from the hub cache; the message and the
way out when it is not there; `--demo`; official weights converted once with `--quantize`; the memory
guard, which refuses what would swap before any weight is read; the wired limit on a Mac.

Hub ids resolve in a local hub cache laid out as huggingface_hub lays one out (`hub_cache.py`), with
HF_HUB_OFFLINE=1: nothing here reaches the network."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hub_cache import add_to_hub_cache

from mlx_unified import budgets, cli
from mlx_unified.budgets import BUDGET_VARIABLE, GIB, gpu_budget_bytes, memory_budget_bytes
from mlx_unified.checkpoint import tensor_shapes
from mlx_unified.config import released_config
from mlx_unified.convert import convert
from mlx_unified.errors import InputError
from mlx_unified.generation import generate_step
from mlx_unified.model_source import (
    COMMUNITY_MODELS,
    OFFICIAL_MODEL,
    MemoryGuardError,
    check_memory,
    community_weights_bytes,
    default_model,
)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "generate.py"
DEFAULT_16GB = "mlx-community/gemma-4-12b-it-4bit"
# What a 16 GB Mac lets the GPU use (11.45 GB), as MLX_UNIFIED_MEMORY_BUDGET spells sizes.
BUDGET_16GB_MAC = f"{gpu_budget_bytes(16 * GIB) / 2**20:.3f}M"


def fresh_machine(tmp_path: Path) -> dict[str, str]:
    """A fresh machine: an empty hub cache and mlx-unified cache, offline, with a 16 GB Mac's budget."""
    return {
        **os.environ,
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_OFFLINE": "1",
        "MLX_UNIFIED_CACHE_DIR": str(tmp_path / "cache"),
        BUDGET_VARIABLE: BUDGET_16GB_MAC,
    }


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    return fresh_machine(tmp_path)


def generate(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300, cwd=REPO, env=env
    )


def one_line_refusal(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("mlx-unified-generate: error: ")
    return result.stderr


# ---------------------------------------------------------------- the default model


def test_the_default_is_the_community_conversion_that_fits():
    assert default_model(gpu_budget_bytes(16 * GIB)) == DEFAULT_16GB
    assert default_model(gpu_budget_bytes(24 * GIB)) == "mlx-community/gemma-4-12b-it-8bit"
    assert default_model(gpu_budget_bytes(64 * GIB)) == "mlx-community/gemma-4-12b-it-bf16"
    assert default_model(gpu_budget_bytes(8 * GIB)) == DEFAULT_16GB  # the smallest; the guard then refuses
    assert [bits for _, bits in COMMUNITY_MODELS] == [None, 8, 4]
    assert community_weights_bytes(4) == pytest.approx(6.8e9, rel=0.02)


def test_first_run_uses_the_default_model_from_the_hub_cache(tiny, env, tmp_path):
    community = convert(tiny.path, tmp_path / "community-4bit", quantize=True)  # what mlx_vlm.convert writes
    add_to_hub_cache(Path(env["HF_HUB_CACHE"]), DEFAULT_16GB, community)
    result = generate(env, "--prompt", "Hello", "--max-tokens", "6")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and "Traceback" not in result.stderr
    assert f"{DEFAULT_16GB} (the default model for this machine)" in result.stderr
    assert "RANDOM weights" in result.stderr


def test_offline_first_run_names_the_model_and_the_way_out(env):
    message = one_line_refusal(generate(env, "--prompt", "Hello"))
    assert f"{DEFAULT_16GB} (the default model for this machine)" in message
    assert "hub cannot be reached" in message and "--demo" in message and "--model" in message


def test_demo_runs_the_random_checkpoint_without_a_download(env):
    first = generate(env, "--demo", "--prompt", "Hello", "--max-tokens", "4")
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() and "RANDOM weights" in first.stderr and "random demo checkpoint" in first.stderr
    demo = Path(env["MLX_UNIFIED_CACHE_DIR"]) / "demo" / "config.json"
    written = demo.stat().st_mtime_ns
    assert generate(env, "--demo", "--prompt", "Hi", "--max-tokens", "2").returncode == 0
    assert demo.stat().st_mtime_ns == written  # written once
    assert "drop --model" in one_line_refusal(generate(env, "--demo", "--quantize", "4", "--prompt", "x"))


# ---------------------------------------------------------------- official weights, converted once


def test_official_weights_are_converted_once_then_reused(tiny, env):
    add_to_hub_cache(Path(env["HF_HUB_CACHE"]), OFFICIAL_MODEL, tiny.path)  # random, in the released layout
    args = ("--model", OFFICIAL_MODEL, "--quantize", "4", "--prompt", "Hello", "--max-tokens", "4")
    first = generate(env, *args)
    assert first.returncode == 0, first.stderr
    assert "Converting google/gemma-4-12B-it once" in first.stderr and "quantized " in first.stderr
    folder = Path(env["MLX_UNIFIED_CACHE_DIR"]) / "converted" / "google--gemma-4-12B-it-4bit"
    assert json.loads((folder / "config.json").read_text())["quantization"]["bits"] == 4
    written = (folder / "config.json").stat().st_mtime_ns
    again = generate(env, *args)
    assert again.returncode == 0, again.stderr
    assert "Converting" not in again.stderr and "converted earlier with --quantize 4bit" in again.stderr
    assert (folder / "config.json").stat().st_mtime_ns == written
    # Alone, --quantize takes the plan's pick for this budget: the tiny model fits unquantized.
    plain = generate(env, "--model", OFFICIAL_MODEL, "--quantize", "--prompt", "Hi", "--max-tokens", "2")
    assert plain.returncode == 0 and "--quantize has nothing to do" in plain.stderr
    assert "already" in one_line_refusal(generate(env, "--model", str(folder), "--quantize", "4", "--prompt", "x"))
    assert "expected bits" in one_line_refusal(generate(env, "--model", OFFICIAL_MODEL, "--quantize", "7", "--prompt", "x"))


# ---------------------------------------------------------------- the memory guard


def write_sparse_12b(folder: Path) -> Path:
    """The released 12B in bf16 as a folder whose shards hold their headers and nothing else: the rest of
    each file is a hole (sparse, no disk used). Loading it would read zeros; the guard reads no weight."""
    folder.mkdir(parents=True)
    config = {"architectures": ["Gemma4UnifiedForConditionalGeneration"], "model_type": "gemma4_unified",
              "text_config": {}, "vision_config": {}, "audio_config": {}, "dtype": "bfloat16"}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    shards: list[dict[str, tuple[int, ...]]] = [{}]
    size = 0
    for name, shape in tensor_shapes(released_config()).items():
        nbytes = 2 * int(np.prod(shape))
        if size + nbytes > 5 * 10**9:
            shards.append({})
            size = 0
        shards[-1][f"model.{name}"] = shape
        size += nbytes
    weight_map, total = {}, 0
    for number, tensors in enumerate(shards, start=1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {}, 0
        for name, shape in tensors.items():
            nbytes = 2 * int(np.prod(shape))
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = file
        encoded = json.dumps(header).encode()
        with open(folder / file, "wb") as f:
            f.write(struct.pack("<Q", len(encoded)) + encoded)
            f.truncate(8 + len(encoded) + offset)
        total += offset
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def test_a_12b_bf16_folder_is_refused_on_a_16gb_budget_before_any_weight_is_read(tmp_path, monkeypatch, capsys):
    folder = write_sparse_12b(tmp_path / "gemma-4-12b-bf16")
    monkeypatch.setenv(BUDGET_VARIABLE, "16GB")

    def no_weights(*args, **kwargs):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(mx, "load", no_weights)
    assert cli.main(["--model", str(folder), "--prompt", "Hello"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "gemma-4-12b-bf16: needs about 24." in err and "it would swap" in err
    # The conversion that fits (the --plan recommendation for 16 GB): 8 bits, here or with the converter.
    assert "add --quantize 8" in err and "python convert.py --hf-path" in err and "-q --q-bits 8" in err
    assert BUDGET_VARIABLE in err


def test_the_official_id_is_refused_before_its_weights_are_downloaded(tmp_path, env):
    folder = write_sparse_12b(tmp_path / "official")
    # The hub cache holds only what the guard fetches first: the JSON files, not one shard.
    add_to_hub_cache(Path(env["HF_HUB_CACHE"]), OFFICIAL_MODEL, folder, ["config.json", "model.safetensors.index.json"])
    message = one_line_refusal(generate(env, "--model", OFFICIAL_MODEL, "--prompt", "Hello"))
    assert "would swap" in message and "add --quantize 6" in message  # the plan's pick on a 16 GB Mac


def test_the_guard_passes_what_fits_and_names_the_community_model_for_quantized_ones():
    config = released_config()
    budget = (gpu_budget_bytes(16 * GIB), "a 16 GB Mac")
    check_memory("4-bit", config, community_weights_bytes(4), 8192, budget)
    with pytest.raises(MemoryGuardError, match="would swap") as refused:
        check_memory("8-bit", config, community_weights_bytes(8), 8192, budget)
    assert "a 16 GB Mac is 11.5 GB" in str(refused.value)


def test_the_guard_counts_a_quantized_kv_cache():
    """The 12 GB plan: 4-bit weights leave the whole context only with an 8-bit KV cache."""
    config = released_config()
    budget = (gpu_budget_bytes(12 * GIB), "a 12 GB Mac")
    context = config.text.max_position_embeddings
    with pytest.raises(MemoryGuardError, match="would swap"):
        check_memory("4-bit", config, community_weights_bytes(4), context, budget)
    check_memory("4-bit", config, community_weights_bytes(4), context, budget, kv_bits=8)
    with pytest.raises(MemoryGuardError, match="8-bit KV cache"):
        check_memory("8-bit", config, community_weights_bytes(8), context, budget, kv_bits=8)


def test_the_budget_variable_is_read_and_checked(monkeypatch):
    monkeypatch.setenv(BUDGET_VARIABLE, "20GB")
    assert memory_budget_bytes() == (20 * GIB, f"the budget {BUDGET_VARIABLE} sets")
    monkeypatch.setenv(BUDGET_VARIABLE, "lots")
    with pytest.raises(InputError, match=BUDGET_VARIABLE):
        memory_budget_bytes()


# ---------------------------------------------------------------- wired memory on a Mac


def test_generation_wires_the_working_set_on_a_mac_and_restores_it(tiny, monkeypatch):
    calls: list[int] = []

    def set_wired_limit(limit: int) -> int:
        calls.append(limit)
        return 7 if len(calls) == 1 else limit

    monkeypatch.setattr(budgets, "device_gpu_limit", lambda: 11_453_251_584)
    monkeypatch.setattr(mx, "set_wired_limit", set_wired_limit)
    steps = generate_step(tiny.model, {"input_ids": np.array([[2, 30, 31, 32]])}, max_tokens=3)
    next(steps)
    assert calls == [11_453_251_584]  # wired while generating
    steps.close()  # the caller stops early, as at a stop token
    assert calls == [11_453_251_584, 7]  # the previous limit is back


def test_the_guard_counts_a_draft_models_weights_beside_the_models(tiny, tmp_path, monkeypatch):
    from mlx_unified import model_source
    from mlx_unified.checkpoint import stored_weight_bytes
    from mlx_unified.testing import tiny_drafter

    drafter = tiny_drafter(tmp_path / "drafter", tiny.path)
    counted = []
    monkeypatch.setattr(model_source, "check_memory", lambda name, config, weights, context, **kv: counted.append(weights))
    model_source.prepare(str(tiny.path), context_tokens=64)
    model_source.prepare(str(tiny.path), context_tokens=64, draft_model=str(drafter))
    assert counted == [stored_weight_bytes(tiny.path), stored_weight_bytes(tiny.path) + stored_weight_bytes(drafter)]
