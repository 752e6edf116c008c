"""The command lines users already know (issue 16): mlx-lm's and mlx-vlm's spellings do what they do
there, sampling defaults come from the checkpoint's generation_config.json, and every generation flag
is checked by GenerationParams, named by its flag (issue 14, items 9 and 10)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
from media_files import write_image
from scripted_replies import PRIME, THINKING_ANSWER, THOUGHT

import mlx_unified
from mlx_unified import cli
from mlx_unified.generation import generate

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Tell me about the sea."


@pytest.fixture(scope="module")
def local(tiny):
    """The model as the CLI loads it (the checkpoint's bf16), for the API side of each comparison."""
    return mlx_unified.load(tiny.path)


def run_cli(capsys, *argv: str, stdin: bytes | None = None, monkeypatch=None) -> tuple[int, str, str]:
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(buffer=io.BytesIO(stdin)))
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def json_reply(capsys, *argv: str, **kwargs) -> dict:
    code, out, err = run_cli(capsys, *argv, "--json", "--no-prefix-cache", **kwargs)
    assert code == 0, err
    return json.loads(out)


def api_text(local, prompt=PROMPT, **kwargs) -> str:
    model, processor = local
    return generate(model, processor, prompt, use_prefix_cache=False, **kwargs).content


def test_the_model_cards_command_line_runs_unchanged(tiny, local, tmp_path):
    picture = write_image(tmp_path / "picture.png")
    # Verbatim from the model card mlx_vlm.convert writes, with generate.py for `python -m mlx_vlm.generate`.
    line = f'--model {tiny.path} --max-tokens 100 --temperature 0.0 --prompt "Describe this image." --image {picture}'
    result = subprocess.run(
        f"{sys.executable} generate.py {line}", shell=True, capture_output=True, text=True, timeout=240, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "prompt 2" in result.stderr  # the image's soft tokens went in
    expected = api_text(local, "Describe this image.", images=[str(picture)], max_tokens=100, temperature=0.0)
    assert result.stdout == expected + "\n"


def test_sampling_spellings_and_the_system_prompt(tiny, local, capsys):
    common = ["--model", str(tiny.path), "--prompt", PROMPT, "--max-tokens", "12", "--seed", "7"]
    temp = json_reply(capsys, *common, "--temp", "0.8", "--top-k", "20")
    temperature = json_reply(capsys, *common, "--temperature", "0.8", "--top-k", "20")
    assert temp["text"] == temperature["text"] == api_text(local, max_tokens=12, seed=7, temperature=0.8, top_k=20)
    system = ["--model", str(tiny.path), "--prompt", PROMPT, "--max-tokens", "8"]
    spelled = json_reply(capsys, *system, "--system-prompt", "Answer in one word.")
    assert spelled == {**json_reply(capsys, *system, "--system", "Answer in one word."), **timings(spelled)}
    assert spelled["text"] == api_text(local, system="Answer in one word.", max_tokens=8)


def timings(record: dict) -> dict:
    return {name: record[name] for name in ("prompt_tps", "generation_tps", "ttft_s", "peak_memory_gb")}


def test_prompt_from_standard_input_and_in_words(tiny, local, capsys, monkeypatch):
    common = ["--model", str(tiny.path), "--max-tokens", "8"]
    from_stdin = json_reply(capsys, *common, "--prompt", "-", stdin=PROMPT.encode(), monkeypatch=monkeypatch)
    in_words = json_reply(capsys, *common, "-p", *PROMPT.split())  # mlx-vlm joins --prompt's words
    assert from_stdin["text"] == in_words["text"] == api_text(local, max_tokens=8)
    assert from_stdin["prompt_tokens"] == in_words["prompt_tokens"]
    code, _, err = run_cli(capsys, *common, "--prompt", "-", stdin=b"caf\xe9", monkeypatch=monkeypatch)
    assert code == 2 and "--prompt -: standard input is not valid UTF-8 text" in err
    code, _, err = run_cli(capsys, *common, "--prompt", "-", "--chat")
    assert code == 2 and "standard input holds the chat" in err


def test_penalties_change_the_reply_as_in_the_api(tiny, local, capsys):
    common = ["--model", str(tiny.path), "--prompt", PROMPT, "--max-tokens", "16"]
    plain = json_reply(capsys, *common)["text"]
    penalized = json_reply(capsys, *common, "--repetition-penalty", "1.8", "--repetition-context-size", "8")["text"]
    assert penalized == api_text(local, max_tokens=16, repetition_penalty=1.8, repetition_context_size=8)
    assert penalized != plain  # greedy on random weights repeats itself; the penalty breaks that
    additive = json_reply(capsys, *common, "--presence-penalty", "1.5", "--frequency-penalty", "0.5")["text"]
    assert additive == api_text(local, max_tokens=16, presence_penalty=1.5, frequency_penalty=0.5)


def test_prefill_step_size_sets_the_prompt_tokens_per_pass(tiny, capsys, monkeypatch):
    passes: list[tuple[int, int]] = []
    monkeypatch.setattr(cli, "prefill_progress_bar", lambda: lambda done, total: passes.append((done, total)))
    common = ["--model", str(tiny.path), "--prompt", PROMPT, "--max-tokens", "4"]
    default = json_reply(capsys, *common)
    assert len(passes) == 1  # a short prompt is one pass of up to 2048 tokens
    passes.clear()
    stepped = json_reply(capsys, *common, "--prefill-step-size", "5")
    ends = [done for done, _ in passes]
    assert ends == [*range(5, stepped["prompt_tokens"], 5), stepped["prompt_tokens"]]
    assert stepped["text"] == default["text"]


def test_extra_eos_tokens_end_the_reply(tiny, local, capsys):
    model, processor = local
    tokens = generate(model, processor, PROMPT, max_tokens=12, use_prefix_cache=False).tokens
    stop_at = next(i for i, token in enumerate(tokens) if i > 0 and token not in tokens[:i])
    common = ["--model", str(tiny.path), "--prompt", PROMPT, "--max-tokens", "12"]
    for spelling in (processor.tokenizer.convert_ids_to_tokens(tokens[stop_at]), str(tokens[stop_at])):
        record = json_reply(capsys, *common, "--extra-eos-token", spelling)
        assert (record["generation_tokens"], record["finish_reason"]) == (stop_at + 1, "stop")
    code, _, err = run_cli(capsys, *common, "--extra-eos-token", "<no such token>")
    assert code == 2 and err.strip().splitlines()[-1].startswith("mlx-unified-generate: error: --extra-eos-token:")


def test_verbose_false_prints_the_reply_alone(tiny, capsys):
    common = ["--model", str(tiny.path), "--prompt", PROMPT, "--max-tokens", "6"]
    code, loud, loud_err = run_cli(capsys, *common)
    assert code == 0 and "Loading" in loud_err and "tokens/s" in loud_err
    for quiet in (["--verbose", "False"], ["--verbose", "f"], ["--no-verbose"]):
        code, out, err = run_cli(capsys, *common, *quiet)
        assert code == 0 and out == loud
        assert "Loading" not in err and "tokens/s" not in err and "prefill" not in err
    for verbose in (["--verbose"], ["--verbose", "True"]):
        code, out, err = run_cli(capsys, *common, *verbose)
        assert code == 0 and out == loud and "tokens/s" in err
    code, _, err = run_cli(capsys, *common, "--verbose", "maybe")
    assert code == 2 and "expected True or False" in err


def test_chat_template_config_reaches_the_template(scripted, capsys):
    question = PRIME[0]["content"]
    common = ["--model", str(scripted), "--prompt", question]
    for spelling in ("--chat-template-config", "--chat-template-args"):
        record = json_reply(capsys, *common, spelling, '{"enable_thinking": true}')
        assert (record["text"], record["reasoning"]) == (THINKING_ANSWER, THOUGHT)


def with_generation_config(tiny, folder: Path, settings: dict) -> Path:
    copy = folder / "checkpoint"
    shutil.copytree(tiny.path, copy)
    config = json.loads((copy / "generation_config.json").read_text())
    (copy / "generation_config.json").write_text(json.dumps({**config, **settings}))
    return copy


def test_sampling_defaults_come_from_generation_config(tiny, local, capsys, tmp_path):
    checkpoint = with_generation_config(tiny, tmp_path, {"temperature": 0.9, "top_p": 0.8, "top_k": 7})
    common = ["--model", str(checkpoint), "--prompt", PROMPT, "--max-tokens", "12", "--seed", "11"]
    sampled = json_reply(capsys, *common)["text"]
    assert sampled == api_text(local, max_tokens=12, seed=11, temperature=0.9, top_p=0.8, top_k=7)
    assert sampled != api_text(local, max_tokens=12)  # not greedy
    # A flag given wins over the file; the others still come from it.
    assert json_reply(capsys, *common, "--temperature", "0")["text"] == api_text(local, max_tokens=12)
    assert json_reply(capsys, *common, "--top-k", "3")["text"] == api_text(
        local, max_tokens=12, seed=11, temperature=0.9, top_p=0.8, top_k=3
    )
    assert "generation_config.json" in cli.build_parser().format_help()


def test_do_sample_false_in_generation_config_means_greedy(tiny, local, capsys, tmp_path):
    checkpoint = with_generation_config(tiny, tmp_path, {"do_sample": False, "temperature": 0.9, "top_k": 7})
    record = json_reply(capsys, "--model", str(checkpoint), "--prompt", PROMPT, "--max-tokens", "12", "--seed", "11")
    assert record["text"] == api_text(local, max_tokens=12)


def test_a_bad_generation_config_is_refused_naming_the_file(tiny, capsys, tmp_path):
    checkpoint = with_generation_config(tiny, tmp_path, {"top_p": 3})
    code, out, err = run_cli(capsys, "--model", str(checkpoint), "--prompt", PROMPT)
    assert code == 2 and out == ""
    assert err.strip().splitlines()[-1] == (
        f"mlx-unified-generate: error: {checkpoint / 'generation_config.json'}: top_p: must be in (0, 1] (1: off), got 3"
    )


def test_top_k_above_the_vocabulary_is_refused_after_loading_in_one_line(tiny, local, capsys):
    vocab = local[0].config.text.vocab_size
    code, out, err = run_cli(capsys, "--model", str(tiny.path), "--prompt", PROMPT, "--top-k", str(vocab + 1))
    assert code == 2 and out == "" and "Traceback" not in err
    assert "Loading" in err  # the vocabulary is known once the model is loaded
    assert err.strip().splitlines()[-1] == f"mlx-unified-generate: error: --top-k: must be between 0 and {vocab}, got {vocab + 1}"
    assert err.count("error:") == 1
