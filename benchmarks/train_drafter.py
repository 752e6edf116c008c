"""Distil an MTP drafter for a small random target, in MLX, until it drafts what the target decodes.

    python benchmarks/train_drafter.py [--steps 300] [--train-prompts 2048] [--target DIR] [--out DIR]

The target is a random checkpoint of ours (made once under benchmarks/checkpoints/drafter-target
unless --target names one: `mlx_unified.testing.tiny_checkpoint`, hidden 64, 6 layers, window 32, a
680-token vocabulary). Its greedy continuations of
random prompts are the data: every sequence is run once through the target, which gives the drafter
what it reads at every position (the last hidden state after the final norm, and the keys and values
of the last sliding and last global layer, `mlx_unified.speculative.shared_kv`, from a ring that holds
the whole sequence). The drafter (2 layers, one sliding and one global, of the target's width; its tied
head starts as the target's embeddings) is trained at every position at once, DRAFT_STEPS chained steps
as it drafts them (each fed the previous step's projected state and the target's next token),
cross-entropy against the target's greedy tokens, Adam with a cosine schedule.

Acceptance on held-out prompts is greedy speculative acceptance: from every generated position, the
drafter drafts k tokens, each from its own previous draft, and the accepted length is the number of
leading drafts equal to the target's greedy tokens. `acceptance` is accepted / drafted tokens at
k = DRAFT_STEPS, `first_token` the rate of the first draft (k = 1). A random target repeats tokens a lot:
`held_out_copy_baseline` is the acceptance of drafting the last token again, and
`first_token_where_the_target_changes` the first draft's rate where the target's next token is not
its last (copying scores 0 there). A few held-out positions are also
drafted through the runtime path (`speculative.draft` from a prefilled cache) and must give the same
tokens. Writes the drafter (released layout, bf16) to --out and benchmarks/results/train_drafter.json
(command, machine, the training curve, the held-out acceptance).
"""

from __future__ import annotations

import argparse
import json
import os
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

import mlx_unified  # noqa: E402
from mlx_unified.cache import SlidingWindowCache  # noqa: E402
from mlx_unified.config import SLIDING  # noqa: E402
from mlx_unified.drafter import Drafter, DrafterConfig, KeyValues, save_drafter  # noqa: E402
from mlx_unified.model import Model  # noqa: E402
from mlx_unified.speculative import draft, shared_kv  # noqa: E402
from mlx_unified.testing import tiny_checkpoint  # noqa: E402

HERE = Path(__file__).parent
TARGET = HERE / "checkpoints" / "drafter-target"
OUT = HERE / "checkpoints" / "drafter-trained"
RESULTS = HERE / "results" / "train_drafter.json"
PROMPT_TOKENS, NEW_TOKENS = 16, 48
FIRST_ORDINARY_TOKEN = 20  # the tiny tokenizer's special tokens sit below
DRAFT_STEPS = 3
TARGET_ACCEPTANCE = 0.5


def target_checkpoint(path: Path) -> Path:
    if not (path / "config.json").exists():
        tiny_checkpoint(path, seed=0)
    return path


def drafter_config(target: Model) -> DrafterConfig:
    """A released-style config (mlx-vlm reads it too) whose attention shapes are the target's."""
    t = target.config.text
    sliding, full = t.layer(t.last_layer(SLIDING)), t.layer(t.last_layer("full_attention"))
    text = dict(
        model_type="gemma4_unified_text",
        hidden_size=t.hidden_size,
        intermediate_size=t.hidden_size * 2,
        num_hidden_layers=2,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=sliding.num_kv_heads,
        head_dim=sliding.head_dim,
        global_head_dim=full.head_dim,
        num_global_key_value_heads=full.num_kv_heads,
        attention_k_eq_v=t.attention_k_eq_v,
        num_kv_shared_layers=2,
        hidden_size_per_layer_input=0,
        vocab_size=t.vocab_size,
        sliding_window=t.sliding_window,
        layer_types=["sliding_attention", "full_attention"],
        rms_norm_eps=t.rms_norm_eps,
        hidden_activation=t.hidden_activation,
        final_logit_softcapping=None,
        tie_word_embeddings=True,
    )
    return DrafterConfig.from_dict(
        dict(
            architectures=["Gemma4UnifiedAssistantForCausalLM"],
            model_type="gemma4_unified_assistant",
            backbone_hidden_size=t.hidden_size,
            use_ordered_embeddings=False,
            tie_word_embeddings=True,
            text_config=text,
        )
    )


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
    ids = mx.array(sequences)
    cache = model.make_cache()
    cache[model.config.text.last_layer(SLIDING)] = SlidingWindowCache(sequences.shape[1])  # keeps them all
    _, hidden = model.forward_embeddings(model.embed_text(ids), cache=cache, return_hidden=True)
    embedded, kv = model.language_model.embed(ids), shared_kv(model, cache)
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
    return rates, drafts


