"""Edits of safetensors files for the tests that corrupt them: the header rewritten, data kept."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any


def split(path: Path) -> tuple[dict[str, Any], bytes]:
    """(header as a dict, the data bytes after it) of a safetensors file."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def join(header: dict[str, Any] | bytes, data: bytes) -> bytes:
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


def edit_header(path: Path, edit: Callable[[dict[str, Any]], Any]) -> Path:
    """Rewrite `path` with `edit(header)` applied to its header (in place); the data stays as it was."""
    header, data = split(path)
    edit(header)
    path.write_bytes(join(header, data))
    return path


def tensor_names(header: dict[str, Any]) -> list[str]:
    """The tensors of a header in the order of their data."""
    return sorted((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"][0])
