"""Fine-tune a small target on patterned text, then distil an MTP drafter for it, in MLX.

    python benchmarks/train_drafter.py [--target-steps 600] [--steps 300] [--out DIR] [--target DIR]

A random target mostly repeats its last token, which a drafter can copy without learning anything. So
the target is first taught text with structure: `mlx_unified.testing.tiny_checkpoint` (hidden 64, 6
layers, window 32, a 680-token vocabulary) is fine-tuned (next-token cross-entropy, Adam) on a corpus
made here of counting in digits and in words, the alphabet, weekdays and months, sentences repeated,
and a few dozen sentences in random order; it is written (released layout, bf16) to --target. Its
greedy continuations of held-out corpus prompts then follow those patterns: the counting goes on.

The distillation prompts are half corpus beginnings (patterns the drafter can learn to continue) and
half random tokens (what the target makes of those is its own, and much harder to draft), so the
acceptance lands where real text puts it, not near 1. Their greedy continuations are the data: every sequence is run once through the target, which
gives the drafter what it reads at every position (the last hidden state after the final norm, and the
keys and values of the last sliding and last global layer, from a ring that holds the whole sequence).
The drafter (2 layers, one sliding and one global, of the target's width; its tied head starts as the
target's embeddings) is trained at every position at once, DRAFT_STEPS chained steps as it drafts them
(each fed the previous step's projected state and the target's next token), cross-entropy against the
target's greedy tokens, Adam with a cosine schedule.

Acceptance on held-out prompts is greedy speculative acceptance: from every generated position, the
drafter drafts k tokens, each from its own previous draft, and the accepted length is the number of
leading drafts equal to the target's greedy tokens. `acceptance` is accepted / drafted tokens at
k = DRAFT_STEPS, `first_token` the rate of the first draft (k = 1). `held_out_copy_baseline` is the
acceptance of drafting the last token again, and `first_token_where_the_target_changes` the first
draft's rate where the target's next token is not its last (copying scores 0 there). A few held-out
positions are also drafted through the runtime path (`speculative.draft` from a prefilled cache) and
must give the same tokens. Writes the drafter (released layout, bf16) to --out and
benchmarks/results/train_drafter.json (command, machine, both training curves, the held-out figures).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

# Gradients flow through the pure-MLX paths; the Metal kernels have none.
os.environ["MLX_UNIFIED_KERNELS"] = "0"

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402
from bench_generate import machine_description  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

import mlx_unified  # noqa: E402
from mlx_unified.cache import SlidingWindowCache  # noqa: E402
from mlx_unified.checkpoint import weight_files  # noqa: E402
from mlx_unified.config import GLOBAL, RANDOM_WEIGHTS_FLAG, SLIDING  # noqa: E402
from mlx_unified.drafter import Drafter, KeyValues, save_drafter  # noqa: E402
from mlx_unified.model import Model  # noqa: E402
from mlx_unified.speculative import draft, layer_kv, prepare_cache, shared_kv  # noqa: E402
from mlx_unified.testing import drafter_config, tiny_checkpoint  # noqa: E402

HERE = Path(__file__).parent
TARGET = HERE / "checkpoints" / "drafter-target"
OUT = HERE / "checkpoints" / "drafter-trained"
RESULTS = HERE / "results" / "train_drafter.json"
SEQUENCE_TOKENS = 64  # the target's training windows
PROMPT_TOKENS, NEW_TOKENS = 16, 48
DRAFT_STEPS = 3
TARGET_ACCEPTANCE = 0.5
FIRST_ORDINARY_TOKEN = 20  # the tiny tokenizer's special tokens sit below

NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty"
).split()
WEEKDAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
MONTHS = "January February March April May June July August September October November December".split()
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A picture of a cat sitting on a red chair.",
    "The man is walking along the beach at sunset.",
    "Describe this image in one short sentence.",
    "What does the speaker say in the recording?",
    "She opened the window and the cold air came in.",
    "The train leaves the station at seven in the morning.",
    "We planted tomatoes and beans in the small garden.",
    "He reads the newspaper every day after breakfast.",
    "The children played football in the park until dark.",
    "Please send me the report before the meeting starts.",
    "The river flows through the valley to the sea.",
    "My sister bought a new bicycle last summer.",
    "The library is open from nine to five on weekdays.",
    "It rained all night and the streets were wet.",
    "The old clock in the hall stopped at midnight.",
]


def corpus_text(rng: np.random.Generator) -> str:
    """One stretch of patterned text: a sequence that continues by a rule, or sentences."""
    kind = rng.integers(7)
    if kind == 0:  # counting in digits, by 1 or 2
        start, step = int(rng.integers(0, 60)), int(rng.choice([1, 1, 2]))
        return " ".join(str(start + step * i) for i in range(40))
    if kind == 1:  # number words, wrapping around
        start = int(rng.integers(len(NUMBER_WORDS)))
        return " ".join(NUMBER_WORDS[(start + i) % len(NUMBER_WORDS)] for i in range(30))
    if kind == 2:  # the alphabet, lower or upper case
        letters = "abcdefghijklmnopqrstuvwxyz"
        letters = letters.upper() if rng.random() < 0.5 else letters
        start = int(rng.integers(26))
        return " ".join(letters[(start + i) % 26] for i in range(50))
    if kind == 3:  # weekdays or months, cyclic
        names = WEEKDAYS if rng.random() < 0.5 else MONTHS
        start = int(rng.integers(len(names)))
        return " ".join(names[(start + i) % len(names)] for i in range(24))
    if kind == 4:  # one sentence, repeated
        return " ".join([SENTENCES[int(rng.integers(len(SENTENCES)))]] * 5)
    return " ".join(SENTENCES[j] for j in rng.permutation(len(SENTENCES))[:6])  # sentences in some order


def corpus_windows(tokenizer, rng: np.random.Generator, count: int) -> np.ndarray:
    """`count` windows [count, SEQUENCE_TOKENS + 1] of token ids, each `<bos>` then one stretch of text."""
    rows = []
    while len(rows) < count:
        ids = [tokenizer.bos_token_id, *tokenizer.encode(corpus_text(rng), add_special_tokens=False)]
        if len(ids) > SEQUENCE_TOKENS:
            rows.append(ids[: SEQUENCE_TOKENS + 1])
    return np.array(rows)


def distillation_prompts(tokenizer, rng: np.random.Generator, count: int, random_share: float) -> np.ndarray:
    """[count, PROMPT_TOKENS] prompts: corpus beginnings (the target continues their pattern) and, a
    `random_share` of them, random ordinary tokens after `<bos>` (what the target makes of those is its
    own, and harder to draft), shuffled together."""
    randoms = int(round(count * random_share))
    corpus = corpus_windows(tokenizer, rng, count - randoms)[:, :PROMPT_TOKENS]
    noise = rng.integers(FIRST_ORDINARY_TOKEN, len(tokenizer), (randoms, PROMPT_TOKENS))
    noise[:, 0] = tokenizer.bos_token_id
    return rng.permutation(np.concatenate([corpus, noise]))


def target_checkpoint(path: Path) -> Path:
    if not (path / "config.json").exists():
        tiny_checkpoint(path, seed=0)
    return path


def fine_tune_target(model: Model, windows: np.ndarray, held_out: np.ndarray, args, rng) -> list[dict]:
    """Next-token training of the whole target on corpus windows; the curve of held-out accuracy."""

    def loss_fn(model: Model, ids: mx.array) -> mx.array:
        return nn.losses.cross_entropy(model(ids[:, :-1]), ids[:, 1:]).mean()

    optimizer = optim.Adam(learning_rate=optim.cosine_decay(args.target_lr, args.target_steps, args.target_lr / 10))
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    curve, losses = [], []
    print(f"{'target step':>12}{'train loss':>12}{'held-out next-token accuracy':>30}")
    for step in range(1, args.target_steps + 1):
        batch = mx.array(windows[rng.integers(len(windows), size=args.batch)])
        loss, grads = loss_and_grad(model, batch)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state, loss)
        losses.append(loss.item())
        if step % args.eval_every == 0 or step == args.target_steps:
            point = {"step": step, "loss": float(np.mean(losses)), "accuracy": next_token_accuracy(model, held_out)}
            losses = []
            curve.append(point)
            print(f"{step:>12}{point['loss']:>12.4f}{point['accuracy']:>30.3f}")
    return curve


def next_token_accuracy(model: Model, windows: np.ndarray) -> float:
    ids = mx.array(windows)
    predicted = mx.argmax(model(ids[:, :-1]), axis=-1)
    return float((predicted == ids[:, 1:]).astype(mx.float32).mean().item())


def save_target(model: Model, source: Path, out: Path, corpus: str) -> None:
    """The fine-tuned target in the released layout (bf16), with the source's tokenizer files."""
    out.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        if file.is_file() and file.suffix != ".safetensors" and file.name != "config.json":
            shutil.copy2(file, out / file.name)
    config = dict(json.loads((source / "config.json").read_text()))
    config[RANDOM_WEIGHTS_FLAG] = False
    config["mlx_unified_trained_on"] = corpus
    (out / "config.json").write_text(json.dumps(config, indent=2))
    weights = {f"model.{name}": value.astype(mx.bfloat16) for name, value in nn.utils.tree_flatten(model.parameters())}
    for file in weight_files(out) if any(out.glob("*.safetensors")) else []:
        file.unlink()
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "pt"})


