"""The app's logic without a browser: history rebuilding, settings that survive restarts, safe defaults."""

from __future__ import annotations

import copy
import re
import threading
import time

import pytest
from media_files import write_wav
from scripted_replies import PLAIN_ANSWER, PRIME, THINKING_ANSWER, THOUGHT

from mlx_unified.app import (
    EMPTY_REPLY,
    ERROR_TITLE,
    KV_CACHE_CHOICES,
    PREFILL_NOTE_TOKENS,
    THINKING_TITLE,
    KVCacheSettings,
    ModelSlot,
    PrefillProgress,
    background_events,
    build_parser,
    history_messages,
    main,
    memory_markdown,
    read_settings,
    respond,
    save_setting,
)
from mlx_unified.generation import generate
from mlx_unified.processing import MediaError

LONG_SYSTEM = " ".join(f"Rule {i}: answer in one short sentence." for i in range(130))


@pytest.fixture(scope="module")
def slot(tiny):
    slot = ModelSlot()
    slot.load(str(tiny.path))
    return slot


def reading_note(shown: list[dict]) -> dict | None:
    notes = [m for m in shown if (m.get("metadata") or {}).get("title", "").startswith("Reading the prompt")]
    assert len(notes) <= 1
    return notes[0] if notes else None


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


def test_history_drops_failed_turns_and_notes(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))  # where Gradio keeps what the page uploads
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


def test_history_and_message_read_only_files_uploaded_to_the_app(tmp_path, monkeypatch, slot):
    uploads, elsewhere = tmp_path / "uploads", tmp_path / "server"
    uploads.mkdir(), elsewhere.mkdir()
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(uploads))
    server_file = write_wav(elsewhere / "private.wav")
    uploaded = write_wav(uploads / "mine.wav")
    # Gradio's API sends a text turn as a list of strings: text, even when it names a file here.
    history = [
        {"role": "user", "content": ["first turn"]},
        {"role": "assistant", "content": ["A reply."]},
        {"role": "user", "content": [str(server_file)]},
        {"role": "assistant", "content": ["Another."]},
        {"role": "user", "content": [str(uploaded)]},
        {"role": "user", "content": ["What is it?"]},
        {"role": "assistant", "content": ["A tone."]},
    ]
    messages = history_messages(history)
    assert messages[0]["content"] == [{"type": "text", "text": "first turn"}]
    assert messages[2]["content"] == [{"type": "text", "text": str(server_file)}]  # never read
    assert [part["type"] for part in messages[4]["content"]] == ["audio", "text"]  # the upload is
    for part in ({"type": "file", "file": {"path": str(server_file)}}, {"path": str(server_file)}):
        with pytest.raises(MediaError, match=r"private\.wav: not a file uploaded to this app"):
            history_messages([{"role": "user", "content": [part]}, {"role": "assistant", "content": "x"}])
    shown = list(respond(slot, {"text": "hi", "files": [str(server_file)]}, [], "", 0.0, 1.0, 2, 280))
    assert shown[-1][-1]["metadata"]["title"] == ERROR_TITLE
    assert "not a file uploaded to this app" in shown[-1][-1]["content"]


def test_background_events_stop_at_the_next_chunk_and_free_the_thread():
    calls = []

    def start(progress):
        for chunk in range(1000):
            calls.append(chunk)
            progress(chunk + 1, 1000)
            time.sleep(0.002)
        yield "never reached"

    events = background_events(start)
    assert next(events) == PrefillProgress(1, 1000)
    events.close()  # what Gradio's Stop does to the reply
    assert len(calls) < 1000  # the work ended early...
    assert not any(
        t.name == "mlx-unified-reply" for t in threading.enumerate()
    )  # ...and before close returned

    def failing(progress):
        raise ValueError("bad request")
        yield

    with pytest.raises(ValueError, match="bad request"):
        list(background_events(failing))


