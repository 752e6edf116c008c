"""The conversion itself: every planned tensor read a block of rows at a time from its source shard,
cast (and quantized, or dequantized), and written at its final offset in an output shard whose header
was laid out in advance. The output is built in a hidden sibling folder and renamed into place only
once complete; it never lies in, contains, or replaces the source.

A staging folder is named `.<output name>.partial-<host>-<pid>-<random>`: a run that was killed
outright leaves one behind, and the next run in the same parent folder (to any output) removes those
of processes of this host that are no longer alive; a live run's folder is never touched.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import socket
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlx.core as mx

from mlx_unified.checkpoint import ModelLoadError, float_dtype, resolve
from mlx_unified.config import GLOBAL, ModelConfig
from mlx_unified.convert.planning import (
    ConvertError,
    Job,
    Layout,
    Settings,
    plan_conversion,
    plan_dequantization,
    read_source,
)
from mlx_unified.convert.safetensors_stream import read_rows, row_blocks
from mlx_unified.safetensors_format import ShardWriter, TensorInfo, to_buffer

# Files copied next to the weights: tokenizer, chat template, processor and generation settings.
COPIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "processor_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "generation_config.json",
)
# Free space asked beyond the shards and copied files: file system overhead, index and config.
DISK_SLACK_BYTES = 1 << 20
STAGING = re.compile(r"\.(?P<name>.+)\.(?:partial|previous)-(?P<host>\w+)-(?P<pid>\d+)-[0-9a-f]{8}")


def _check_finite(block: mx.array, source: TensorInfo) -> None:
    if mx.issubdtype(block.dtype, mx.floating) and not mx.isfinite(block).all().item():
        dtype = str(block.dtype).removeprefix("mlx.core.")
        raise ConvertError(
            f"{source.file}: tensor {source.name} holds NaN or infinite values (as {dtype}); "
            "the checkpoint is damaged"
        )


def _convert_job(job: Job, writer: ShardWriter, dtype: mx.Dtype) -> None:
    """Cast (and quantize) one tensor block by block; each output gets its share of every block."""
    assert isinstance(job.source, TensorInfo)
    for start, stop in row_blocks(job.source):
        block = read_rows(job.source, start, stop)
        if mx.issubdtype(block.dtype, mx.floating):
            block = block.astype(dtype)
        _check_finite(block, job.source)
        q = job.quant
        parts = (
            [block]
            if q is None
            else list(mx.quantize(block, group_size=q.group_size, bits=q.bits, mode=q.mode))
        )
        mx.eval(parts)
        for output, part in zip(job.outputs, parts, strict=True):
            row_bytes = output.nbytes // output.shape[0] if output.shape else output.nbytes
            writer.write(output.name, start * row_bytes, to_buffer(part))


def _dequantize_job(job: Job, writer: ShardWriter, dtype: mx.Dtype) -> None:
    (output,) = job.outputs
    if job.quant is None:
        _convert_job(job, writer, dtype)
        return
    assert isinstance(job.source, list)
    packed, *rest = job.source
    q = job.quant
    row_bytes = output.nbytes // output.shape[0]
    for start, stop in row_blocks(packed):
        weight, scales, *biases = (read_rows(t, start, stop) for t in (packed, *rest))
        block = mx.dequantize(
            weight, scales, biases[0] if biases else None, group_size=q.group_size, bits=q.bits, mode=q.mode
        ).astype(dtype)
        _check_finite(block, packed)
        writer.write(output.name, start * row_bytes, to_buffer(block))


def _write_shards(layout: Layout, folder: Path, dtype: mx.Dtype, dequantize: bool) -> dict[str, Any]:
    """Write every shard into `folder`; returns the safetensors index."""
    count = len(layout.shards)
    weight_map: dict[str, str] = {}
    run = _dequantize_job if dequantize else _convert_job
    for number, jobs in enumerate(layout.shards, start=1):
        file_name = "model.safetensors" if count == 1 else f"model-{number:05d}-of-{count:05d}.safetensors"
        outputs = [t for job in jobs for t in job.outputs]
        writer = ShardWriter(folder / file_name, outputs, {"format": "pt" if dequantize else "mlx"})
        try:
            for i, job in enumerate(jobs, start=1):
                run(job, writer, dtype)
                _progress(f"shard {number}/{count}: {i}/{len(jobs)} tensors")
        except BaseException:
            writer.abort()
            raise
        writer.close()
        weight_map.update(dict.fromkeys((t.name for t in outputs), file_name))
    _progress("", end="\n")
    return {"metadata": {"total_size": layout.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}


def _progress(text: str, end: str = "") -> None:
    if sys.stderr.isatty():
        print(f"\r{text:<60}", end=end, file=sys.stderr, flush=True)


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} bytes"


def _check_disk(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise ConvertError(f"not enough free disk in {folder}: the output needs {_size(needed)}, {_size(free)} free")


def _check_paths(source: Path, destination: Path) -> None:
    """Refuse an output that would write inside the source or delete it: the source folder itself, a
    folder inside it, or one that contains it or a file it is made of (symbolic links followed, so a
    hub snapshot's blobs count as its files)."""
    root = source.resolve()
    if destination == root:
        raise ConvertError(f"--mlx-path {destination} is the source checkpoint; choose another folder")
    if destination.is_relative_to(root):
        raise ConvertError(f"--mlx-path {destination} is inside the source checkpoint {root}; choose a folder outside it")
    for part in (root, *(entry.resolve() for entry in root.iterdir())):
        if part.is_relative_to(destination):
            raise ConvertError(
                f"--mlx-path {destination} contains the source checkpoint ({part}), which writing it would "
                "delete; choose another folder"
            )


def _host() -> str:
    return re.sub(r"\W", "_", socket.gethostname()) or "host"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_staging(parent: Path) -> list[Path]:
    """Remove the staging folders in `parent` that runs of this host left when they were killed (their
    process is gone); returns them."""
    host, removed = _host(), []
    for entry in parent.iterdir():
        match = STAGING.fullmatch(entry.name)
        if match and match["host"] == host and not _alive(int(match["pid"])):
            _remove(entry)
            removed.append(entry)
    return removed


@contextmanager
def _staging(destination: Path) -> Iterator[Path]:
    """A hidden sibling folder that replaces `destination` only if the body completes.

    On any failure or interruption the staging folder is removed and `destination` is untouched.
    """
    parent = destination.parent
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(parent)
    tag = f"{_host()}-{os.getpid()}-{secrets.token_hex(4)}"
    staging = parent / f".{destination.name}.partial-{tag}"
    previous = parent / f".{destination.name}.previous-{tag}"
    staging.mkdir()
    try:
        yield staging
        if destination.exists() or destination.is_symlink():
            destination.rename(previous)
        try:
            staging.rename(destination)
        except BaseException:
            if previous.exists():
                previous.rename(destination)
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _remove(previous)


def _write_error(destination: Path, e: OSError) -> ConvertError:
    where = f" ({e.filename})" if e.filename else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        reason = "disk full, quota reached or no free inodes"
        return ConvertError(f"cannot write {destination}: {reason}{where}; nothing was written there")
    return ConvertError(f"cannot write {destination}: {e.strerror or e}{where}; nothing was written there")


def with_peer_defaults(config_dict: dict[str, Any], config: ModelConfig) -> dict[str, Any]:
    """`config_dict` with this model's values spelled out where the peers would take others: mlx-lm
    reads gemma4_unified with its gemma4 text module, whose defaults are per-layer inputs, 20 KV-shared
    layers, double-wide MLPs and a top-level 262144-word vocabulary; and neither peer reads
    transformers' `per_layer_config` spelling of the global layers' shape (`global_head_dim`,
    `num_global_key_value_heads`). A value the source states is kept."""
    text = config.text
    first_global = text.layer(text.layer_types.index(GLOBAL))
    spelled = {
        "num_kv_shared_layers": 0,
        "hidden_size_per_layer_input": 0,
        "use_double_wide_mlp": False,
        "global_head_dim": first_global.head_dim,
        "num_global_key_value_heads": first_global.num_kv_heads,
    }
    text_dict = {**spelled, **(config_dict.get("text_config") or {})}
    return {"vocab_size": text.vocab_size, **config_dict, "text_config": text_dict}


def convert(
    hf_path: str | Path,
    mlx_path: str | Path,
    quantize: bool = False,
    q_bits: int | None = None,
    q_group_size: int | None = None,
    q_mode: str = "affine",
    recipe: str | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    dequantize: bool = False,
    report: Callable[[str], None] | None = None,
) -> Path:
    """Convert into the layout mlx-vlm and mlx-lm load (or with `dequantize`, restore the released layout,
    in `dtype`, default bfloat16 as released); returns the output folder. The source is an
    unquantized folder or hub id, or, to dequantize, a converted folder of ours, mlx-vlm's or mlx-lm's. `report` gets one line saying what
    is quantized (count, bits per weight) before the shards are written.

    Raises ConvertError or QuantizationError with a one-line reason (also when -q would quantize
    nothing); nothing is left at `mlx_path` unless the whole output was written.
    """
    destination = Path(mlx_path).expanduser().resolve()
    if dequantize and (quantize or recipe):
        raise ConvertError("--dequantize cannot be combined with -q/--recipe")
    try:
        source_path = resolve(hf_path)
    except ModelLoadError as e:
        raise ConvertError(str(e)) from e
    if source_path.is_dir():
        _check_paths(source_path, destination)
    if destination.exists() and not overwrite:
        raise ConvertError(f"{destination} already exists (pass --overwrite to replace it)")
    source = read_source(source_path, dequantize=dequantize)
    if dequantize:
        dtype_name = dtype or "bfloat16"
        layout, section = plan_dequantization(source, float_dtype(dtype_name)), {}
        config = dict(source.config_dict)
        if report:
            count = sum(1 for shard in layout.shards for job in shard if job.quant)
            report(f"to the released layout in {dtype_name}: {count} quantized weight matrices dequantized")
    else:
        settings = Settings(
            quantize or recipe is not None, q_bits, q_group_size, q_mode, recipe or "uniform", dtype
        )
        layout, section, dtype_name, quantization = plan_conversion(source, settings)
        config = with_peer_defaults(source.config_dict, source.config)
        if report and quantization:
            report(quantization.summary())
    side_files = [source.path / name for name in COPIED_FILES if (source.path / name).is_file()]
    needed = layout.total_bytes + sum(f.stat().st_size for f in side_files) + DISK_SLACK_BYTES
    config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    config["dtype"] = dtype_name
    if section:
        config["quantization"] = section
        config["quantization_config"] = section  # the key transformers-style readers look for
    try:
        with _staging(destination) as staging:
            _check_disk(staging, needed)
            index = _write_shards(layout, staging, float_dtype(dtype_name), dequantize)
            (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
            (staging / "config.json").write_text(json.dumps(config, indent=2))
            for file in side_files:
                shutil.copy2(file, staging / file.name)
    except OSError as e:
        raise _write_error(destination, e) from e
    return destination
