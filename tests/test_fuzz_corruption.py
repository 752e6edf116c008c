"""Fuzz: 200 random corruptions (truncation, bit flips, shape edits, offset edits) of a tiny checkpoint's
safetensors and of a stored prefix-cache file, each loaded by a worker process (`fuzz_worker.py`)
watched for crashes and hangs.

Every case must be refused with a typed error (an InputError subclass), or load with identical output.
For a checkpoint "identical" needs care: safetensors carries no checksum, so a bit flipped inside a
tensor's data is a different checkpoint, which no reader can tell from the intended one. There the
loaded weights must be exactly what the format's reference reader (the `safetensors` package) decodes
from the damaged file, NaN or infinite values refused; whenever that decoding equals the intact weights
(a flip in header padding, a shape edit that changes nothing), the greedy tokens must be the intact
ones. A prefix-cache file is checksummed: any change to it is refused or changes nothing.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from safetensors_edits import join, split, tensor_names
from watched_worker import run_watched

from mlx_unified.cache import snapshot
from mlx_unified.checkpoint import hf_to_mlx_name, model_identity
from mlx_unified.loading import load_model
from mlx_unified.prefix_cache import PrefixState, save_prefix

WORKER = Path(__file__).with_name("fuzz_worker.py")
CHECKPOINT_CASES, PREFIX_CASES = 120, 80
KINDS = ("truncation", "bit flips", "shape edit", "offset edit")
START_TIMEOUT_S, CASE_TIMEOUT_S = 240, 30
PREFIX_TOKENS = np.arange(40, 40 + 45, dtype=np.int32)  # longer than the window: the ring has wrapped


def corrupt(data: bytes, kind: str, rng: np.random.Generator) -> tuple[bytes, str]:
    """One random corruption of a safetensors file's bytes, and what it did."""
    header, payload = split_bytes(data)
    names = tensor_names(header)
    if kind == "truncation":
        keep = int(rng.integers(0, len(data)))
        return data[:keep], f"truncated to {keep} of {len(data)} bytes"
    if kind == "bit flips":
        header_end = len(data) - len(payload)
        in_header = rng.random() < 0.5
        low, high = (0, header_end) if in_header else (header_end, len(data))
        damaged = bytearray(data)
        flips = [(int(rng.integers(low, high)), int(rng.integers(8))) for _ in range(int(rng.integers(1, 4)))]
        for position, bit in flips:
            damaged[position] ^= 1 << bit
        return bytes(damaged), f"bits flipped at {flips} (header ends at {header_end})"
    name = names[int(rng.integers(len(names)))]
    entry = header[name]
    if kind == "shape edit":
        shape = list(entry["shape"])
        op = ["grow", "shrink", "reverse", "add a 1", "drop", "zero", "huge"][int(rng.integers(7))]
        axis = int(rng.integers(len(shape))) if shape else 0
        if op == "grow" and shape:
            shape[axis] += 1
        elif op == "shrink" and shape:
            shape[axis] = max(0, shape[axis] - 1)
        elif op == "reverse":
            shape.reverse()
        elif op == "add a 1":
            shape.insert(axis, 1)
        elif op == "drop" and shape:
            shape.pop(axis)
        elif op == "zero" and shape:
            shape[axis] = 0
        else:
            shape = [2**40, *shape[1:]]
        entry["shape"] = shape
        return join(header, payload), f"{name}: shape {op} -> {shape}"
    begin, end = entry["data_offsets"]
    op = ["begin", "end", "both", "negative", "huge", "swap"][int(rng.integers(6))]
    delta = int(rng.choice([-1, 1, -8, 8, int(rng.integers(-len(payload), len(payload)))])) or 1
    entry["data_offsets"] = {
        "begin": [begin + delta, end],
        "end": [begin, end + delta],
        "both": [begin + delta, end + delta],
        "negative": [-abs(delta), end],
        "huge": [begin, 2**63 + abs(delta)],
        "swap": [end, begin],
    }[op]
    return join(header, payload), f"{name}: offsets {op} -> {entry['data_offsets']}"


def split_bytes(data: bytes) -> tuple[dict, bytes]:
    temporary = Path(os.environ["FUZZ_SCRATCH"]) / "split.safetensors"
    temporary.write_bytes(data)
    return split(temporary)


