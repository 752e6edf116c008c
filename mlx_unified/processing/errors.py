"""The one error type media processing raises for bad input, and the checks every media reader shares."""

import io
from pathlib import Path

from ..errors import InputError


class MediaError(InputError):
    """A media input that cannot be used: missing, empty, corrupt, unsupported or out of limits.

    The message names the file (or says what kind of in-memory input it was).
    """


def readable_source(source: str | Path | bytes | bytearray, name: str, kind: str) -> str | io.BytesIO:
    """A media source as something decoders open (a path string, or the bytes in memory), after checking
    that the file exists and is not empty, or that the bytes are not empty."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise MediaError(f"{name}: no such file")
        if path.stat().st_size == 0:
            raise MediaError(f"{name}: file is empty")
        return str(path)
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise MediaError(f"{name}: no {kind} data")
        return io.BytesIO(bytes(source))
    raise MediaError(f"{name}: unsupported {kind} input type")
