"""Fuzz: 1,000 mutations (bit flips, truncation, inserted bytes, header fields overwritten with extreme
values; fixed seed) of small WAV, FLAC, MP3 and CAF files, each given to the Python API
(`load_audio` with the chat clip limit), to the command line (`main(argv)` in-process: its exit code and
what it writes on stderr) and to the server (an `input_audio` chat part and a transcription upload,
through the application in-process). Every one must be a typed error or a reply: a MediaError from the
API, exit code 0 or 2 with one line and no traceback from the command line, a 200 or a 400 in OpenAI's
shape from the server; never a 500, an untyped exception, a crash or a hang.

A decoder's native crash must not take the test down silently: the cases run in a worker process
(`python tests/test_fuzz_audio.py worker SPEC`, as `fuzz_worker.py` does for checkpoints) that prints one
JSON line per case and is watched: a case after which no line comes in time is a hang, one during which
the worker dies a crash (the worker is restarted after it). A few dozen cases also go through the real
command line, one `--chat` session that attaches each file in turn.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from media_files import write_audio_seeds
from watched_worker import run_watched

from mlx_unified.processing import MediaError, load_audio

CASES_PER_FORMAT = 250
KINDS = ("bit flips", "truncation", "inserted bytes", "header field")
EXTREMES = (0, 1, 2**64 - 1, 2**63 - 1, 2**63, 2**31, 2**32 - 1)
START_TIMEOUT_S, CASE_TIMEOUT_S = 120, 30
REAL_CLI_CASES = 40
REPO = Path(__file__).resolve().parent.parent
PROG = "mlx-unified-generate"


def mutate(data: bytes, kind: str, rng: np.random.Generator) -> tuple[bytes, str]:
    """One random mutation of a file's bytes, and what it did. Most go to the first bytes, where the
    headers are: flipped data bits only change the sound."""
    damaged = bytearray(data)
    if kind == "bit flips":
        flips = []
        for _ in range(int(rng.integers(1, 9))):
            end = min(len(damaged), 128) if rng.random() < 0.7 else len(damaged)
            position, bit = int(rng.integers(0, end)), int(rng.integers(8))
            damaged[position] ^= 1 << bit
            flips.append((position, bit))
        return bytes(damaged), f"bits flipped at {flips}"
    if kind == "truncation":
        keep = int(rng.integers(0, len(data)))
        return data[:keep], f"truncated to {keep} of {len(data)} bytes"
    if kind == "inserted bytes":
        position, count = int(rng.integers(0, len(data))), int(rng.integers(1, 65))
        damaged[position:position] = rng.integers(0, 256, count, dtype=np.uint8).tobytes()
        return bytes(damaged), f"{count} random bytes inserted at {position}"
    width = int(rng.choice([1, 2, 4, 8]))
    position = int(rng.integers(0, min(len(data), 96) - width))
    value = int(EXTREMES[int(rng.integers(len(EXTREMES)))]) & ((1 << (8 * width)) - 1)
    order = "little" if rng.random() < 0.5 else "big"
    damaged[position : position + width] = value.to_bytes(width, order)
    return bytes(damaged), f"{width}-byte field at {position} set to {value:#x} ({order}-endian)"


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict:
    """The intact seeds, then CASES_PER_FORMAT mutations of each, as files."""
    folder = tmp_path_factory.mktemp("audio-fuzz")
    seeds = write_audio_seeds(folder)
    rng = np.random.default_rng(23)
    spec: dict = {"cases": [], "notes": []}
    for fmt, path in seeds.items():
        spec["cases"].append(str(path))
        spec["notes"].append(f"intact {fmt}")
    for i in range(CASES_PER_FORMAT * len(seeds)):
        fmt = list(seeds)[i % len(seeds)]
        kind = KINDS[(i // len(seeds)) % len(KINDS)]
        damaged, what = mutate(seeds[fmt].read_bytes(), kind, rng)
        path = folder / f"case-{i:04d}.{fmt}"
        path.write_bytes(damaged)
        spec["cases"].append(str(path))
        spec["notes"].append(f"{fmt} {kind}: {what}")
    return {"spec": spec, "folder": folder, "intact": len(seeds)}


def child_env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }


def run_worker(spec: dict, spec_file: Path, log: Path) -> dict[int, dict]:
    """Every case's result line; a hung case is a "hang", one that killed the worker a "crash" (`run_watched`)."""
    command = [sys.executable, __file__, "worker", str(spec_file)]
    return run_watched(command, spec, spec_file, log, START_TIMEOUT_S, CASE_TIMEOUT_S, env=child_env())


