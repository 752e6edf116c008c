"""The app in a real browser: `app.py` on a tiny checkpoint, driven by Playwright in headless Chromium (the
system's on Linux, Playwright's own on a Mac: `scripts/setup.sh` installs either)."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from media_files import write_corrupt, write_wav
from playwright.sync_api import expect, sync_playwright

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "tests" / "artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DONE = re.compile(r"s to first token")


def chromium_path(playwright) -> str:
    """The system's Chromium (Debian's package), else the one `playwright install chromium` fetched."""
    for candidate in (shutil.which("chromium"), shutil.which("chromium-browser"), playwright.chromium.executable_path):
        if candidate and Path(candidate).exists():
            return candidate
    pytest.fail("the browser test needs Chromium: run scripts/setup.sh (apt-get install chromium on Debian)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory, tiny):
    folder = tmp_path_factory.mktemp("app")
    model = tiny.path
    port = free_port()
    log = (folder / "app.log").open("w")
    server = subprocess.Popen(
        [sys.executable, str(REPO / "app.py"), "--model", str(model), "--port", str(port),
         "--settings-file", str(folder / "settings.json"), "--max-tokens", "200", "--temperature", "0"],
        stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
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
                pytest.fail(f"app did not start:\n{(folder / 'app.log').read_text()}")
            time.sleep(0.5)
    yield url
    server.terminate()
    server.wait(timeout=30)


def send(page, text: str, attachment: Path | None = None) -> None:
    box = page.locator('[data-testid="textbox"]')
    # While a reply runs the box is disabled; Gradio empties and enables it as the reply's last step
    # (after the statistics note shows), and a file attached before then would be dropped.
    expect(box).to_be_enabled(timeout=60_000)
    if attachment is not None:
        page.locator('input[type=file][accept*="audio"]').set_input_files(str(attachment))
        # The file shows in the box once uploaded to the server.
        box.locator('xpath=ancestor::div[contains(@class, "input-wrapper")]').locator(
            '[aria-label="File thumbnail"]'
        ).wait_for(timeout=30_000)
    box.fill(text)
    box.press("Enter")


def set_max_tokens(page, tokens: int) -> None:
    settings = page.get_by_text("Settings", exact=True).first
    field = page.get_by_label("number input for Max tokens")
    if not field.is_visible():
        settings.click()
    field.fill(str(tokens))
    field.press("Enter")
    expect(field).to_have_value(str(tokens))


def bot_texts(page) -> list[str]:
    return page.locator('#chat [data-testid="bot"]').all_inner_texts()


def test_chat_streams_reports_errors_retries_stops_and_recovers(app_url, tmp_path):
    wav = write_wav(tmp_path / "hello.wav")
    corrupt = write_corrupt(tmp_path / "corrupt.wav")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(p), headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 1300})
        page.goto(app_url)
        page.locator("#chat").wait_for(timeout=60_000)
        assert "RANDOM weights" in page.locator("#model-banner").inner_text()
        assert "fits" in page.locator("#memory-estimate").inner_text()

        # 1. Text plus a WAV: the reply grows while it streams, then its statistics appear. The app
        # starts greedy (--temperature 0) so that the random model's reply is the same on every run:
        # sampled, it sometimes drew an end-of-turn token after a few tokens and never streamed.
        send(page, "What do you hear?", wav)
        seen: list[str] = []
        deadline = time.monotonic() + 120
        while page.get_by_text(DONE).count() < 1:
            assert time.monotonic() < deadline, "no reply"
            texts = bot_texts(page)
            if texts and texts[0] and (not seen or texts[0] != seen[-1]):
                seen.append(texts[0])
            time.sleep(0.03)
        final = bot_texts(page)[0]
        assert final.strip()
        assert len(seen) >= 2, f"reply did not stream: {seen}"  # at least one partial state before the end

        # 2. A corrupt file: an error message in the chat, the app keeps going.
        send(page, "And this one?", corrupt)
        page.get_by_text("Could not answer").first.wait_for(timeout=60_000)
        page.get_by_text("cannot decode audio").first.wait_for(timeout=10_000)

        # 3. A normal reply after the error (history holds turn 1 only: the failed turn is dropped).
        send(page, "Say something else.")
        deadline = time.monotonic() + 120
        while page.get_by_text(DONE).count() < 2:
            assert time.monotonic() < deadline, "no reply after the error"
            time.sleep(0.1)
        assert page.get_by_text("Could not answer").count() == 1
        box = page.locator('[data-testid="textbox"]')
        expect(box).to_be_enabled(timeout=60_000)
        before_retry = [text for text in bot_texts(page) if not DONE.search(text)]  # without statistics

        # 4. Retry regenerates the last reply in place; greedy, it is the same text again.
        page.get_by_role("button", name="Retry", exact=True).last.click()
        expect(box).to_be_disabled(timeout=10_000)
        expect(box).to_be_enabled(timeout=120_000)
        after_retry = [text for text in bot_texts(page) if not DONE.search(text)]
        assert after_retry == before_retry and page.get_by_text(DONE).count() == 2

        # 5. Stop ends a reply mid-stream: the text stops growing, no statistics, and the model is free.
        # The reply may run to the slider's most tokens, so that Stop always lands while it streams (200
        # tokens of the tiny model can end before the click on a loaded machine).
        set_max_tokens(page, 8192)
        shown = len(bot_texts(page))
        send(page, "Keep talking.")
        deadline = time.monotonic() + 120
        while len(bot_texts(page)) <= shown or not bot_texts(page)[-1].strip():
            assert time.monotonic() < deadline, "no reply to stop"
            time.sleep(0.03)
        page.get_by_role("button", name="Stop", exact=True).click()
        expect(box).to_be_enabled(timeout=30_000)
        stopped = bot_texts(page)
        time.sleep(1.0)
        assert len(stopped) == shown + 1 and stopped[-1].strip()  # the partial reply stays, no statistics
        assert bot_texts(page) == stopped and page.get_by_text(DONE).count() == 2
        set_max_tokens(page, 200)
        send(page, "One more.")
        deadline = time.monotonic() + 120
        while page.get_by_text(DONE).count() < 3:
            assert time.monotonic() < deadline, "no reply after a stop"
            time.sleep(0.1)
        page.screenshot(path=str(ARTIFACTS / "app_chat.png"), full_page=True)
        browser.close()