def greedy_sequences(model: Model, prompts: np.ndarray) -> np.ndarray:
    """The prompts [N, P] followed by NEW_TOKENS greedy tokens of the target, decoded in one batch."""
    cache = model.make_cache()
    logits = model(mx.array(prompts), cache=cache, logits_to_keep=1)
    tokens = []
    for _ in range(NEW_TOKENS):
        token = mx.argmax(logits[:, -1], axis=-1)[:, None]
        tokens.append(token)
        logits = model(token, cache=cache)
    return np.concatenate([prompts, np.array(mx.concatenate(tokens, axis=1))], axis=1)


def target_features(model: Model, sequences: np.ndarray) -> tuple[mx.array, mx.array, dict[str, KeyValues]]:
    """What the drafter reads at every position of the sequences: the target's embeddings of the tokens
    [N, T, H] (as the drafter is fed them), the target's hidden states after its final norm [N, T, H],
    and the keys and values of its last layer of each type at positions 0..T-1."""
    ids, text, length = mx.array(sequences), model.config.text, sequences.shape[1]
    cache = model.make_cache()
    sliding = text.last_layer(SLIDING)
    cache[sliding] = SlidingWindowCache(text.sliding_window, capacity=length)  # keeps them all
    _, hidden = model.forward_embeddings(model.embed_text(ids), cache=cache, return_hidden=True)
    kv = {
        SLIDING: KeyValues(*cache[sliding].positions(0, length), 0),
        GLOBAL: layer_kv(model.language_model.layers[text.last_layer(GLOBAL)].self_attn, cache[text.last_layer(GLOBAL)]),
    }
    embedded = model.language_model.embed(ids)
    mx.eval(embedded, hidden, kv)
    return embedded, hidden, kv