def judge(result: dict) -> list[str]:
    """What is wrong with one case's result (nothing: a typed error or a reply on every path)."""
    if "api" not in result:
        return [f"the worker's {result['outcome']}"]
    problems = []
    api, cli, chat, upload = result["api"], result["cli"], result["chat"], result["transcription"]
    if api["outcome"] == "refused" and not api["typed"]:
        problems.append(f"API: untyped {api['error']}: {api['message']}")
    if api["outcome"] == "refused" and not api["message"].startswith(result["path"]):
        problems.append(f"API: the error does not name the file: {api['message']}")
    if cli["exit"] not in (0, 2) or "Traceback" in cli["stderr"] or cli.get("raised"):
        problems.append(
            f"CLI: exit {cli['exit']}, raised {cli.get('raised')}, stderr {cli['stderr'][-500:]!r}"
        )
    if cli["exit"] == 2 and not (
        cli["stderr"].startswith(f"{PROG}: error: ") and cli["stderr"].count("\n") == 1
    ):
        problems.append(f"CLI: a refusal is not one line: {cli['stderr'][-500:]!r}")
    for path, reply in (("chat", chat), ("transcription", upload)):
        if reply["status"] == 400:
            if reply["type"] != "invalid_request_error" or not reply["code"]:
                problems.append(f"{path}: a 400 not in OpenAI's shape: {reply}")
        elif reply["status"] != 200:
            problems.append(f"{path}: status {reply['status']}: {reply}")
    # The chat path decodes with the API's limit: the two agree.
    if (api["outcome"] == "refused") != (chat["status"] == 400):
        problems.append(f"API {api['outcome']} but chat {chat['status']} {chat.get('message')}")
    if chat["status"] == 400 and chat["code"] != "invalid_media":
        problems.append(f"chat: a refused clip is {chat['code']}, not invalid_media")
    return problems


def test_fuzzed_audio_is_a_typed_error_or_a_reply_through_api_cli_and_server(cases, tiny):
    spec, folder = {**cases["spec"], "checkpoint": str(tiny.path)}, cases["folder"]
    started = time.perf_counter()
    results = run_worker(spec, folder / "spec.json", folder / "worker-stderr.log")
    seconds = time.perf_counter() - started
    failures, outcomes = [], {"refused": 0, "decoded": 0}
    for index, note in enumerate(spec["notes"]):
        result = results.get(index, {"outcome": "no result"})
        problems = judge({**result, "path": spec["cases"][index]})
        if index < cases["intact"] and "api" in result and result["api"]["outcome"] != "decoded":
            problems.append("an intact seed was refused")
        failures += [f"case {index} ({note}): {problem}" for problem in problems]
        if "api" in result:
            outcomes[result["api"]["outcome"]] += 1
    assert not failures, "\n".join(failures[:40])
    # The mutations reach both sides: some files still decode, many are refused.
    assert outcomes["refused"] > 200 and outcomes["decoded"] > 200, outcomes
    assert sum(outcomes.values()) == len(spec["cases"]) >= 1000
    print(f"{len(spec['cases'])} cases through API, CLI and server in {seconds:.1f} s: {outcomes}")
    (folder / "results.json").write_text(json.dumps(results))