def copy_baseline(sequences: np.ndarray) -> dict:
    """The acceptance of drafting the last token again and again: what a random target's greedy
    repetitions give for free, and what the drafter has to beat."""
    P, L = PROMPT_TOKENS, sequences.shape[1] - PROMPT_TOKENS - DRAFT_STEPS
    last = np.repeat(sequences[:, None, P : P + L], DRAFT_STEPS, axis=1)
    return accepted_rates(last, np.array(step_labels(sequences)))


def check_runtime_path(drafter: Drafter, model: Model, sequences: np.ndarray, drafts: np.ndarray) -> int:
    """Draft through `speculative.draft` from a prefilled cache (a ring one slot longer than the window)
    at a few held-out positions; the tokens must equal the batched evaluation's. Returns the count."""
    text = model.config.text
    checked = 0
    for row in range(0, len(sequences), max(1, len(sequences) // 4)):
        for i in (0, drafts.shape[2] // 2, drafts.shape[2] - 1):
            q = PROMPT_TOKENS + i
            cache = model.make_cache()
            cache[text.last_layer(SLIDING)] = SlidingWindowCache(text.sliding_window, text.sliding_window + 1)
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
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--train-prompts", type=int, default=2048)
    parser.add_argument("--held-out-prompts", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", type=Path, default=TARGET)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--eval-every", type=int, default=50)
    args = parser.parse_args()

    mx.random.seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model = mlx_unified.load_model(target_checkpoint(args.target), dtype="float32")
    vocab = model.config.text.vocab_size
    started = time.perf_counter()

    def sequences(count: int) -> np.ndarray:
        prompts = rng.integers(FIRST_ORDINARY_TOKEN, vocab, (count, PROMPT_TOKENS))
        return np.concatenate([greedy_sequences(model, prompts[i : i + 128]) for i in range(0, count, 128)])

    train, held_out = sequences(args.train_prompts), sequences(args.held_out_prompts)
    features = [target_features(model, train[i : i + args.batch]) for i in range(0, len(train), args.batch)]
    labels = [step_labels(train[i : i + args.batch]) for i in range(0, len(train), args.batch)]
    held_out_features = target_features(model, held_out)
    data_s = time.perf_counter() - started

    drafter = Drafter(drafter_config(model))
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
    train_s = time.perf_counter() - started - data_s

    final, drafts = acceptance(drafter, model, held_out_features, held_out)
    checked = check_runtime_path(drafter, model, held_out, drafts)
    save_drafter(drafter.apply(lambda w: w.astype(mx.bfloat16) if mx.issubdtype(w.dtype, mx.floating) else w), args.out)
    result = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": machine_description(),
        "target": os.path.relpath(args.target),
        "target_text_config": model.config.raw.get("text_config"),
        "drafter": os.path.relpath(args.out),
        "drafter_text_config": drafter.config.raw["text_config"],
        "draft_steps": DRAFT_STEPS,
        "train_sequences": len(train),
        "held_out_sequences": len(held_out),
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
    print(f"held-out acceptance {final['acceptance']:.3f} at k={DRAFT_STEPS} (first token {final['first_token']:.3f}, "
          f"mean accepted {final['mean_accepted_length']:.2f}); drafting the last token again: {copy['acceptance']:.3f} "
          f"(first {copy['first_token']:.3f}); {checked} positions drafted through the runtime path agree")
    print(f"wrote {args.out} and {RESULTS}")
    if final["acceptance"] < TARGET_ACCEPTANCE:
        sys.exit(f"acceptance {final['acceptance']:.3f} is below {TARGET_ACCEPTANCE}")


if __name__ == "__main__":
    main()