def reference_digests(shard: Path) -> dict[str, str] | None:
    """Our names -> sha256 of the bytes the `safetensors` package decodes; None when it refuses."""
    import hashlib

    try:
        tensors = load_file(str(shard))
    except Exception:
        return None
    digests = {}
    for name, tensor in tensors.items():
        mapped = hf_to_mlx_name(name)
        if mapped is not None:
            raw = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor
            digests[mapped] = hashlib.sha256(raw.contiguous().numpy().tobytes()).hexdigest()
    return digests


def run_worker(spec: dict, spec_file: Path, log: Path) -> dict[int, dict]:
    """Every case's result line; a hung case is a "hang", one that killed the worker a "crash" (`run_watched`)."""
    command = [sys.executable, str(WORKER), str(spec_file)]
    return run_watched(command, spec, spec_file, log, START_TIMEOUT_S, CASE_TIMEOUT_S, env=None)


@pytest.fixture(scope="module")
def cases(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    os.environ["FUZZ_SCRATCH"] = str(folder)
    rng = np.random.default_rng(14)
    intact_shard = tiny.path / "model.safetensors"
    model = load_model(tiny.path)  # bfloat16, as the worker loads it
    cache = model.make_cache()
    model(mx.array(PREFIX_TOKENS[None]), cache=cache)
    identity = model_identity(tiny.path)
    prefix = save_prefix(folder / "prefix.safetensors", PrefixState("fuzz", PREFIX_TOKENS, snapshot(cache)), identity)
    spec = {"checkpoint": str(tiny.path), "identity": identity, "prefix_tokens": PREFIX_TOKENS.tolist(), "cases": []}
    notes = []

    def add(kind: str, source: Path, corruption: str) -> None:
        index = len(spec["cases"])
        if kind == "checkpoint":
            case = folder / f"case-{index}"
            case.mkdir()
            shutil.copy(tiny.path / "config.json", case / "config.json")
            data = source.read_bytes()
            damaged, what = (data, "intact") if corruption == "none" else corrupt(data, corruption, rng)
            (case / "model.safetensors").write_bytes(damaged)
        else:
            case = folder / f"case-{index}.safetensors"
            data = source.read_bytes()
            damaged, what = (data, "intact") if corruption == "none" else corrupt(data, corruption, rng)
            case.write_bytes(damaged)
        spec["cases"].append({"kind": kind, "path": str(case)})
        notes.append(f"{kind} {corruption}: {what}")

    add("checkpoint", intact_shard, "none")
    add("prefix", prefix, "none")
    for i in range(CHECKPOINT_CASES):
        add("checkpoint", intact_shard, KINDS[i % len(KINDS)])
    for i in range(PREFIX_CASES):
        add("prefix", prefix, KINDS[i % len(KINDS)])
    return spec, notes, folder


def test_two_hundred_corruptions_are_refused_typed_or_change_nothing(cases):
    spec, notes, folder = cases
    results = run_worker(spec, folder / "spec.json", folder / "worker-stderr.log")
    intact_checkpoint, intact_prefix = results[0], results[1]
    assert intact_checkpoint["outcome"] == intact_prefix["outcome"] == "loaded", (intact_checkpoint, intact_prefix)
    failures, outcomes = [], {"refused": 0, "loaded": 0}
    for index in range(2, len(spec["cases"])):
        case, result, note = spec["cases"][index], results.get(index, {"outcome": "no result"}), notes[index]
        if result["outcome"] == "refused" and result["typed"]:
            outcomes["refused"] += 1
            continue
        if result["outcome"] != "loaded":
            failures.append(f"case {index} ({note}): {result}")
            continue
        outcomes["loaded"] += 1
        if case["kind"] == "prefix":
            expected = intact_prefix
        else:
            decoded = reference_digests(Path(case["path"]) / "model.safetensors")
            if decoded is None:
                failures.append(f"case {index} ({note}): loaded a file the reference reader refuses")
                continue
            if decoded != intact_checkpoint["digests"]:  # a different checkpoint, read exactly as it is
                if decoded != result["digests"]:
                    failures.append(f"case {index} ({note}): the weights read differ from the file's")
                continue
            expected = intact_checkpoint
        if result["digests"] != expected["digests"] or result["tokens"] != expected["tokens"]:
            failures.append(f"case {index} ({note}): loaded with different output")
    assert not failures, "\n".join(failures)
    assert outcomes["refused"] > 100 and sum(outcomes.values()) == CHECKPOINT_CASES + PREFIX_CASES
