"""`python app.py` with no argument on a fresh machine, in a real browser (as `test_app_browser.py`):
offline with an empty hub cache, the page and stderr say what is missing and how to go on; with the
default model in the local hub cache (a random one), a chat streams; `--demo` chats with no download."""

from __future__ import annotations

from pathlib import Path

from hub_cache import add_to_hub_cache
from playwright.sync_api import sync_playwright
from test_app_browser import (
    CHROMIUM_ARGS,
    assert_first_reply_streams,
    chromium_path,
    running_app,
    send,
    watch_reply_lengths,
)
from test_first_run import DEFAULT_16GB, fresh_machine

from mlx_unified.convert import convert

REPO = Path(__file__).resolve().parents[1]


def chat_streams(url: str) -> str:
    """Open the page, send a message, and check the reply grows while it streams; the banner's text."""
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(p), headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 1000})
        page.goto(url)
        page.locator("#chat").wait_for(timeout=60_000)
        banner = page.locator("#model-banner").inner_text()
        watch_reply_lengths(page)
        send(page, "Hello there.")
        assert_first_reply_streams(page)
        browser.close()
    return banner


def test_offline_first_run_says_what_is_missing_in_the_page_and_on_stderr(tmp_path):
    with running_app(tmp_path, env=fresh_machine(tmp_path)) as (url, log):
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
    with running_app(tmp_path, env=fresh_machine(tmp_path)) as (url, _):
        banner = chat_streams(url)
    assert DEFAULT_16GB in banner and "the default model for this machine" in banner
    assert "RANDOM weights" in banner


def test_demo_chats_with_no_download(tmp_path):
    with running_app(tmp_path, "--demo", env=fresh_machine(tmp_path)) as (url, _):
        banner = chat_streams(url)
    assert "RANDOM weights" in banner and "demo" in banner
