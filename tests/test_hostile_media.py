"""Hostile media: decompression bombs, headers that lie, absurd header values, sample rates that are not
sample rates, empty and giant images. Each is refused as a MediaError naming the input (a 400
`invalid_media` from the server) before it costs memory or time, and the server goes on serving.

The bomb's memory and time are measured in a child process (`python tests/test_hostile_media.py
measure SPEC`): its peak resident memory is reset before each hostile call (/proc/self/clear_refs) and
read after it (VmHWM), against the resident memory just before."""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
from media_files import (
    png_header_only,
    voiced_bursts,
    with_flac_length,
    write_audio_seeds,
    write_silence_bomb,
)
from PIL import Image

from mlx_unified.processing import MediaError, load_audio, load_image, preprocess_image
from mlx_unified.processing.image import image_size
from mlx_unified.processing.limits import MAX_CLIP_SECONDS, MAX_RECORDING_SECONDS

BOMB_RATE, BOMB_CHANNELS = 192_000, 8
MEMORY_LIMIT_MB, TIME_LIMIT_S = 256, 5.0
HELLO = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3}


@pytest.fixture(scope="module")
def bombs(tmp_path_factory) -> dict[str, Path]:
    """The 60 s FLAC bomb; the same with no length in its header; the same claiming four hours."""
    folder = tmp_path_factory.mktemp("bombs")
    bomb = write_silence_bomb(folder / "bomb.flac", seconds=60, rate=BOMB_RATE, channels=BOMB_CHANNELS)
    data = bomb.read_bytes()
    (folder / "no-length.flac").write_bytes(with_flac_length(data, 0))
    hours = (MAX_RECORDING_SECONDS + 3600) * BOMB_RATE
    (folder / "four-hours.flac").write_bytes(with_flac_length(data, hours))
    return {"bomb": bomb, "no length": folder / "no-length.flac", "four hours": folder / "four-hours.flac"}


def wav_bytes(seconds: float = 1.0) -> bytes:
    out = io.BytesIO()
    soundfile.write(out, voiced_bursts(seconds), 16_000, format="WAV")
    return out.getvalue()


# The Python API --------------------------------------------------------------------------------------


def test_a_flac_bomb_is_refused_from_its_header_before_decoding(bombs, monkeypatch):
    from mlx_unified.processing import audio

    def no_decoding(*_):
        raise AssertionError("a block of the bomb was decoded")

    monkeypatch.setattr(audio._Mixdown, "add", no_decoding)
    started = time.perf_counter()
    with pytest.raises(
        MediaError, match=r"bomb\.flac: audio is 60\.0 s long \(from its header\); one clip holds at most 30 s"
    ):
        load_audio(bombs["bomb"], max_seconds=MAX_CLIP_SECONDS)
    with pytest.raises(MediaError, match=r"four-hours\.flac: audio is 14400\.0 s long \(from its header\)"):
        load_audio(bombs["four hours"])
    assert time.perf_counter() - started < 1.0


def test_a_header_that_lies_stops_decoding_at_the_limit(bombs, tmp_path):
    with pytest.raises(
        MediaError, match=r"no-length\.flac: audio is longer than 30 s \(decoding stopped there\)"
    ):
        load_audio(bombs["no length"], max_seconds=MAX_CLIP_SECONDS)
    # With no length in its header, a FLAC within the limit is read to its end.
    short = write_silence_bomb(tmp_path / "short.flac", seconds=2, rate=48_000, channels=2)
    (tmp_path / "short-no-length.flac").write_bytes(with_flac_length(short.read_bytes(), 0))
    assert len(load_audio(tmp_path / "short-no-length.flac", max_seconds=MAX_CLIP_SECONDS)) == 32_000
    # An MP3's length is an estimate: its frames are counted as they decode.
    soundfile.write(tmp_path / "long.mp3", voiced_bursts(34.0), 16_000, format="MP3")
    with pytest.raises(MediaError, match=r"long\.mp3: audio is longer than 30 s \(decoding stopped there\)"):
        load_audio(tmp_path / "long.mp3", max_seconds=MAX_CLIP_SECONDS)