def chained_logits(drafter: Drafter, embedded, hidden, kv, embed_drafts=None) -> list[mx.array]:
    """Logits [N, L, vocab] of DRAFT_STEPS chained steps from every generated position q = P .. P + L - 1
    at once (P = PROMPT_TOKENS, L = T - P - DRAFT_STEPS). Step j (0-based) at q reads the keys before q,
    is fed the previous step's projected state (step 0: the target's hidden state at q - 1) and a token
    embedding: the target's token at q + j, or with `embed_drafts` (after step 0) the embedding of the
    previous step's draft. It predicts the token at q + j + 1."""
    P, L = PROMPT_TOKENS, embedded.shape[1] - PROMPT_TOKENS - DRAFT_STEPS
    kv = {kind: KeyValues(v.keys[:, :, : P + L - 1], v.values[:, :, : P + L - 1], 0) for kind, v in kv.items()}
    state, token, steps = hidden[:, P - 1 : P - 1 + L], embedded[:, P : P + L], []
    for j in range(DRAFT_STEPS):
        logits, state = drafter(token, state, kv, P)
        steps.append(logits)
        token = embedded[:, P + j + 1 : P + j + 1 + L] if embed_drafts is None else embed_drafts(mx.argmax(logits, axis=-1))
    return steps


def step_labels(sequences: np.ndarray) -> mx.array:
    """[N, DRAFT_STEPS, L]: the target's token at q + j + 1 for step j from q (see `chained_logits`)."""
    P, L = PROMPT_TOKENS, sequences.shape[1] - PROMPT_TOKENS - DRAFT_STEPS
    return mx.array(np.stack([sequences[:, P + 1 + j : P + 1 + j + L] for j in range(DRAFT_STEPS)], axis=1))


def loss_fn(drafter: Drafter, embedded, hidden, kv, labels) -> mx.array:
    steps = chained_logits(drafter, embedded, hidden, kv)
    return mx.stack([nn.losses.cross_entropy(logits, labels[:, j]) for j, logits in enumerate(steps)]).mean()


def accepted_rates(drafts: np.ndarray, labels: np.ndarray) -> dict:
    """Greedy acceptance of drafts [N, DRAFT_STEPS, L] against the target's tokens (same shape)."""
    match = drafts == labels
    accepted = np.cumprod(match, axis=1).sum(axis=1)  # leading matches at each position
    return {
        "acceptance": float(accepted.mean() / DRAFT_STEPS),
        "first_token": float(match[:, 0].mean()),
        "mean_accepted_length": float(accepted.mean()),
    }


