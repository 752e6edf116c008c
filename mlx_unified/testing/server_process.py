"""A real `mlx-unified-server` process on a free loopback port, for tests and benchmarks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

API_KEY = "test-key"
START_TIMEOUT_S = 240.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerProcess:
    """`with ServerProcess(checkpoint, "--max-queue", "4") as server:` serves until the block ends.
    `cache_dir`: where its prefix cache persists (MLX_UNIFIED_CACHE_DIR), so a test never writes to the
    user's ~/.cache; `log`: a file for its output."""

    def __init__(
        self,
        checkpoint: str | Path,
        *flags: str,
        cache_dir: str | Path,
        api_key: str = API_KEY,
        log: Path | None = None,
    ) -> None:
        self.port = free_port()
        self.api_key = api_key
        self.name = str(checkpoint)
        self.base_url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "mlx_unified.server", "--model", self.name, "--port", str(self.port)]
        command += ["--api-key", api_key, "--log-level", "warning", *flags]
        self.log = log
        output = open(log, "w") if log is not None else subprocess.DEVNULL  # noqa: SIM115 (closed in stop)
        environment = {**os.environ, "MLX_UNIFIED_CACHE_DIR": str(cache_dir)}
        self.process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=environment)
        self._output = output

    def __enter__(self) -> ServerProcess:
        self.wait_ready()
        return self

    def __exit__(self, *_: Any) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.process.returncode} (log: {self.log})")
            try:
                self.health()
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"the server did not answer within {START_TIMEOUT_S:.0f} s (log: {self.log})")

    def health(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.base_url}/health", timeout=5) as response:
            return json.loads(response.read())

    def client(self, **options: Any) -> Any:
        import openai

        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=self.api_key, max_retries=0, **options)

    def async_client(self, **options: Any) -> Any:
        import openai

        return openai.AsyncOpenAI(base_url=f"{self.base_url}/v1", api_key=self.api_key, max_retries=0, **options)

    def rss_bytes(self) -> int:
        """The server's resident memory now (`ps`: Linux and macOS)."""
        output = subprocess.run(["ps", "-o", "rss=", "-p", str(self.pid)], capture_output=True, text=True, check=True)
        return int(output.stdout.strip()) * 1024

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._output is not subprocess.DEVNULL:
            self._output.close()