def test_fuzzed_audio_through_the_real_command_line_is_one_line_per_refusal(cases, scripted):
    """One `--chat` session of the real command line attaches fuzzed files one by one: each file the
    API refuses is an `error:` naming it, each other one gets a reply, and the session goes on."""
    spec = cases["spec"]
    rng = np.random.default_rng(5)
    chosen = sorted(int(i) for i in rng.choice(len(spec["cases"]), REAL_CLI_CASES, replace=False))
    turns = "".join(f"/audio {spec['cases'][i]}\nWhat is this?\n/clear\n" for i in chosen) + "/quit\n"
    command = [sys.executable, str(REPO / "generate.py"), "--model", str(scripted), "--chat"]
    command += ["--max-tokens", "1", "--no-prefix-cache"]
    finished = subprocess.run(
        command, input=turns, capture_output=True, text=True, timeout=240, env=child_env(), cwd=REPO
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "Traceback" not in finished.stderr
    # Decoders' native messages go to the same stderr, sometimes inside a line: the refusals are found
    # by the file they name.
    named = set(re.findall(r"error: (\S+\.(?:wav|flac|mp3|caf)): ", finished.stderr))
    expected = set()
    for i in chosen:
        try:
            load_audio(spec["cases"][i])
        except MediaError:
            expected.add(spec["cases"][i])
    assert named == expected and 0 < len(expected) < len(chosen), (named, expected)
    # Each file that decodes gets a reply (one line of the scripted model's text each).
    assert finished.stdout.count("\n") >= len(chosen) - len(expected), finished.stdout[-2000:]


# The worker ------------------------------------------------------------------------------------------


def _api(path: str) -> dict:
    from mlx_unified.errors import InputError
    from mlx_unified.processing import load_audio
    from mlx_unified.processing.limits import MAX_CLIP_SECONDS

    try:
        wave = load_audio(path, max_seconds=MAX_CLIP_SECONDS)
    except Exception as error:  # judged by the test: only typed refusals pass
        typed = isinstance(error, InputError)
        return {"outcome": "refused", "typed": typed, "error": type(error).__name__, "message": str(error)}
    return {"outcome": "decoded", "samples": len(wave)}


def _cli(path: str, checkpoint: str) -> dict:
    from mlx_unified import cli

    argv = ["--model", checkpoint, "--prompt", "What is this?", "--audio", path, "--max-tokens", "1"]
    argv += ["--no-prefix-cache"]
    stderr, stdout = io.StringIO(), io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
            code = cli.main(argv)
    except BaseException as error:  # judged by the test: main() returns its exit code, it raises nothing
        return {"exit": None, "raised": f"{type(error).__name__}: {error}", "stderr": stderr.getvalue()}
    return {"exit": code, "stderr": stderr.getvalue()}


def _reply(response) -> dict:
    body = response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
    error = body.get("error") or {}
    return {
        "status": response.status_code,
        "type": error.get("type"),
        "code": error.get("code"),
        "message": error.get("message"),
    }


def _worker(spec_file: str) -> None:
    import base64
    import logging

    from fastapi.testclient import TestClient

    from mlx_unified import cli
    from mlx_unified.generation import stop_token_ids
    from mlx_unified.generation_params import GenerationParams
    from mlx_unified.loading import load
    from mlx_unified.server.app import Service, create_app
    from mlx_unified.server.chat import ServerDefaults
    from mlx_unified.server.worker import Worker

    logging.disable(logging.WARNING)  # truncated-file warnings, the random-weights notice
    spec = json.loads(Path(spec_file).read_text())
    checkpoint = spec["checkpoint"]
    model, processor = load(checkpoint)
    # The command line loads its model once here, not once a case: what it does with the file is tested.
    cli.load_model = lambda args: (model, processor, Path(checkpoint))
    worker = Worker(max_waiting=2)
    defaults = ServerDefaults(params=GenerationParams(max_tokens=1))
    service = Service(
        model, processor, "tiny", worker, stop_token_ids(model, processor.tokenizer), defaults=defaults
    )
    with TestClient(create_app(service), raise_server_exceptions=False) as client:
        print(json.dumps({"ready": True}), flush=True)
        for index in range(spec["start"], len(spec["cases"])):
            path = spec["cases"][index]
            data = Path(path).read_bytes()
            part = {
                "type": "input_audio",
                "input_audio": {"data": base64.b64encode(data).decode(), "format": "wav"},
            }
            chat = {
                "model": "tiny",
                "max_tokens": 1,
                "messages": [{"role": "user", "content": [part, {"type": "text", "text": "Hi"}]}],
            }
            result = {
                "api": _api(path),
                "cli": _cli(path, checkpoint),
                "chat": _reply(client.post("/v1/chat/completions", json=chat)),
                "transcription": _reply(
                    client.post(
                        "/v1/audio/transcriptions",
                        data={"model": "tiny"},
                        files={"file": (Path(path).name, data)},
                    )
                ),
            }
            print(json.dumps({"case": index, **result}), flush=True)
    worker.close()
    # Every line is out: skip the interpreter's teardown, where MLX's threads can abort the process.
    os._exit(0)


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    _worker(sys.argv[2])
