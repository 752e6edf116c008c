"""The app's logic without a browser: history rebuilding, settings that survive restarts, safe defaults."""

from __future__ import annotations

import pytest
from media_files import write_wav

from mlx_unified.app import (
    EMPTY_REPLY,
    ERROR_TITLE,
    build_parser,
    history_messages,
    main,
    read_settings,
    save_setting,
)


def test_system_prompt_survives_restart(tmp_path):
    settings = tmp_path / "config" / "app.json"
    assert read_settings(settings) == {}
    save_setting(settings, "system_prompt", "Sois bref. 短く。")
    assert read_settings(settings) == {"system_prompt": "Sois bref. 短く。"}  # what a new process reads
    settings.write_text("{ not json")
    assert read_settings(settings) == {}  # a damaged file never stops the app


def test_serves_locally_by_default():
    args = build_parser().parse_args([])
    assert args.host == "127.0.0.1" and not args.share


def test_rejects_temperature_outside_the_slider(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--temperature", "3"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "--temperature: 3.0 is outside 0 to 2" in err and "Traceback" not in err


def test_history_drops_failed_turns_and_notes(tmp_path):
    wav = write_wav(tmp_path / "a.wav")
    history = [
        {"role": "user", "content": [{"type": "file", "file": {"path": str(wav)}}]},
        {"role": "user", "content": [{"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A tone."}]},
        {"role": "assistant", "content": "stats", "metadata": {"title": "0.1 s to first token"}},
        {"role": "user", "content": "And this?"},
        {
            "role": "assistant",
            "content": "broken.wav: cannot decode audio",
            "metadata": {"title": ERROR_TITLE},
        },
        {"role": "user", "content": "Again"},
        {"role": "assistant", "content": EMPTY_REPLY},
    ]
    messages = history_messages(history)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    first = messages[0]["content"]
    assert [part["type"] for part in first] == ["audio", "text"] and first[1]["text"] == "What is it?"
    assert messages[1]["content"][0]["text"] == "A tone."
    assert messages[2]["content"][-1]["text"] == "Again" and messages[3]["content"][0]["text"] == ""
