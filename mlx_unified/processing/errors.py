"""The one error type media processing raises for bad input, and the checks every media reader shares."""

import io
import os
import stat
from pathlib import Path

from ..errors import InputError, MediaError

__all__ = ["MediaError", "ProcessorConfigError", "readable_source"]


class ProcessorConfigError(InputError):
    """A checkpoint's tokenizer, chat template or processor settings are missing, unreadable or not
    Gemma 4's; the message names the file."""


def readable_source(source: str | Path | bytes | bytearray, name: str, kind: str) -> str | io.BytesIO:
    """A media source as something decoders open (a path string, or the bytes in memory), after checking
    that the file exists and is not empty, or that the bytes are not empty."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        try:
            info = path.stat()
        except FileNotFoundError:
            raise MediaError(f"{name}: no such file") from None
        except OSError as e:
            raise MediaError(f"{name}: cannot read ({e.strerror or e})") from e
        if stat.S_ISDIR(info.st_mode):
            raise MediaError(f"{name}: is a folder, not a file")
        if not stat.S_ISREG(info.st_mode):
            # A FIFO or device would block or never end: only regular files are read.
            raise MediaError(f"{name}: not a regular file")
        if info.st_size == 0:
            raise MediaError(f"{name}: file is empty")
        if not os.access(path, os.R_OK):
            raise MediaError(f"{name}: cannot read (permission denied)")
        return str(path)
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise MediaError(f"{name}: no {kind} data")
        return io.BytesIO(bytes(source))
    raise MediaError(f"{name}: unsupported {kind} input type")
