"""Small media files made at test time (nothing binary is checked in)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile
from PIL import Image

RATE = 16_000


def write_image(path: Path, width: int = 96, height: int = 64) -> Path:
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def voiced_bursts(seconds: float, seed: int = 0) -> np.ndarray:
    """Voice-like 2.5 s bursts (a warbling tone with some noise) separated by 0.5 s of silence.

    webrtcvad calls the bursts speech and the gaps pauses, so long recordings cut between bursts.
    """
    rng = np.random.default_rng(seed)
    t = np.arange(int(2.5 * RATE)) / RATE
    tone = (
        np.sin(2 * np.pi * (150 + 50 * np.sin(2 * np.pi * 3 * t)) * t) * (1 + np.sin(2 * np.pi * 4 * t)) / 2
    )
    parts = []
    while sum(len(p) for p in parts) < seconds * RATE:
        parts += [
            (0.3 * tone + 0.05 * rng.standard_normal(len(t))).astype(np.float32),
            np.zeros(RATE // 2, np.float32),
        ]
    return np.concatenate(parts)[: int(seconds * RATE)]


def write_wav(path: Path, seconds: float = 1.0) -> Path:
    soundfile.write(path, voiced_bursts(seconds), RATE)
    return path


def write_corrupt(path: Path) -> Path:
    """A file named like audio whose bytes are not any audio format."""
    path.write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt " + b"\xff" * 64)
    return path


def write_video(path: Path, seconds: int = 2, fps: int = 4, size: int = 64) -> Path:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(seconds * fps):
            frame = np.full((size, size, 3), (i * 255) // (seconds * fps), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
