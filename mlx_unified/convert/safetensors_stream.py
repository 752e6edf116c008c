"""Read and write safetensors files a slice of rows at a time.

The converter never holds a whole tensor, let alone a whole checkpoint: it reads a block of rows
from a source shard, converts it, and writes it at its final offset in an output shard whose header
was laid out before any data was written. `safetensors.safe_open(framework="numpy")` cannot read
bfloat16, and `mx.load` maps a whole shard, so the format (8-byte header length, JSON header,
raw little-endian data) is handled here directly.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

# safetensors dtype tag -> (numpy dtype holding the raw bytes, MLX dtype). bfloat16 travels as uint16
# through numpy, which has no bfloat16, and is reinterpreted by MLX.
_DTYPES: dict[str, tuple[np.dtype, mx.Dtype]] = {
    "BF16": (np.dtype("<u2"), mx.bfloat16),
    "F16": (np.dtype("<f2"), mx.float16),
    "F32": (np.dtype("<f4"), mx.float32),
    "U32": (np.dtype("<u4"), mx.uint32),
    "U8": (np.dtype("u1"), mx.uint8),
    "I32": (np.dtype("<i4"), mx.int32),
    "I64": (np.dtype("<i8"), mx.int64),
}
_TAG_OF_MX = {mx_dtype: tag for tag, (_, mx_dtype) in _DTYPES.items()}

# The largest header we accept; real ones are a few hundred kilobytes.
_MAX_HEADER_BYTES = 100 << 20
# Source bytes per converted block: big enough to keep MLX busy, small enough to bound memory.
BLOCK_BYTES = 64 << 20


class SafetensorsError(ValueError):
    """A safetensors file is truncated, corrupt or holds a dtype we do not handle."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors tag, e.g. "BF16"
    shape: tuple[int, ...]
    file: Path
    begin: int  # absolute byte offset of the data in `file`
    end: int

    @property
    def row_count(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_bytes(self) -> int:
        return (self.end - self.begin) // max(self.row_count, 1)


def dtype_tag(dtype: mx.Dtype) -> str:
    return _TAG_OF_MX[dtype]


def itemsize(tag: str) -> int:
    return _DTYPES[tag][0].itemsize


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse a shard's header and check that every tensor's bytes are actually in the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise SafetensorsError(f"{path}: truncated (no header)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(_MAX_HEADER_BYTES, size - 8):
            raise SafetensorsError(f"{path}: truncated or corrupt header (claims {header_len} bytes)")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{path}: corrupt header ({e})") from e
    data_start = 8 + header_len
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        tag, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        if tag not in _DTYPES:
            raise SafetensorsError(f"{path}: tensor {name} has unsupported dtype {tag}")
        if end - begin != math.prod(shape) * itemsize(tag):
            raise SafetensorsError(f"{path}: tensor {name} has inconsistent offsets")
        if data_start + end > size:
            raise SafetensorsError(
                f"{path}: truncated: tensor {name} ends at byte {data_start + end}, file has {size}"
            )
        infos[name] = TensorInfo(name, tag, shape, path, data_start + begin, data_start + end)
    return infos


def read_rows(info: TensorInfo, start: int, stop: int) -> mx.array:
    """Rows [start, stop) of a tensor (along its first axis) as an MLX array of its own dtype."""
    raw_dtype, mx_dtype = _DTYPES[info.dtype]
    offset = info.begin + start * info.row_bytes
    count = (stop - start) * info.row_bytes // raw_dtype.itemsize
    with open(info.file, "rb") as f:
        f.seek(offset)
        raw = np.fromfile(f, dtype=raw_dtype, count=count)
    if raw.size != count:
        raise SafetensorsError(f"{info.file}: truncated while reading {info.name}")
    shape = (stop - start, *info.shape[1:]) if info.shape else ()
    array = mx.array(raw.reshape(shape))
    return array.view(mx_dtype) if info.dtype == "BF16" else array


def row_blocks(info: TensorInfo, block_bytes: int = BLOCK_BYTES) -> Iterable[tuple[int, int]]:
    """Row ranges covering the tensor, each about `block_bytes` of source data."""
    rows_per_block = max(1, block_bytes // max(info.row_bytes, 1))
    for start in range(0, info.row_count, rows_per_block):
        yield start, min(start + rows_per_block, info.row_count)


def to_bytes(array: mx.array) -> bytes:
    """The little-endian bytes of an evaluated MLX array, as safetensors stores them."""
    if array.dtype == mx.bfloat16:
        array = array.view(mx.uint16)
    return np.asarray(array).tobytes()


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)


class ShardWriter:
    """An output shard whose header is written first, so tensor data can arrive in any order.

    Each tensor's bytes go to their final offset; `close` checks every byte was written.
    """

    def __init__(self, path: Path, tensors: list[OutputTensor], metadata: dict[str, str]) -> None:
        header: dict[str, object] = {"__metadata__": metadata}
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

    def write(self, name: str, byte_offset: int, data: bytes) -> None:
        """Write `data` at `byte_offset` within tensor `name`."""
        begin, end = self._offsets[name]
        if begin + byte_offset + len(data) > end:
            raise SafetensorsError(f"{self.path}: write past the end of {name}")
        self._file.seek(self._data_start + begin + byte_offset)
        self._file.write(data)
        self._written[name] += len(data)

    def close(self) -> None:
        self._file.close()
        short = [n for n, (b, e) in self._offsets.items() if self._written[n] != e - b]
        if short:
            raise SafetensorsError(f"{self.path}: tensors not fully written: {short[:3]}")

    def abort(self) -> None:
        self._file.close()