def acceptance(drafter: Drafter, model: Model, features, sequences: np.ndarray) -> tuple[dict, np.ndarray]:
    """Held-out acceptance of drafts made from the drafter's own previous drafts, and the drafts."""
    steps = chained_logits(drafter, *features, embed_drafts=model.language_model.embed)
    drafts = np.stack([np.array(mx.argmax(logits, axis=-1)) for logits in steps], axis=1)
    labels = np.array(step_labels(sequences))
    rates = accepted_rates(drafts, labels)
    changes = labels[:, 0] != sequences[:, PROMPT_TOKENS : PROMPT_TOKENS + labels.shape[2]]
    rates["first_token_where_the_target_changes"] = float((drafts[:, 0] == labels[:, 0])[changes].mean())
    accepted = np.cumprod(drafts == labels, axis=1).sum(axis=1)
    rates["acceptance_where_the_target_changes"] = float(accepted[changes].mean() / DRAFT_STEPS)
    rates["share_of_positions_where_the_target_changes"] = float(changes.mean())
    return rates, drafts


def copy_baseline(sequences: np.ndarray) -> dict:
    """The acceptance of drafting the last token again and again: what a random target's greedy
    repetitions give for free, and what the drafter has to beat."""
    P, L = PROMPT_TOKENS, sequences.shape[1] - PROMPT_TOKENS - DRAFT_STEPS
    last = np.repeat(sequences[:, None, P : P + L], DRAFT_STEPS, axis=1)
    return accepted_rates(last, np.array(step_labels(sequences)))


