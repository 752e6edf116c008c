"""Small media files made at test time (nothing binary is checked in)."""

from __future__ import annotations

import struct
import zlib
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


def write_silence_bomb(path: Path, seconds: int = 60, rate: int = 192_000, channels: int = 8) -> Path:
    """A FLAC of silence at a high rate and channel count: a small file that decodes to `seconds` x
    `rate` x `channels` samples, thousands of times its size (a decompression bomb)."""
    block = np.zeros((rate, channels), np.int16)
    settings = {"samplerate": rate, "channels": channels, "format": "FLAC", "subtype": "PCM_16"}
    with soundfile.SoundFile(path, "w", **settings) as out:
        for _ in range(seconds):
            out.write(block)
    return path


def with_flac_length(data: bytes, total_samples: int) -> bytes:
    """A FLAC's bytes with its STREAMINFO total-samples field (36 bits) set: 0 says "length unknown",
    as encoders writing to a pipe leave it; another value is a header that lies."""
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0, "STREAMINFO comes first"
    edited = bytearray(data)
    at = 8 + 13  # the field's top 4 bits are the low half of STREAMINFO's byte 13
    edited[at] = (edited[at] & 0xF0) | ((total_samples >> 32) & 0x0F)
    edited[at + 1 : at + 5] = (total_samples & 0xFFFFFFFF).to_bytes(4, "big")
    return bytes(edited)


def write_audio_seeds(folder: Path, seconds: float = 0.5) -> dict[str, Path]:
    """Small intact WAV, FLAC, MP3 and CAF files (some stereo at 22.05 kHz, so decoding also mixes and
    resamples): the seeds that fuzz tests mutate."""
    mono = voiced_bursts(seconds)
    stereo_rate = 22_050
    t = np.arange(int(seconds * stereo_rate)) / stereo_rate
    stereo = np.stack([0.3 * np.sin(2 * np.pi * 220 * t), 0.3 * np.sin(2 * np.pi * 330 * t)], axis=1)
    seeds = {
        "wav": (mono, RATE, "WAV", "PCM_16"),
        "flac": (stereo, stereo_rate, "FLAC", "PCM_16"),
        "mp3": (mono, RATE, "MP3", "MPEG_LAYER_III"),
        "caf": (stereo, stereo_rate, "CAF", "PCM_16"),
    }
    paths = {}
    for kind, (samples, rate, fmt, subtype) in seeds.items():
        paths[kind] = folder / f"seed.{kind}"
        soundfile.write(paths[kind], samples, rate, format=fmt, subtype=subtype)
    return paths


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims `width x height` (a decompression bomb's signature) with almost no data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )
