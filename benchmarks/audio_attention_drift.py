"""How much attention the answer pays to the audio as the system prompt grows.

    python benchmarks/audio_attention_drift.py --model M --audio F --system-tokens 1000,4000,8000,16000,21000

For each system prompt length: a system prompt of about that many tokens (persona and rules), a user
turn with the recording first and a question, a greedy answer, then `attention_share` over the
answer positions: the share of attention mass on the audio, the system prompt and the user text, on
sliding and on global layers. Prints a table with the answer at each length and writes
benchmarks/results/audio_attention_drift.{json,png}.

With the real model this measures the drift users report. On a random-weight checkpoint (`--model
random` makes a tiny one) the numbers say nothing about the real model: the run checks the mechanics.
`--audio-emphasis E` runs every length with that emphasis too, to show what the control changes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import mlx_unified  # noqa: E402
from mlx_unified.config import load_config  # noqa: E402
from mlx_unified.diagnostics import attention_share  # noqa: E402
from mlx_unified.emphasis import audio_emphasis_bias  # noqa: E402
from mlx_unified.generation import generate  # noqa: E402
from mlx_unified.processing import Processor, build_messages  # noqa: E402
from mlx_unified.testing import tiny_checkpoint  # noqa: E402

RESULTS = Path(__file__).parent / "results"
PERSONA = (
    "You are Aria, a voice assistant for a home. Be warm and brief. Rule: confirm actions before doing them. "
    "Rule: never share personal data. Tool calendar.add(title, time) adds an event. Tool lights.set(room, level). "
)


def system_prompt(processor: Processor, tokens: int) -> str:
    ids = processor.tokenizer.encode(PERSONA * (tokens // 20 + 1), add_special_tokens=False)[:tokens]
    return processor.tokenizer.decode(ids)


def measure(
    model, processor, system: str, audio: Path, question: str, max_tokens: int, emphasis: float
) -> dict:
    messages = build_messages(question, system=system, audios=[str(audio)])
    inputs = processor(messages)
    reply = generate(
        model, processor, inputs, max_tokens=max_tokens, audio_emphasis=emphasis, use_prefix_cache=False
    )
    bias = audio_emphasis_bias(
        inputs["input_ids"], inputs["mm_token_type_ids"], model.config.audio_token_id, emphasis
    )
    share = attention_share(
        model, inputs, processor.tokenizer, answer_ids=reply.tokens, key_bias=bias
    ).by_kind()
    return {
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "audio_emphasis": emphasis,
        "audio_share_global": share["global"]["audio"],
        "audio_share_sliding": share["sliding"]["audio"],
        "system_share_global": share["global"]["system"],
        "user_text_share_global": share["global"]["user_text"],
        "answer": reply.text,
    }


def plot(rows: list[dict], path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for emphasis in sorted({r["audio_emphasis"] for r in rows}, reverse=True):
        part = [r for r in rows if r["audio_emphasis"] == emphasis]
        x = [r["system_tokens"] for r in part]
        label = "" if emphasis == 1.0 else f", emphasis {emphasis:g}"
        ax.plot(x, [r["audio_share_global"] for r in part], "o-", label=f"global layers{label}")
        ax.plot(x, [r["audio_share_sliding"] for r in part], "s--", label=f"sliding layers{label}")
    ax.set_xscale("log")
    ax.set_xlabel("system prompt tokens")
    ax.set_ylabel("audio share of answer attention")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint folder, or 'random' for a tiny random one")
    parser.add_argument("--audio", type=Path, required=True, help="the recording (at most 30 s)")
    parser.add_argument("--system-tokens", default="1000,4000,8000,16000,21000")
    parser.add_argument("--question", default="What does the speaker ask for?")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--audio-emphasis", type=float, help="also measure with this emphasis (0 < E < 1)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--out", type=Path, default=RESULTS / "audio_attention_drift")
    args = parser.parse_args()
    try:
        lengths = [int(x) for x in args.system_tokens.split(",")]
    except ValueError:
        parser.error(f"--system-tokens: comma-separated integers expected, got {args.system_tokens!r}")
    if not args.audio.is_file():
        parser.error(f"--audio {args.audio}: no such file")
    emphases = [1.0] if args.audio_emphasis is None else [1.0, args.audio_emphasis]
    for e in emphases:
        audio_emphasis_bias([], None, 0, e)  # refuses a bad value before any work

    folder = Path(tempfile.mkdtemp()) if args.model == "random" else Path(args.model)
    if args.model == "random":
        tiny_checkpoint(folder, seed=0)
    random_weights = load_config(folder).random_weights
    model = mlx_unified.load_model(folder, dtype=args.dtype)
    processor = Processor.from_pretrained(folder)
    note = (
        "RANDOM weights: this run checks the mechanics only; the shares say nothing about the real model."
        if random_weights
        else "Real weights: shares measured on the answer positions."
    )
    print(note)
    rows = []
    print(
        f"{'system':>7} {'prompt':>7} {'emph':>5} {'audio(glob)':>11} {'audio(slid)':>11} {'system(glob)':>12}  answer"
    )
    for tokens in lengths:
        system = system_prompt(processor, tokens)
        for emphasis in emphases:
            row = {
                "system_tokens": tokens,
                **measure(model, processor, system, args.audio, args.question, args.max_tokens, emphasis),
            }
            rows.append(row)
            print(
                f"{tokens:>7} {row['prompt_tokens']:>7} {emphasis:>5g} {row['audio_share_global']:>11.4f} "
                f"{row['audio_share_sliding']:>11.4f} {row['system_share_global']:>12.4f}  {row['answer']!r}"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "model": str(args.model),
        "audio": str(args.audio),
        "random_weights": random_weights,
        "note": note,
        "rows": rows,
    }
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    plot(
        rows,
        args.out.with_suffix(".png"),
        f"{'random weights (mechanics only)' if random_weights else args.model}",
    )
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
