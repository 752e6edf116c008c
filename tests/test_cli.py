"""`generate.py` driven as a subprocess on a tiny random checkpoint, plus the shared reply helpers in-process."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from media_files import voiced_bursts, write_corrupt, write_image, write_video, write_wav
from scripted_replies import PLAIN_ANSWER, PRIME, THINKING_ANSWER, THOUGHT

from mlx_unified.cli import ThoughtDisplay
from mlx_unified.conversation import Media, ReplyStats, SegmentStart, stream_reply
from mlx_unified.generation import GenerationResponse
from mlx_unified.loading import load

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "generate.py"


@pytest.fixture(scope="session")
def media(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("media")
    return {
        "image": write_image(folder / "picture.png"),
        "audio": write_wav(folder / "speech.wav"),
        "video": write_video(folder / "clip.mp4"),
        "corrupt": write_corrupt(folder / "broken.wav"),
    }


def generate(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO,
    )


def assert_reply(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "RANDOM weights" in result.stderr  # the random checkpoint is called out
    assert "tokens/s" in result.stderr and "peak memory" in result.stderr


def test_text_json_with_system_file(tiny, tmp_path):
    system = tmp_path / "system.txt"
    system.write_text("Réponds en français, s'il te plaît. 日本語も可。", encoding="utf-8")
    result = generate(
        "--model", str(tiny.path), "--prompt", "Hello", "--system-file", str(system), "--max-tokens", "8", "--json"
    )
    assert_reply(result)
    reply = json.loads(result.stdout)
    assert reply["generation_tokens"] == 8 and reply["finish_reason"] == "length"
    assert reply["prompt_tokens"] > 20  # the system prompt went in
    assert reply["ttft_s"] > 0 and reply["generation_tps"] > 0 and reply["peak_memory_gb"] > 0
    assert isinstance(reply["text"], str)


@pytest.mark.parametrize("kind", ["image", "audio", "video"])
def test_media_streams_reply(tiny, media, kind):
    result = generate(
        "--model", str(tiny.path), "--prompt", f"Describe the {kind}.", f"--{kind}", str(media[kind]),
        "--max-tokens", "6", "--temp", "0.7", "--top-p", "0.9", "--top-k", "50", "--min-p", "0.05", "--seed", "3",
        "--image-tokens", "70",
    )  # fmt: skip
    assert_reply(result)
    assert "generation 6 tokens" in result.stderr
    assert result.stdout.endswith("\n")


def test_chat_keeps_history_and_media_per_turn(tiny, media):
    turns = f"/audio {media['audio']}\nWhat is this?\n/image /no/such.png\nAnd this?\n/image {media['image']}\nNow?\n/quit\n"
    result = generate("--model", str(tiny.path), "--chat", "--json", "--max-tokens", "4", stdin=turns)
    assert result.returncode == 0, result.stderr
    replies = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(replies) == 2  # the turn with the missing image was refused and skipped
    assert "/no/such.png: no such file" in result.stderr and "Traceback" not in result.stderr
    # The second turn's prompt holds the first turn (with its audio) and its reply: history is kept.
    assert replies[1]["prompt_tokens"] > replies[0]["prompt_tokens"] + 4


def test_max_kv_size_ends_replies_where_the_cache_is_full_and_a_chat_outgrowing_it_goes_on(tiny):
    first = generate("--model", str(tiny.path), "--prompt", "Hello", "--json", "--max-tokens", "1")
    assert first.returncode == 0, first.stderr
    cap = str(json.loads(first.stdout)["prompt_tokens"] + 2)
    capped = generate("--model", str(tiny.path), "--prompt", "Hello", "--json", "--max-tokens", "40", "--max-kv-size", cap)
    assert capped.returncode == 0, capped.stderr
    reply = json.loads(capped.stdout)
    assert reply["generation_tokens"] <= 2 and (reply["finish_reason"] == "length" or reply["generation_tokens"] < 2)
    # The second turn holds the first and its reply: past the cap, refused by its flag; the session goes on.
    chat = generate("--model", str(tiny.path), "--chat", "--json", "--max-kv-size", cap, stdin="Hello\nAgain\n/clear\nHello\n/quit\n")
    assert chat.returncode == 0, chat.stderr
    assert len(chat.stdout.splitlines()) == 2 and "Traceback" not in chat.stderr
    assert "error: --max-kv-size: the prompt is" in chat.stderr and "/clear starts a new conversation" in chat.stderr


def test_refusals_exit_2_with_one_line(tiny, media, tmp_path):
    not_utf8 = tmp_path / "latin1.txt"
    not_utf8.write_bytes("caf\xe9".encode("latin-1"))
    cases = {
        "missing file": (["--image", str(tmp_path / "nope.png")], "nope.png: no such file"),
        "corrupt audio": (["--audio", str(media["corrupt"])], "broken.wav: cannot decode audio"),
        "bad flag": (["--temprature", "2"], "unrecognized arguments: --temprature"),
        # Generation values through GenerationParams, named by their flag, before the model loads.
        "temperature": (["--temperature", "-1"], "--temperature: must be in [0, inf] (0: greedy), got -1"),
        "top-p": (["--top-p", "2"], "--top-p: must be in (0, 1] (1: off), got 2"),
        "max tokens": (["--max-tokens", "0"], "--max-tokens: must be >= 1, got 0"),
        "prefill step": (["--prefill-step-size", "-1"], "--prefill-step-size: must be >= 1, got -1"),
        "max kv size": (["--max-kv-size", "0"], "--max-kv-size: must be >= 1, got 0"),
        "template config": (["--chat-template-config", "[1]"], "--chat-template-config/--chat-template-args: must be a JSON object"),
        "bad budget": (["--image-tokens", "300"], "--image-tokens: invalid choice"),
        "system file": (["--system-file", str(not_utf8)], "not UTF-8 text"),
        "draft count": (["--num-draft-tokens", "many"], "--num-draft-tokens: expected 'auto' or a count, got 'many'"),
    }
    # Started together: each one pays the interpreter and MLX start-up, none loads the model.
    running = {
        name: subprocess.Popen(
            [sys.executable, str(SCRIPT), "--model", str(tiny.path), "--prompt", "hi", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )  # fmt: skip
        for name, (args, _) in cases.items()
    }
    for name, process in running.items():
        stdout, stderr = process.communicate(timeout=240)
        assert process.returncode == 2, (name, stderr)
        assert stderr.count("\n") == 1 and "Traceback" not in stderr, (name, stderr)
        assert stderr.startswith("mlx-unified-generate: error: ") and cases[name][1] in stderr, (name, stderr)
        assert "Loading" not in stderr and stdout == ""  # refused before the model loads


# ---------------------------------------------------------------- shared helpers, in-process


def response(tokens: int, tps: float, ttft: float, peak: float) -> GenerationResponse:
    return GenerationResponse(
        prompt_tokens=10,
        prompt_tps=100.0,
        generation_tokens=tokens,
        generation_tps=tps,
        ttft_s=ttft,
        peak_memory_gb=peak,
        finish_reason="stop",
        text="",
        token=0,
    )


def test_stats_fold_passes():
    stats = ReplyStats()
    stats.add_pass(response(11, 10.0, 0.5, 1.0))  # 10 timed steps in 1 s
    stats.add_pass(response(21, 20.0, 0.9, 2.0))  # 20 timed steps in 1 s
    assert stats.ttft_s == 0.5 and stats.prompt_tokens == 20 and stats.generation_tokens == 32
    assert stats.generation_tps == pytest.approx(15.0) and stats.peak_memory_gb == 2.0


def test_long_audio_is_answered_segment_by_segment(tiny):
    model, processor = load(tiny.path)
    stats = ReplyStats()
    events = list(
        stream_reply(
            model, processor, [], "Transcribe.", Media(audios=[voiced_bursts(42.0)]), stats, max_tokens=3
        )
    )
    segments = [e for e in events if isinstance(e, SegmentStart)]
    assert [(s.index, s.count) for s in segments] == [(1, 2), (2, 2)]
    assert (
        segments[0].start_s == 0
        and 15 <= segments[0].end_s <= 30
        and segments[1].end_s == pytest.approx(42.0)
    )
    assert stats.generation_tokens == 6 and stats.prompt_tokens > 1000  # two passes of ~20 s of audio each
    assert np.isfinite(stats.generation_tps)


def test_system_prompt_prefix_is_reused_by_the_next_run(tiny, tmp_path, prefix_cache_folder):
    system = tmp_path / "persona.txt"
    system.write_text("You are a patient voice assistant. Answer briefly. " * 40, encoding="utf-8")
    common = ["--model", str(tiny.path), "--system-file", str(system), "--max-tokens", "6", "--json"]
    cold = generate(*common, "--prompt", "What time is it?")
    warm = generate(*common, "--prompt", "What time is it?")
    off = generate(*common, "--prompt", "What time is it?", "--no-prefix-cache")
    for result in (cold, warm, off):
        assert_reply(result)
    cold, warm, off = (json.loads(r.stdout) for r in (cold, warm, off))
    assert cold["cached_tokens"] == 0 and off["cached_tokens"] == 0
    assert 400 < warm["cached_tokens"] < warm["prompt_tokens"]  # the system turn came from disk
    assert cold["text"] == warm["text"] == off["text"]  # greedy: identical with and without the cache
    assert list(prefix_cache_folder.rglob("*.safetensors"))


def test_audio_emphasis_flag(tiny, media):
    ok = generate("--model", str(tiny.path), "--audio", str(media["audio"]), "--prompt", "Transcribe.",
                  "--audio-emphasis", "0.4", "--max-tokens", "4")  # fmt: skip
    assert_reply(ok)
    refused = generate("--model", str(tiny.path), "--prompt", "x", "--audio-emphasis", "0")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "--audio-emphasis" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1


def test_draft_model_gives_the_same_reply_and_reports_its_acceptance(tiny, tmp_path):
    from mlx_unified.testing import tiny_checkpoint, tiny_drafter

    drafter = tiny_drafter(tmp_path / "drafter", tiny.path, copies_last_token=True)
    base = ["--model", str(tiny.path), "--prompt", "What is this?", "--max-tokens", "16", "--json"]
    plain, speculative = generate(*base), generate(*base, "--draft-model", str(drafter), "--num-draft-tokens", "3")
    assert_reply(plain)
    assert_reply(speculative)
    reply = json.loads(speculative.stdout)
    assert reply["text"] == json.loads(plain.stdout)["text"]
    assert reply["draft_tokens"] > 0 and 0 <= reply["acceptance_rate"] <= 1 and reply["mean_accepted_length"] >= 1
    assert "speculative: " in speculative.stderr and "drafts accepted" in speculative.stderr
    other = tiny_drafter(tmp_path / "other", tiny_checkpoint(tmp_path / "other-model", hidden_size=32))
    for flag, message in ((str(other), "made for another model: backbone_hidden_size 32"), ("/no/such", "/no/such")):
        refused = generate("--model", str(tiny.path), "--prompt", "x", "--draft-model", flag)
        last = refused.stderr.strip().splitlines()[-1]
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
        assert last.startswith("mlx-unified-generate: error: ") and message in last, last


def test_the_earlier_name_of_the_prefix_cache_flag_is_still_accepted():
    from mlx_unified.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["--model", "m", "--no-prompt-cache"]).no_prefix_cache
    assert not parser.parse_args(["--model", "m"]).no_prefix_cache
    assert "--no-prefix-cache" in parser.format_help() and "--no-prompt-cache" not in parser.format_help()


def test_long_recording_in_a_chat_leaves_later_turns_answerable(tiny, tmp_path):
    long_wav = write_wav(tmp_path / "long.wav", seconds=40.0)
    result = generate(
        "--model", str(tiny.path), "--chat", "--max-tokens", "3",
        stdin=f"/audio {long_wav}\nTranscribe this.\nAnd summarize it.\nThanks.\n/quit\n",
    )  # fmt: skip
    assert_reply(result)
    assert "error:" not in result.stderr
    assert result.stderr.count("[audio segment ") == 2  # the recording, answered in two clips
    assert result.stderr.count("time to first token") == 3  # and every later turn, the clips in its history


def assert_refused(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("seed", ["-1", str(2**64)])
def test_seed_outside_the_generators_range_is_refused(tiny, seed):
    assert_refused(generate("--model", str(tiny.path), "--prompt", "x", "--seed", seed), "--seed: must be between 0 and 2**64 - 1")


def test_invalid_utf8_is_refused_in_arguments_and_skipped_in_a_chat(tiny):
    for flag in ("--prompt", "--system", "--task-reminder"):
        args = [sys.executable, str(SCRIPT), "--model", str(tiny.path), "--prompt", "x", flag, b"caf\xe9"]
        result = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=REPO)
        assert_refused(result, f"{flag}: not valid UTF-8 text")
    chat = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", str(tiny.path), "--chat", "--max-tokens", "2"],
        input=b"caf\xe9\nHello\n/quit\n", capture_output=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    stderr = chat.stderr.decode()
    assert chat.returncode == 0 and "Traceback" not in stderr
    assert "that line is not valid UTF-8 text" in stderr and stderr.count("time to first token") == 1


def test_closed_or_vanishing_stdout_ends_without_a_traceback(tiny):
    closed = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", str(tiny.path), "--prompt", "x"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=60, cwd=REPO,
        preexec_fn=lambda: os.close(1),
    )  # fmt: skip
    assert_refused(closed, "standard output is closed")
    reader = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--model", str(tiny.path), "--prompt", "Hello", "--max-tokens", "200"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
    )  # fmt: skip
    reader.stdout.read(1)  # what `| head -c 1` reads, then it goes away
    reader.stdout.close()
    stderr = reader.stderr.read().decode()
    assert reader.wait(timeout=120) == 1
    assert "Traceback" not in stderr and "Error" not in stderr


def test_kv_cache_quantization_flags(tiny, tiny_factory):
    """mlx-lm's --kv-bits, --kv-group-size and --quantized-kv-start; bits the cache cannot take and a
    model whose heads no group fits are refused in one line."""
    wide = tiny_factory(seed=3, head_dim=64, global_head_dim=128)
    result = generate("--model", str(wide.path), "--prompt", "Hello", "--max-tokens", "6", "--json",
                      "--kv-bits", "4", "--kv-group-size", "32", "--quantized-kv-start", "0")  # fmt: skip
    assert_reply(result)
    assert json.loads(result.stdout)["generation_tokens"] == 6
    assert_refused(generate("--model", str(wide.path), "--prompt", "x", "--kv-bits", "3"), "--kv-bits: must be one of 4, 8, got 3")
    assert_refused(generate("--model", str(wide.path), "--prompt", "x", "--kv-bits", "8", "--quantized-kv-start", "-1"),
                   "--quantized-kv-start: must be >= 0, got -1")
    unfit = generate("--model", str(tiny.path), "--prompt", "x", "--kv-bits", "8")  # refused once loaded
    assert unfit.returncode == 2 and "Traceback" not in unfit.stderr
    assert "--kv-group-size: 64 does not divide this model's head dim 16" in unfit.stderr.strip().splitlines()[-1]


# ---------------------------------------------------------------- thinking (scripted checkpoint)


def test_thinking_is_shown_apart_from_the_answer(scripted):
    question = PRIME[0]["content"]
    shown = generate("--model", str(scripted), "--prompt", question, "--thinking")
    assert_reply(shown)
    assert shown.stdout.strip() == THINKING_ANSWER  # piped stdout: the answer only
    assert THOUGHT in shown.stderr  # the thought goes to stderr when stdout is not a terminal
    hidden = generate("--model", str(scripted), "--prompt", question, "--enable-thinking", "--hide-thinking")
    assert hidden.stdout.strip() == THINKING_ANSWER and THOUGHT not in hidden.stderr
    record = json.loads(generate("--model", str(scripted), "--prompt", question, "--thinking", "--json").stdout)
    assert (record["text"], record["reasoning"], record["tool_calls"]) == (THINKING_ANSWER, THOUGHT, [])
    assert generate("--model", str(scripted), "--prompt", question).stdout.strip() == PLAIN_ANSWER


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_thoughts_are_dimmed_on_a_terminal(monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    display = ThoughtDisplay(hidden=False)
    display.show("let me see")
    display.close()
    assert terminal.getvalue() == f"{ThoughtDisplay.DIM}let me see{ThoughtDisplay.RESET}\n\n"
    hidden = ThoughtDisplay(hidden=True)
    hidden.show("secret")
    hidden.close()
    assert "secret" not in terminal.getvalue()


# ---------------------------------------------------------------- damaged checkpoints and cache folders


def damaged_copy(tiny, folder: Path, damage: str) -> Path:
    """A copy of the tiny checkpoint with one tensor of the wrong shape, a config entry of the wrong
    type, or a NaN weight."""
    import shutil

    import mlx.core as mx

    copy = Path(shutil.copytree(tiny.path, folder / damage))
    if damage == "config":
        config = json.loads((copy / "config.json").read_text())
        config["text_config"]["hidden_size"] = "64"
        (copy / "config.json").write_text(json.dumps(config))
        return copy
    weights = dict(mx.load(str(copy / "model.safetensors")))
    name = "model.language_model.layers.0.mlp.down_proj.weight"
    if damage == "shape":
        weights[name] = weights[name][:, :-1]
    else:
        weights[name] = mx.full(weights[name].shape, float("nan"), weights[name].dtype)
    mx.save_safetensors(str(copy / "model.safetensors"), weights)
    return copy


DAMAGE = {
    "shape": "language_model.layers.0.mlp.down_proj.weight has shape (64, 127)",
    "config": "text_config.hidden_size must be a positive integer, got \"64\"",
    "nan": "tensor language_model.layers.0.mlp.down_proj.weight holds NaN or infinite values",
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_one_line_and_exit_2(tiny, tmp_path, damage):
    copy = damaged_copy(tiny, tmp_path, damage)
    result = generate("--model", str(copy), "--prompt", "x")
    assert result.returncode == 2, result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("mlx-unified-generate: error:")]
    assert len(error) == 1 and DAMAGE[damage] in error[0] and str(copy) in error[0], result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


@pytest.mark.parametrize("kind", ["a file", "a read-only folder"])
def test_an_unusable_cache_folder_costs_no_answer_and_warns_once(tiny, tmp_path, kind):
    from unprivileged import unprivileged

    cache = tmp_path / "cache"
    prefix = []
    if kind == "a file":
        cache.write_text("not a folder")
    else:
        cache.mkdir(mode=0o555)
        prefix = unprivileged()
    env = {**os.environ, "MLX_UNIFIED_CACHE_DIR": str(cache)}
    args = ["--model", str(tiny.path), "--system", "Be brief. " * 20, "--max-tokens", "5", "--json"]
    chat = "Hello\nAnd again?\n/quit\n"
    runs = [
        subprocess.run([*prefix, sys.executable, str(SCRIPT), *args, *extra], input=stdin, capture_output=True,
                       text=True, timeout=240, cwd=REPO, env=env)  # fmt: skip
        for extra, stdin in ((["--chat"], chat), (["--chat", "--no-prefix-cache"], chat))
    ]
    for result in runs:
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    cached, plain = runs
    assert [json.loads(line)["text"] for line in cached.stdout.splitlines()] == [
        json.loads(line)["text"] for line in plain.stdout.splitlines()
    ]
    assert len(cached.stdout.splitlines()) == 2  # both turns answered
    assert cached.stderr.count("is unusable") == 1 and f"prefix cache folder {cache}" in cached.stderr
    assert not list(tmp_path.rglob("*.safetensors"))
