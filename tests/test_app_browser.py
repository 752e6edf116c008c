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
from collections.abc import Iterator
from contextlib import contextmanager
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


@contextmanager
def running_app(folder: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[tuple[str, Path]]:
    """app.py serving with `args` (greedy, 200 tokens at most, settings and log in `folder`): (its url,
    its log)."""
    port = free_port()
    log_path = folder / "app.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [sys.executable, str(REPO / "app.py"), "--port", str(port), "--settings-file", str(folder / "settings.json"),
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


@pytest.fixture(scope="module")
def app_url(tmp_path_factory, tiny):
    with running_app(tmp_path_factory.mktemp("app"), "--model", str(tiny.path)) as (url, _):
        yield url


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
    field = page.get_by_label("number input for Max tokens")
    if not field.is_visible():
        page.get_by_text("Settings", exact=True).first.click()
        expect(field).to_be_visible()
    # A value typed while the opening accordion first syncs the slider can be put back: type until it holds.
    for _ in range(10):
        field.fill(str(tokens))
        field.press("Tab")
        time.sleep(0.3)
        if field.input_value() == str(tokens):
            break
    expect(field).to_have_value(str(tokens))


def stop_reply(page, box) -> None:
    """Press Stop until the reply ends (the box is enabled again). Dispatched, not clicked: on a loaded
    machine the streaming page may not hold still for the two frames a click waits for, and a press
    that lands while the button is being drawn is lost."""
    stop = page.get_by_role("button", name="Stop", exact=True)
    deadline = time.monotonic() + 90
    while not box.is_enabled():
        assert time.monotonic() < deadline, "Stop did not end the reply"
        if stop.is_visible():
            stop.dispatch_event("click")
        time.sleep(2.0)


def watch_reply_lengths(page) -> None:
    """Record, in the page, the length of the chat's first reply at every change of the chat's DOM."""
    page.evaluate(
        """() => {
            window.replyLengths = [];
            const chat = document.querySelector('#chat');
            new MutationObserver(() => {
                const reply = chat.querySelector('[data-testid="bot"]');
                if (reply) window.replyLengths.push(reply.innerText.length);
            }).observe(chat, {subtree: true, childList: true, characterData: true});
        }"""
    )


def bot_texts(page) -> list[str]:
    return page.locator('#chat [data-testid="bot"]').all_inner_texts()


def assert_first_reply_streams(page) -> None:
    """The page's first reply grows while it streams (at least one partial state before the end), then
    its statistics appear. Call `watch_reply_lengths` before sending the message: the partial states are
    seen in the page itself, since a starved browser may paint only the last of several updates, but
    each one reaches the page."""
    deadline = time.monotonic() + 120
    while page.get_by_text(DONE).count() < 1:
        assert time.monotonic() < deadline, "no reply"
        time.sleep(0.1)
    final = bot_texts(page)[0]
    assert final.strip()
    lengths = page.evaluate("window.replyLengths")
    assert len([n for n in lengths if 0 < n < len(final)]) >= 1, f"reply did not stream: {lengths}"


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
        watch_reply_lengths(page)
        send(page, "What do you hear?", wav)
        assert_first_reply_streams(page)

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
        stop_reply(page, box)
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