def test_long_prompt_shows_its_reading_and_stop_frees_the_model(slot):
    assert len(slot.processor.tokenizer(LONG_SYSTEM)["input_ids"]) >= PREFILL_NOTE_TOKENS
    # Copies: the reply's messages are updated in place between yields (Gradio sends each state at once).
    shown = [copy.deepcopy(s) for s in respond(slot, "Hi", [], LONG_SYSTEM, 0.0, 1.0, 4, 280, 1.0, False)]
    progress = [reading_note(s) for s in shown if reading_note(s)]
    counts = [
        tuple(int(n.replace(",", "")) for n in re.findall(r"[\d,]+", p["metadata"]["title"]))
        for p in progress
    ]
    done, total = counts[-1]
    assert done == total >= PREFILL_NOTE_TOKENS and progress[-1]["metadata"]["status"] == "done"
    assert len(counts) > 1 and counts[0][0] < total  # it moved while the prompt was read
    assert "s to first token" in shown[-1][-1]["metadata"]["title"]

    reply = respond(slot, "Hi", [], LONG_SYSTEM, 0.0, 1.0, 4, 280, 1.0, False)
    for s in reply:
        note = reading_note(s)
        if note is not None and note["metadata"]["status"] == "pending":
            break
    else:
        pytest.fail("the reply never showed the prompt being read")
    reply.close()  # Stop while the prompt is read
    assert slot.lock.acquire(blocking=False)
    slot.lock.release()
    assert not any(t.name == "mlx-unified-reply" for t in threading.enumerate())


