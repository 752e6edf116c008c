"""Read safetensors tensors a slice of rows at a time.

The converter never holds a whole tensor, let alone a whole checkpoint: it reads a block of rows
from a source shard, converts it, and writes it at its final offset in an output shard
(`safetensors_format.ShardWriter`) whose header was laid out before any data was written.
`safetensors.safe_open(framework="numpy")` cannot read bfloat16, and `mx.load` maps a whole shard, so
rows are read straight from the offsets that `safetensors_format.read_header` checked.
"""

from __future__ import annotations

from collections.abc import Iterable

import mlx.core as mx

from mlx_unified.safetensors_format import TensorInfo, read_array, to_array

# Source bytes per converted block: big enough to keep MLX busy, small enough to bound memory.
BLOCK_BYTES = 64 << 20


def read_rows(info: TensorInfo, start: int, stop: int) -> mx.array:
    """Rows [start, stop) of a tensor (along its first axis) as an MLX array of its own dtype."""
    return to_array(read_array(info, start, stop), info.dtype)


def row_blocks(info: TensorInfo, block_bytes: int = BLOCK_BYTES) -> Iterable[tuple[int, int]]:
    """Row ranges covering the tensor, each about `block_bytes` of source data."""
    rows_per_block = max(1, block_bytes // max(info.row_bytes, 1))
    for start in range(0, info.row_count, rows_per_block):
        yield start, min(start + rows_per_block, info.row_count)