def test_a_cut_off_wav_is_not_refused_for_the_length_its_header_claims(tmp_path):
    soundfile.write(tmp_path / "whole.wav", voiced_bursts(40.0), 16_000, subtype="PCM_16")
    data = (tmp_path / "whole.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(data[: len(data) // 2])
    # Half the bytes, less the header's: a few samples short of half the recording.
    assert len(load_audio(tmp_path / "cut.wav", max_seconds=MAX_CLIP_SECONDS)) == pytest.approx(
        320_000, abs=30
    )


def test_the_chat_processor_refuses_a_long_clip_in_the_decoder(tiny, bombs):
    from mlx_unified.generation import generate
    from mlx_unified.processing import user_turn

    with pytest.raises(MediaError, match=r"bomb\.flac: audio is 60\.0 s long \(from its header\)"):
        generate(
            tiny.model, tiny.processor, [user_turn("Describe.", audios=[str(bombs["bomb"])])], max_tokens=1
        )


def test_sample_rates_that_are_not_numbers_are_refused(tiny):
    from mlx_unified.generation import generate
    from mlx_unified.processing import user_turn

    wave = voiced_bursts(0.5)
    for rate in ("16000", float("nan"), float("inf"), None, True, [16000], b"16000"):
        with pytest.raises(MediaError, match=r"sampling rate"):
            load_audio((wave, rate))
    with pytest.raises(
        MediaError, match=r"<tuple>: the sampling rate of \(array, sampling_rate\): .* got str '16000'"
    ):
        load_audio((wave, "16000"))
    with pytest.raises(
        MediaError, match=r"^sampling_rate: sampling rate nan Hz is outside 1000\.\.768000 Hz$"
    ):
        load_audio(wave, float("nan"))
    with pytest.raises(MediaError, match=r"got str '16000'"):
        generate(tiny.model, tiny.processor, [user_turn("Hi", audios=[(wave, "16000")])], max_tokens=1)
    # Numbers of any numeric type are rates.
    assert len(load_audio((wave, np.int64(16_000)))) == len(wave)
    assert len(load_audio((wave, 16_000.0))) == len(wave)


@pytest.mark.parametrize("rate", [10**12, 0, -16_000, 999, 768_001])
def test_a_terahertz_sample_rate_is_refused(rate):
    with pytest.raises(MediaError, match=rf"sampling rate {rate} Hz is outside 1000\.\.768000 Hz"):
        load_audio((voiced_bursts(0.5), rate))


def test_an_array_longer_than_the_limit_is_refused_before_conversion():
    samples = np.zeros(31 * 16_000, np.int16)
    with pytest.raises(MediaError, match=r"<tuple>: audio is 31\.0 s long; one clip holds at most 30 s"):
        load_audio((samples, 16_000), max_seconds=MAX_CLIP_SECONDS)


def wav_with_format(channels: int, rate: int, frames: int = 100) -> bytes:
    """A PCM_16 WAV whose fmt chunk says `channels` and `rate` (the data chunk holds `frames` frames of
    one channel, whatever the header says)."""
    data = np.zeros(frames, np.int16).tobytes()
    fmt = struct.pack(
        "<HHIIHH", 1, channels, rate, rate * channels * 2 & 0xFFFFFFFF, channels * 2 & 0xFFFF, 16
    )
    body = (
        b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    )
    return b"RIFF" + struct.pack("<I", len(body)) + body


@pytest.mark.parametrize(
    ("channels", "rate"), [(0, 16_000), (1000, 16_000), (65535, 16_000), (1, 0), (1, 10), (1, 4_000_000_000)]
)
def test_absurd_header_values_are_a_media_error(channels, rate):
    with pytest.raises(MediaError, match=r"<\d+ bytes>"):
        load_audio(wav_with_format(channels, rate))


def test_a_caf_claiming_a_huge_frame_count_is_decoded_as_far_as_it_goes(tmp_path):
    seeds = write_audio_seeds(tmp_path)
    data = bytearray(seeds["caf"].read_bytes())
    # The 'data' chunk's 64-bit size: set to the largest positive value, as a hostile writer would.
    at = data.find(b"data")
    data[at + 4 : at + 12] = (2**63 - 1).to_bytes(8, "big")
    try:
        wave = load_audio(bytes(data), max_seconds=MAX_CLIP_SECONDS)
    except MediaError as error:
        assert str(error).startswith(f"<{len(data)} bytes>: ")
    else:
        assert 0 < len(wave) <= MAX_CLIP_SECONDS * 16_000


def test_a_container_of_more_than_eight_channels_is_mixed_down_without_crashing(tmp_path):
    # PyAV reads planar frames with more channels than FFmpeg's fixed array of data pointers out of
    # bounds (a fuzzed CAF crashed the process that way): such containers are decoded interleaved.
    import av

    levels = np.arange(12, dtype=np.int16) * 1000
    with av.open(str(tmp_path / "twelve.mka"), "w", format="matroska") as container:
        stream = container.add_stream("pcm_s16le", rate=16_000)
        stream.layout = "7.1.4"
        samples = np.tile(levels, 1600)[None]
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="7.1.4")
        frame.sample_rate, frame.pts = 16_000, 0
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    wave = load_audio(tmp_path / "twelve.mka")
    np.testing.assert_allclose(wave, np.full(1600, levels.mean() / 32768, np.float32), rtol=1e-6)


# Images ----------------------------------------------------------------------------------------------


def test_a_zero_size_image_is_a_media_error():
    for size in ((0, 0), (0, 10), (10, 0)):
        image = Image.new("RGB", size)
        for read in (load_image, image_size, preprocess_image):
            with pytest.raises(MediaError, match=r"<Image>: image has zero size"):
                read(image)
    with pytest.raises(MediaError, match=r"<ndarray>: image has zero size"):
        load_image(np.zeros((0, 5, 3), np.uint8))


@pytest.mark.parametrize(("width", "height"), [(100_000, 100_000), (9000, 9000), (2**31 - 1, 1)])
def test_an_image_of_absurd_dimensions_is_refused_before_decoding(width, height):
    data = png_header_only(width, height)
    started = time.perf_counter()
    for read in (load_image, image_size, preprocess_image):
        with pytest.raises(MediaError, match=rf"<{len(data)} bytes>: image too large"):
            read(data)
    with pytest.raises(MediaError, match=r"<Image>: image too large \(20000x20000"):
        load_image(Image.new("1", (20_000, 20_000)))
    assert time.perf_counter() - started < 2.0


# The server ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(tiny):
    from fastapi.testclient import TestClient

    from mlx_unified.generation import stop_token_ids
    from mlx_unified.generation_params import GenerationParams
    from mlx_unified.server.app import Service, create_app
    from mlx_unified.server.chat import ServerDefaults
    from mlx_unified.server.worker import Worker

    worker = Worker(max_waiting=2)
    stop_ids = stop_token_ids(tiny.model, tiny.processor.tokenizer)
    # Short replies: a transcription has no max_tokens field, and the random model never stops.
    defaults = ServerDefaults(params=GenerationParams(max_tokens=3))
    service = Service(tiny.model, tiny.processor, "tiny", worker, stop_ids, defaults=defaults)
    with TestClient(create_app(service)) as test_client:
        yield test_client
    worker.close()


@pytest.fixture(scope="module")
def normal_time(client) -> float:
    """How long an ordinary chat request takes here (the slowest of three, after a first warm-up)."""
    client.post("/v1/chat/completions", json=HELLO)
    times = []
    for _ in range(3):
        started = time.perf_counter()
        assert client.post("/v1/chat/completions", json=HELLO).status_code == 200
        times.append(time.perf_counter() - started)
    return max(times)


def assert_serving_as_usual(client, normal_time: float) -> None:
    started = time.perf_counter()
    response = client.post("/v1/chat/completions", json=HELLO)
    elapsed = time.perf_counter() - started
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["role"] == "assistant"
    assert elapsed < 3 * normal_time + 0.5, (
        f"an ordinary request took {elapsed:.2f} s (normally {normal_time:.2f} s)"
    )


def audio_part(data: bytes) -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": "wav"}}


def chat_with(part: dict) -> dict:
    return {**HELLO, "messages": [{"role": "user", "content": [part, {"type": "text", "text": "Hi"}]}]}


def test_the_server_refuses_hostile_chat_media_with_invalid_media_and_goes_on_serving(
    client, normal_time, bombs
):
    hostile = {
        "flac bomb": audio_part(bombs["bomb"].read_bytes()),
        "bomb without a length": audio_part(bombs["no length"].read_bytes()),
        "absurd channel count": audio_part(wav_with_format(65535, 16_000)),
        "absurd rate": audio_part(wav_with_format(1, 4_000_000_000)),
        "giant image": {
            "type": "image_url",
            "image_url": {
                "url": "data:image/png;base64," + base64.b64encode(png_header_only(100_000, 100_000)).decode()
            },
        },
        "empty image": {
            "type": "image_url",
            "image_url": {"url": "data:image/png;base64," + base64.b64encode(png_header_only(0, 0)).decode()},
        },
    }
    for what, part in hostile.items():
        started = time.perf_counter()
        response = client.post("/v1/chat/completions", json=chat_with(part))
        assert time.perf_counter() - started < TIME_LIMIT_S, what
        assert response.status_code == 400, (what, response.text)
        error = response.json()["error"]
        assert error["code"] == "invalid_media" and error["type"] == "invalid_request_error", (what, error)
        assert error["param"] == "messages[0].content[0]", (what, error)
        assert_serving_as_usual(client, normal_time)
    assert client.post("/v1/chat/completions", json=chat_with(audio_part(wav_bytes()))).status_code == 200


def transcribe(client, data: bytes, name: str = "recording.flac"):
    return client.post("/v1/audio/transcriptions", data={"model": "tiny"}, files={"file": (name, data)})


def test_transcription_refuses_recordings_over_its_limit_with_invalid_media(
    client, normal_time, bombs, monkeypatch
):
    from mlx_unified.server import transcription

    started = time.perf_counter()
    response = transcribe(client, bombs["four hours"].read_bytes())
    assert time.perf_counter() - started < 1.0
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["code"], error["param"], error["type"]) == (
        "invalid_media",
        "file",
        "invalid_request_error",
    )
    assert "audio is 14400.0 s long (from its header); the limit is 10800 s" in error["message"]
    assert_serving_as_usual(client, normal_time)
    # A recording whose header gives no length is stopped where decoding passes the limit.
    monkeypatch.setattr(transcription, "MAX_RECORDING_SECONDS", 45)
    response = transcribe(client, bombs["no length"].read_bytes())
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_media"
    assert "longer than 45 s (decoding stopped there)" in response.json()["error"]["message"]
    assert_serving_as_usual(client, normal_time)


def test_a_corrupt_transcription_upload_is_invalid_media_as_documented(client, normal_time):
    for data in (b"RIFF\x10\x00\x00\x00WAVEfmt " + b"\xff" * 64, wav_with_format(65535, 16_000), b"\0" * 300):
        response = transcribe(client, data, "broken.wav")
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert (error["code"], error["param"]) == ("invalid_media", "file") and error["message"].startswith(
            "file: <"
        )
        assert_serving_as_usual(client, normal_time)
    response = transcribe(client, wav_bytes(2.0), "speech.wav")
    assert response.status_code == 200 and isinstance(response.json()["text"], str)


# Memory and time, in a child process -----------------------------------------------------------------


def test_a_flac_bomb_costs_little_memory_and_time_through_api_chat_and_transcription(tiny, bombs, tmp_path):
    spec = {"checkpoint": str(tiny.path), **{key: str(path) for key, path in bombs.items()}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    repo = Path(__file__).resolve().parent.parent
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])),
    }
    child = subprocess.run(
        [sys.executable, __file__, "measure", str(tmp_path / "spec.json")],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert child.returncode == 0, child.stderr[-3000:]
    results = json.loads(child.stdout.strip().splitlines()[-1])
    assert set(results) == set(MEASURED)
    for path, result in results.items():
        assert result["as_expected"], (path, result)
        assert result["extra_mb"] < MEMORY_LIMIT_MB, (path, result)
        assert result["seconds"] < TIME_LIMIT_S, (path, result)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _measured(action) -> dict:
    """Whether `action` did what it should, the peak resident memory above the resident memory before
    it, and its wall time."""
    import gc

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
    before = _status_kb("VmRSS")
    started = time.perf_counter()
    as_expected = action()
    seconds = time.perf_counter() - started
    return {"as_expected": as_expected, "extra_mb": (_status_kb("VmHWM") - before) / 1024, "seconds": seconds}


MEASURED = (
    "api: bomb as a chat clip",
    "api: bomb without a length as a chat clip",
    "server chat: bomb",
    "server chat: bomb without a length",
    "server transcription: four-hour header",
    "server transcription: the whole bomb decoded",
    "server transcription: no length, stopped at its limit",
)


def _measure(spec_file: str) -> None:
    from fastapi.testclient import TestClient

    from mlx_unified.generation import generate, stop_token_ids
    from mlx_unified.loading import load
    from mlx_unified.processing import user_turn
    from mlx_unified.server import transcription
    from mlx_unified.server.app import Service, create_app
    from mlx_unified.server.worker import Worker

    spec = json.loads(Path(spec_file).read_text())
    model, processor = load(spec["checkpoint"])
    bomb, no_length, four_hours = (
        Path(spec[key]).read_bytes() for key in ("bomb", "no length", "four hours")
    )

    def api(data: bytes):
        def action() -> bool:
            try:
                generate(model, processor, [user_turn("Describe.", audios=[data])], max_tokens=1)
            except MediaError:
                return True
            return False

        return action

    worker = Worker(max_waiting=2)
    service = Service(model, processor, "tiny", worker, stop_token_ids(model, processor.tokenizer))
    results = {}
    with TestClient(create_app(service)) as client:
        # Warm up every path once with ordinary input, so that what is measured is the hostile input.
        generate(model, processor, [user_turn("Hi", audios=[wav_bytes()])], max_tokens=1)
        assert client.post("/v1/chat/completions", json=chat_with(audio_part(wav_bytes()))).status_code == 200
        assert transcribe(client, wav_bytes(), "speech.wav").status_code == 200

        def chat(data: bytes):
            return lambda: (
                client.post("/v1/chat/completions", json=chat_with(audio_part(data))).status_code == 400
            )

        def upload(data: bytes):
            return lambda: transcribe(client, data).status_code == 400

        def decoded_whole() -> bool:
            wave = transcription.decode_upload(bomb)
            return len(wave) == 60 * 16_000 and not wave.any()

        def stopped() -> bool:
            transcription.MAX_RECORDING_SECONDS = 45
            try:
                return upload(no_length)()
            finally:
                transcription.MAX_RECORDING_SECONDS = MAX_RECORDING_SECONDS

        actions = (
            api(bomb),
            api(no_length),
            chat(bomb),
            chat(no_length),
            upload(four_hours),
            decoded_whole,
            stopped,
        )
        for name, action in zip(MEASURED, actions, strict=True):
            results[name] = _measured(action)
    worker.close()
    print(json.dumps(results), flush=True)
    # The results are out: skip the interpreter's teardown, where MLX's threads, used from the
    # server's worker and from this thread both, can abort the process after the fact.
    os._exit(0)


if __name__ == "__main__" and sys.argv[1:2] == ["measure"]:
    _measure(sys.argv[2])