def test_thinking_switch_shows_the_thought_in_a_collapsible_block(scripted):
    slot = ModelSlot()
    slot.load(str(scripted))
    question = PRIME[0]["content"]
    *_, final = respond(slot, question, [], "", 0.0, 1.0, 64, 280, 1.0, False, True)
    thinking = [m for m in final if (m.get("metadata") or {}).get("title") == THINKING_TITLE]
    assert len(thinking) == 1 and thinking[0]["content"] == THOUGHT and thinking[0]["metadata"]["status"] == "done"
    answers = [m for m in final if not m.get("metadata")]
    assert [m["content"] for m in answers] == [THINKING_ANSWER]
    # The thought is a note: the next turn's history leaves it out.
    history = [{"role": "user", "content": question}, *final]
    assert [part["text"] for part in history_messages(history)[1]["content"]] == [THINKING_ANSWER]
    *_, plain = respond(slot, question, [], "", 0.0, 1.0, 64, 280, 1.0, False, False)
    assert [m["content"] for m in plain if not m.get("metadata")] == [PLAIN_ANSWER]
    assert not any((m.get("metadata") or {}).get("title") == THINKING_TITLE for m in plain)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--port", "70000"], "--port: 70000 is not a port number"),
        (["--port", "x"], "--port: invalid port_number value"),
        (["--max-tokens", "-5"], "--max-tokens: must be >= 1, got -5"),  # GenerationParams' words, as everywhere
        (["--max-tokens", "9000"], "--max-tokens: 9000 is outside 1 to 8192 (the slider's range)"),
        (["--temperature", "nan"], "--temperature: must be a finite number, got nan"),
    ],
)
def test_refuses_bad_arguments_before_starting(capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_port_in_use_is_one_line_and_exit_2(capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot serve on 127.0.0.1:{port}" in err and len(err.strip().splitlines()) == 1


def test_the_kv_cache_setting_reaches_generation_and_the_estimate(slot, tiny_factory):
    """The page's KV cache setting (--kv-bits its initial value, --kv-group-size and --quantized-kv-start
    with it) runs the reply with that cache, and the memory estimate counts it."""
    wide = tiny_factory(seed=3, head_dim=64, global_head_dim=128)
    quantized = ModelSlot()
    quantized.load(str(wide.path))
    settings = KVCacheSettings(group_size=32, start=0)
    shown = list(respond(quantized, "Hi", [], "", 0.0, 1.0, 5, 280, 1.0, False, False, 4, settings))
    expected = generate(quantized.model, quantized.processor, "Hi", max_tokens=5, kv_bits=4, kv_group_size=32,
                        quantized_kv_start=0, use_prefix_cache=False)
    assert shown[-1][-2]["content"] == expected.text and "s to first token" in shown[-1][-1]["metadata"]["title"]
    refused = list(respond(slot, "Hi", [], "", 0.0, 1.0, 2, 280, 1.0, False, False, 8, settings))  # heads of 16
    assert refused[-1][-1]["metadata"]["title"] == ERROR_TITLE and "head dim 16" in refused[-1][-1]["content"]
    assert [value for _, value in KV_CACHE_CHOICES] == [0, 8, 4]
    plain, eight_bit = memory_markdown(str(wide.path)), memory_markdown(str(wide.path), 8)
    assert "8-bit" in eight_bit and "8-bit" not in plain.split("KV cache")[1]
    args = build_parser().parse_args(["--kv-bits", "8", "--kv-group-size", "32", "--quantized-kv-start", "0"])
    assert (args.kv_bits, args.kv_group_size, args.quantized_kv_start) == (8, 32, 0)


def test_a_damaged_checkpoint_is_refused_at_start_and_by_the_load_button(tiny, tmp_path, capsys):
    import socket

    from test_cli import damaged_copy

    from mlx_unified.app import build_app

    copy = damaged_copy(tiny, tmp_path, "shape")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    assert main(["--model", str(copy), "--port", str(free_port)]) == 2
    err = capsys.readouterr().err
    assert "down_proj.weight has shape (64, 127)" in err and "Traceback" not in err
    slot = ModelSlot()
    page = build_app(slot, tmp_path / "settings.json", [])
    load_button = next(f.fn for f in page.fns.values() if getattr(f.fn, "__name__", "") == "load_picked")
    banner, message = load_button(str(copy), progress=lambda *a, **k: None)
    assert "down_proj.weight has shape (64, 127)" in message and str(copy) in message
    assert slot.model is None  # nothing half-loaded


def test_an_unusable_cache_folder_costs_no_answer(tiny, tmp_path, monkeypatch, caplog):
    cache = tmp_path / "cache"
    cache.write_text("not a folder")
    monkeypatch.setenv("MLX_UNIFIED_CACHE_DIR", str(cache))
    with caplog.at_level("WARNING", logger="mlx_unified.prefix_cache"):
        slot = ModelSlot()
        slot.load(str(tiny.path))
        history = []
        for text in ("Hello", "Again"):
            shown = list(respond(slot, {"text": text, "files": []}, history, LONG_SYSTEM, 0.0, 1.0, 3, 280))[-1]
            assert all((m.get("metadata") or {}).get("title") != ERROR_TITLE for m in shown), shown
            history += [{"role": "user", "content": text}, *shown]
    assert caplog.text.count("is unusable") == 1


def test_draft_model_setting_gives_the_same_reply_and_refuses_a_wrong_drafter(slot, tmp_path):
    """With a drafter, the greedy reply is the same and the statistics note tells the acceptance; a
    drafter of another model, or a missing one, is an error note in the chat, and the next turn works."""
    from mlx_unified.testing import tiny_checkpoint, tiny_drafter

    drafter = tiny_drafter(tmp_path / "drafter", slot.name, copies_last_token=True)
    plain = list(respond(slot, "What is this?", [], "", 0.0, 1.0, 12, 280))[-1]
    speculative = list(respond(slot, "What is this?", [], "", 0.0, 1.0, 12, 280, 1.0, True, False, draft_model=str(drafter), num_draft_tokens="3"))[-1]
    assert speculative[-2]["content"] == plain[-2]["content"]
    assert "of drafts accepted" in speculative[-1]["metadata"]["title"]
    other = tiny_drafter(tmp_path / "other", tiny_checkpoint(tmp_path / "other-model", hidden_size=32))
    for name in (str(other), str(tmp_path / "missing")):
        refused = list(respond(slot, "Hi", [], "", 0.0, 1.0, 4, 280, 1.0, True, False, draft_model=name))[-1]
        assert refused[-1]["metadata"]["title"] == ERROR_TITLE
    assert "made for another model" in list(respond(slot, "Hi", [], "", 0.0, 1.0, 4, 280, 1.0, True, False, draft_model=str(other)))[-1][-1]["content"]
    again = list(respond(slot, "What is this?", [], "", 0.0, 1.0, 12, 280, 1.0, True, False, draft_model=""))[-1]
    assert again[-2]["content"] == plain[-2]["content"]
