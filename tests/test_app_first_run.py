"""`python app.py` with no argument on a fresh machine, in a real browser (as `test_app_browser.py`):
offline with an empty hub cache, the page and stderr say what is missing and how to go on; with the
default model in the local hub cache (a random one), a chat streams; `--demo` chats with no download."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hub_cache import add_to_hub_cache
from playwright.sync_api import sync_playwright
from test_app_browser import CHROMIUM_ARGS, DONE, bot_texts, chromium_path, free_port, send
from test_first_run import BUDGET_16GB_MAC, DEFAULT_16GB

from mlx_unified.budgets import BUDGET_VARIABLE
from mlx_unified.convert import convert

REPO = Path(__file__).resolve().parents[1]


@contextmanager
def running_app(tmp_path: Path, *args: str) -> Iterator[tuple[str, Path]]:
    """app.py with `args` on a fresh, offline machine with a 16 GB Mac's budget: (its url, its log)."""
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_OFFLINE": "1",
        "MLX_UNIFIED_CACHE_DIR": str(tmp_path / "cache"),
        BUDGET_VARIABLE: BUDGET_16GB_MAC,
        "GRADIO_ANALYTICS_ENABLED": "False",
    }
    port = free_port()
    log_path = tmp_path / "app.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [sys.executable, str(REPO / "app.py"), "--port", str(port), "--settings-file", str(tmp_path / "s.json"),
             "--max-tokens", "200", "--temperature", "0", *args],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    server.kill()
                    pytest.fail(f"app did not start:\n{log_path.read_text()}")
                time.sleep(0.5)
        try:
            yield url, log_path
        finally:
            server.terminate()
            server.wait(timeout=30)


def chat_streams(url: str) -> str:
    """Open the page, send a message, and check the reply grows while it streams; the banner's text."""
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(p), headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 1000})
        page.goto(url)
        page.locator("#chat").wait_for(timeout=60_000)
        banner = page.locator("#model-banner").inner_text()
        send(page, "Hello there.")
        seen: list[str] = []
        deadline = time.monotonic() + 120
        while page.get_by_text(DONE).count() < 1:
            assert time.monotonic() < deadline, "no reply"
            texts = bot_texts(page)
            if texts and texts[0] and (not seen or texts[0] != seen[-1]):
                seen.append(texts[0])
            time.sleep(0.03)
        assert bot_texts(page)[0].strip()
        assert len(seen) >= 2, f"reply did not stream: {seen}"
        browser.close()
    return banner


def test_offline_first_run_says_what_is_missing_in_the_page_and_on_stderr(tmp_path):
    with running_app(tmp_path) as (url, log):
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium_path(p), headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page()
            page.goto(url)
            banner = page.locator("#model-banner")
            banner.wait_for(timeout=60_000)
            text = banner.inner_text()
            browser.close()
        stderr = log.read_text()
    for said in (text, stderr):
        assert DEFAULT_16GB in said and "hub cannot be reached" in said and "--demo" in said
    assert "No model loaded" in text and "Traceback" not in stderr


def test_first_run_chats_with_the_default_model_from_the_hub_cache(tiny, tmp_path):
    community = convert(tiny.path, tmp_path / "community-4bit", quantize=True)
    add_to_hub_cache(tmp_path / "hub", DEFAULT_16GB, community)
    with running_app(tmp_path) as (url, _):
        banner = chat_streams(url)
    assert DEFAULT_16GB in banner and "the default model for this machine" in banner
    assert "RANDOM weights" in banner


def test_demo_chats_with_no_download(tmp_path):
    with running_app(tmp_path, "--demo") as (url, _):
        banner = chat_streams(url)
    assert "RANDOM weights" in banner and "demo" in banner