def check_runtime_path(drafter: Drafter, model: Model, sequences: np.ndarray, drafts: np.ndarray) -> int:
    """Draft through `speculative.draft` from a prefilled cache (rings with speculative decoding's spare
    slots) at a few held-out positions; the tokens must equal the batched evaluation's. Returns the count."""
    checked = 0
    for row in range(0, len(sequences), max(1, len(sequences) // 4)):
        for i in (0, drafts.shape[2] // 2, drafts.shape[2] - 1):
            q = PROMPT_TOKENS + i
            cache = model.make_cache()
            prepare_cache(cache, DRAFT_STEPS)
            prefix = model.embed_text(mx.array(sequences[row : row + 1, :q]))
            _, hidden = model.forward_embeddings(prefix, cache=cache, logits_to_keep=1, return_hidden=True)
            last = mx.array(sequences[row, q : q + 1])
            tokens, _ = draft(drafter, model, shared_kv(model, cache), last, hidden[:, -1], q, DRAFT_STEPS)
            got, expected = np.array(tokens)[0].tolist(), drafts[row, :, i].tolist()
            if got != expected:
                raise AssertionError(f"runtime drafts {got} != batched drafts {expected} (row {row}, position {q})")
            checked += 1
    return checked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target-steps", type=int, default=400, help="fine-tuning steps of the target")
    parser.add_argument("--target-lr", type=float, default=3e-3)
    parser.add_argument("--corpus-windows", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=300, help="distillation steps of the drafter")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--train-prompts", type=int, default=2048)
    parser.add_argument("--held-out-prompts", type=int, default=64)
    parser.add_argument("--random-prompts", type=float, default=0.5, help="share of random-token prompts")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--source", type=Path, default=HERE / "checkpoints" / "drafter-target-random",
                        help="the random checkpoint fine-tuned (made once)")
    parser.add_argument("--target", type=Path, default=TARGET, help="where the fine-tuned target is written")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--eval-every", type=int, default=50)
    args = parser.parse_args()

    mx.random.seed(args.seed)
    rng = np.random.default_rng(args.seed)
    source = target_checkpoint(args.source)
    model = mlx_unified.load_model(source, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(source)
    started = time.perf_counter()
    windows = corpus_windows(tokenizer, rng, args.corpus_windows)
    corpus_held_out = corpus_windows(tokenizer, np.random.default_rng(args.seed + 1), 128)
    target_curve = fine_tune_target(model, windows, corpus_held_out, args, rng)
    save_target(model, source, args.target, "benchmarks/train_drafter.py corpus: counting, alphabet, weekdays, "
                "months, repeated and shuffled sentences")
    target_s = time.perf_counter() - started

    def sequences(prompts: np.ndarray) -> np.ndarray:
        return np.concatenate([greedy_sequences(model, prompts[i : i + 128]) for i in range(0, len(prompts), 128)])

    train = sequences(distillation_prompts(tokenizer, rng, args.train_prompts, args.random_prompts))
    held_out = sequences(
        distillation_prompts(tokenizer, np.random.default_rng(args.seed + 2), args.held_out_prompts, args.random_prompts)
    )
    features = [target_features(model, train[i : i + args.batch]) for i in range(0, len(train), args.batch)]
    labels = [step_labels(train[i : i + args.batch]) for i in range(0, len(train), args.batch)]
    held_out_features = target_features(model, held_out)
    data_s = time.perf_counter() - started - target_s

    drafter = Drafter(drafter_config(model.config.text))
    # Its tied head starts as the target's (same width here): the drafter learns what to score, not the
    # vocabulary's geometry.
    drafter.model.embed_tokens.weight = mx.array(model.language_model.embed_tokens.weight)
    optimizer = optim.Adam(learning_rate=optim.cosine_decay(args.lr, args.steps, args.lr / 10))
    loss_and_grad = nn.value_and_grad(drafter, loss_fn)
    curve, losses = [], []
    print(f"{'step':>6}{'train loss':>12}{'acceptance':>12}{'first token':>13}")
    for step in range(1, args.steps + 1):
        batch = int(rng.integers(len(features)))
        loss, grads = loss_and_grad(drafter, *features[batch], labels[batch])
        optimizer.update(drafter, grads)
        mx.eval(drafter.parameters(), optimizer.state, loss)
        losses.append(loss.item())
        if step % args.eval_every == 0 or step == args.steps:
            held, _ = acceptance(drafter, model, held_out_features, held_out)
            point = {"step": step, "loss": float(np.mean(losses)), "acceptance": held["acceptance"],
                     "first_token": held["first_token"]}
            losses = []
            curve.append(point)
            print(f"{step:>6}{point['loss']:>12.4f}{point['acceptance']:>12.3f}{point['first_token']:>13.3f}")
    train_s = time.perf_counter() - started - target_s - data_s

    final, drafts = acceptance(drafter, model, held_out_features, held_out)
    checked = check_runtime_path(drafter, model, held_out, drafts)
    save_drafter(drafter.apply(lambda w: w.astype(mx.bfloat16) if mx.issubdtype(w.dtype, mx.floating) else w), args.out)
    generated = held_out[:, PROMPT_TOKENS:]
    result = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": machine_description(),
        "target": os.path.relpath(args.target),
        "target_text_config": model.config.raw.get("text_config"),
        "target_training": {
            "windows": len(windows), "tokens_per_window": SEQUENCE_TOKENS, "steps": args.target_steps,
            "learning_rate": args.target_lr, "seconds": round(target_s, 1), "curve": target_curve,
            "held_out_next_token_accuracy": target_curve[-1]["accuracy"],
        },
        "held_out_continuations": {
            "share_of_tokens_repeating_the_last": float((generated[:, 1:] == generated[:, :-1]).mean()),
            "examples": [tokenizer.decode(row.tolist()) for row in held_out[:4]],
        },
        "drafter": os.path.relpath(args.out),
        "drafter_text_config": drafter.config.raw["text_config"],
        "draft_steps": DRAFT_STEPS,
        "train_sequences": len(train),
        "held_out_sequences": len(held_out),
        "random_prompt_share": args.random_prompts,
        "sequence_tokens": {"prompt": PROMPT_TOKENS, "generated": NEW_TOKENS},
        "steps": args.steps,
        "batch": args.batch,
        "learning_rate": args.lr,
        "data_seconds": round(data_s, 1),
        "train_seconds": round(train_s, 1),
        "curve": curve,
        "held_out": final,
        "held_out_copy_baseline": copy_baseline(held_out),
        "runtime_path_positions_checked": checked,
        "target_acceptance": f">= {TARGET_ACCEPTANCE}",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    copy = result["held_out_copy_baseline"]
    print(f"target: held-out next-token accuracy {target_curve[-1]['accuracy']:.3f}; its continuations repeat the "
          f"last token {result['held_out_continuations']['share_of_tokens_repeating_the_last']:.3f} of the time")
    print(f"held-out acceptance {final['acceptance']:.3f} at k={DRAFT_STEPS} (first token {final['first_token']:.3f}, "
          f"where the target changes token {final['acceptance_where_the_target_changes']:.3f}, mean accepted "
          f"{final['mean_accepted_length']:.2f}); drafting the last token again: {copy['acceptance']:.3f}; "
          f"{checked} positions drafted through the runtime path agree")
    print(f"wrote {args.target}, {args.out} and {RESULTS}")
    if final["acceptance"] < TARGET_ACCEPTANCE:
        sys.exit(f"acceptance {final['acceptance']:.3f} is below {TARGET_ACCEPTANCE}")


if __name__ == "__main__":
    main()
