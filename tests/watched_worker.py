"""Running fuzz cases in a watched worker process: a case that hangs or crashes the worker is recorded
as such, and the worker is restarted after it (the fuzz tests' shared runner)."""

from __future__ import annotations

import json
import selectors
import subprocess
from pathlib import Path


def run_watched(
    command: list[str],
    spec: dict,
    spec_file: Path,
    log: Path,
    start_timeout_s: float,
    case_timeout_s: float,
    env: dict[str, str] | None = None,
) -> dict[int, dict]:
    """Every case's result line from `command` (which reads `spec_file`: the spec with the case to
    start at, and prints one JSON line per case); a case after which no line came in time is a
    "hang", one during which the worker died a "crash"."""
    results: dict[int, dict] = {}
    start = 0
    while start < len(spec["cases"]):
        spec_file.write_text(json.dumps({**spec, "start": start}))
        with open(log, "ab") as errors:
            worker = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, env=env)
        lines = selectors.DefaultSelector()
        lines.register(worker.stdout, selectors.EVENT_READ)
        current, timeout = start, start_timeout_s
        try:
            while current < len(spec["cases"]):
                if not lines.select(timeout):
                    results[current] = {"outcome": "hang"}
                    break
                line = worker.stdout.readline()
                if not line:
                    results[current] = {"outcome": "crash", "returncode": worker.wait()}
                    break
                result = json.loads(line)
                timeout = case_timeout_s
                if "case" in result:
                    results[result["case"]] = result
                    current = result["case"] + 1
        finally:
            worker.kill()
            worker.wait()
            worker.stdout.close()
        start = current + 1 if current < len(spec["cases"]) else current
    return results
