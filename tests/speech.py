"""Real speech for long-audio tests: espeak-ng phrases joined by sox, with pauses of known length."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from mlx_unified.processing import load_audio

PHRASES = [
    "The weather today is sunny with a light breeze from the west.",
    "Please remember to buy bread, milk and a dozen eggs on the way home.",
    "Our train leaves the central station at half past seven in the morning.",
    "The museum opens a new exhibition about ancient maps next Tuesday.",
    "She planted tomatoes, peppers and basil in the garden behind the house.",
    "Turn left at the second traffic light and park near the blue building.",
    "The committee will publish its final report at the end of the month.",
    "A good cup of coffee and a quiet room make the work go much faster.",
]
PAUSES = [0.7, 1.1, 0.6, 0.9, 1.3, 0.8, 1.0, 0.65]


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is required for these tests (apt-get install espeak-ng sox)"
    return path


def long_speech_file(folder: Path) -> tuple[Path, list[tuple[float, float]]]:
    """About 75 s of phrases separated by known pauses, as a 16 kHz WAV in `folder`: (path, [(pause_start,
    pause_end) seconds, ...])."""
    pieces, pauses, t = [], [], 0.0
    index = 0
    while t < 75.0:
        phrase, pause = PHRASES[index % len(PHRASES)], PAUSES[index % len(PAUSES)]
        raw, padded = folder / f"p{index}.wav", folder / f"p{index}_16k.wav"
        subprocess.run([tool("espeak-ng"), "-s", "165", "-w", str(raw), phrase], check=True)
        # sox: resample to 16 kHz mono 16-bit and append the pause as digital silence.
        subprocess.run(
            [
                tool("sox"),
                str(raw),
                "-r",
                "16000",
                "-c",
                "1",
                "-b",
                "16",
                str(padded),
                "pad",
                "0",
                str(pause),
            ],
            check=True,
        )
        wave = load_audio(padded)
        t += len(wave) / 16000
        # The known pause: the appended silence (espeak's own trailing silence only makes it longer).
        pauses.append((t - pause, t))
        pieces.append(padded)
        index += 1
    joined = folder / "long.wav"
    subprocess.run([tool("sox"), *map(str, pieces), str(joined)], check=True)
    return joined, pauses
