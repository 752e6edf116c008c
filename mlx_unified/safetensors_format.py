"""The safetensors file format, checked: one reader of headers for the loader, the converter and the
prefix cache, and one writer.

A file is an 8-byte little-endian header length, a JSON header (tensor name -> dtype, shape and
`data_offsets` relative to the data that follows, plus an optional `__metadata__` map of strings), then
the raw little-endian data. `read_header` refuses every header the format's reference reader (the
`safetensors` package) refuses: an absurd header length, a header that is not one JSON object, a tensor
listed twice, a dtype, shape or offset of the wrong type, negative offsets, a byte length other than
dtype x shape, and offsets that overlap, leave holes, or run past the file (a truncated file). So the
bytes of every tensor it returns are inside the file and belong to that tensor alone.

Nothing here imports MLX at module level: the command line and `checkpoint.py` use it freely; the
three functions that convert to and from MLX arrays import it when called.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import InputError

if TYPE_CHECKING:
    import mlx.core as mx

# Bytes per element of every whole-byte dtype the format defines.
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8, "C64": 8,
}  # fmt: skip
# The dtypes read into arrays, as numpy holds their bytes: bfloat16 travels as uint16 (numpy has no
# bfloat16) and is reinterpreted by MLX.
NUMPY_DTYPES = {
    "BF16": np.dtype("<u2"),
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "U32": np.dtype("<u4"),
    "U8": np.dtype("u1"),
    "I32": np.dtype("<i4"),
    "I64": np.dtype("<i8"),
}
# The reference reader's limit; real headers are a few hundred kilobytes.
MAX_HEADER_BYTES = 100_000_000
METADATA_KEY = "__metadata__"


class SafetensorsError(InputError):
    """A safetensors file is truncated or corrupt, or holds a dtype we do not read."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: absolute offsets [begin, end) in `file`."""

    name: str
    dtype: str  # safetensors tag, e.g. "BF16"
    shape: tuple[int, ...]
    file: Path
    begin: int
    end: int

    @property
    def row_count(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_bytes(self) -> int:
        return (self.end - self.begin) // max(self.row_count, 1)


@dataclass(frozen=True)
class OutputTensor:
    """A tensor to be written: name, safetensors dtype tag, shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0  # bool is an int to Python, never to the format


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise SafetensorsError(f"{key!r} is listed twice")
        result[key] = value
    return result


def _parse(path: Path, raw: bytes) -> dict[str, Any]:
    if not raw.startswith(b"{"):
        raise SafetensorsError(f"{path}: corrupt header (not a JSON object)")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{path}: corrupt header ({e})") from e
    except SafetensorsError as e:
        raise SafetensorsError(f"{path}: corrupt header ({e})") from e
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: corrupt header (not a JSON object)")
    return header


def check_header(path: Path, header: dict[str, Any], data_start: int, file_size: int) -> dict[str, TensorInfo]:
    """The tensors of a parsed header, each checked, their offsets against each other and the file."""
    metadata = header.get(METADATA_KEY)
    if metadata is None:
        metadata = {}  # MLX writes null for no metadata
    elif not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsError(f"{path}: corrupt header ({METADATA_KEY} must map strings to strings)")
    entries = []
    for name, entry in header.items():
        if name == METADATA_KEY:
            continue
        if not isinstance(entry, dict):
            raise SafetensorsError(f"{path}: tensor {name}: corrupt header entry")
        tag, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if tag not in DTYPE_SIZES:
            raise SafetensorsError(f"{path}: tensor {name} has unknown dtype {tag!r}")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise SafetensorsError(f"{path}: tensor {name} has an invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
            raise SafetensorsError(f"{path}: tensor {name} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        if end - begin != math.prod(shape) * DTYPE_SIZES[tag]:
            raise SafetensorsError(
                f"{path}: tensor {name} has inconsistent offsets: {end - begin} bytes for "
                f"{tag} x {tuple(shape)}"
            )
        entries.append(TensorInfo(name, tag, tuple(shape), path, data_start + begin, data_start + end))
    position = data_start
    for info in sorted(entries, key=lambda t: (t.begin, t.end)):
        if info.begin != position:
            what = "overlaps the tensor before it" if info.begin < position else "leaves a gap before it"
            raise SafetensorsError(f"{path}: tensor {info.name} {what} (corrupt offsets)")
        position = info.end
    if position > file_size:
        raise SafetensorsError(f"{path}: truncated: the tensors end at byte {position}, the file has {file_size}")
    if position < file_size:
        raise SafetensorsError(
            f"{path}: {file_size - position} bytes after the last tensor (corrupt offsets or header)"
        )
    return {info.name: info for info in entries}


def read_header(path: str | Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """(tensors by name, metadata) of a safetensors file, every check of the module docstring passed.

    Raises SafetensorsError naming the file (and the tensor); OSError when the file cannot be read."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise SafetensorsError(f"{path}: truncated (no header)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise SafetensorsError(f"{path}: truncated or corrupt header (claims {header_len} bytes)")
        raw = f.read(header_len)
    header = _parse(path, raw)
    tensors = check_header(path, header, 8 + header_len, size)
    return tensors, dict(header.get(METADATA_KEY) or {})


def read_array(info: TensorInfo, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Rows [start, stop) of a tensor (along its first axis; all of it by default) as numpy holds its
    bytes (NUMPY_DTYPES)."""
    if info.dtype not in NUMPY_DTYPES:
        raise SafetensorsError(f"{info.file}: tensor {info.name} has unsupported dtype {info.dtype}")
    raw_dtype = NUMPY_DTYPES[info.dtype]
    stop = info.row_count if stop is None else stop
    count = (stop - start) * info.row_bytes // raw_dtype.itemsize
    with open(info.file, "rb") as f:
        f.seek(info.begin + start * info.row_bytes)
        raw = np.fromfile(f, dtype=raw_dtype, count=count)
    if raw.size != count:
        raise SafetensorsError(f"{info.file}: truncated while reading {info.name}")
    return raw.reshape((stop - start, *info.shape[1:]) if info.shape else ())


def to_array(raw: np.ndarray, tag: str) -> mx.array:
    """An MLX array of dtype `tag` from `read_array`'s numpy array."""
    import mlx.core as mx

    array = mx.array(raw)
    return array.view(mx.bfloat16) if tag == "BF16" else array


def dtype_tag(dtype: mx.Dtype) -> str:
    """The safetensors tag of an MLX dtype."""
    import mlx.core as mx

    tags = {mx.bfloat16: "BF16", mx.float16: "F16", mx.float32: "F32", mx.uint32: "U32", mx.uint8: "U8",
            mx.int32: "I32", mx.int64: "I64"}  # fmt: skip
    return tags[dtype]


def to_buffer(array: mx.array) -> np.ndarray:
    """The little-endian bytes of an evaluated MLX array, as safetensors stores them: a flat uint8 numpy
    view of its memory (a copy only when the array is not contiguous)."""
    import mlx.core as mx

    if array.dtype == mx.bfloat16:
        array = array.view(mx.uint16)
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


class ShardWriter:
    """A safetensors file whose header is written first, so tensor data can arrive in any order.

    Each tensor's bytes go to their final offset; `close` flushes them (so a full disk or a failed
    write raises there, not later) and checks every byte was written.
    """

    def __init__(self, path: Path, tensors: list[OutputTensor], metadata: dict[str, str]) -> None:
        header: dict[str, object] = {METADATA_KEY: metadata}
        offset = 0
        self._offsets: dict[str, tuple[int, int]] = {}
        for t in tensors:
            header[t.name] = {
                "dtype": t.dtype,
                "shape": list(t.shape),
                "data_offsets": [offset, offset + t.nbytes],
            }
            self._offsets[t.name] = (offset, offset + t.nbytes)
            offset += t.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned, as safetensors writes it
        self._data_start = 8 + len(encoded)
        self._written = dict.fromkeys(self._offsets, 0)
        self.path = path
        self.data_bytes = offset
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(encoded)) + encoded)

    def write(self, name: str, byte_offset: int, data: bytes | np.ndarray) -> None:
        """Write `data` at `byte_offset` within tensor `name`."""
        begin, end = self._offsets[name]
        if begin + byte_offset + len(data) > end:
            raise SafetensorsError(f"{self.path}: write past the end of {name}")
        self._file.seek(self._data_start + begin + byte_offset)
        self._file.write(data)
        self._written[name] += len(data)

    def close(self, durable: bool = True) -> None:
        """`durable`: also wait until the data is on the disk (a file kept, not a cache that checks itself)."""
        try:
            self._file.flush()
            if durable:
                os.fsync(self._file.fileno())
        finally:
            self._file.close()
        short = [n for n, (b, e) in self._offsets.items() if self._written[n] != e - b]
        if short:
            raise SafetensorsError(f"{self.path}: tensors not fully written: {short[:3]}")

    def abort(self) -> None:
        """Close without the checks, on the way out of a failed write (whose error is the one to report)."""
        try:
            self._file.close()
        except OSError:
            pass
