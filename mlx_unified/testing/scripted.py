"""A tiny checkpoint that gives chosen replies to chosen conversations.

A random checkpoint never calls a tool or thinks aloud on its own, so tests of tool calls and thinking
need a model that does. `scripted_checkpoint` writes the tiny random checkpoint, then fine-tunes it
(Adam on every weight, teacher forcing) on the given conversations until greedy decoding of the saved
bf16 checkpoint reproduces each reply token for token, through the real chat template and
`stream_generate`. About a hundred steps, seconds on a CPU. Elsewhere its output stays meaningless.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from . import tiny_checkpoint

LEARNING_RATE = 3e-3
CHECK_EVERY = 10


@dataclass
class ScriptedReply:
    """`reply` (raw model text, ending with its stop marker, e.g. `<turn|>`) to `messages` rendered
    with `chat_template_kwargs` (e.g. `{"enable_thinking": True}` or `{"tools": [...]}`)."""

    messages: list[dict[str, Any]]
    reply: str
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)


def scripted_checkpoint(
    path: str | Path, replies: Sequence[ScriptedReply], seed: int = 0, max_steps: int = 600, **text_overrides: Any
) -> Path:
    """Write the checkpoint to `path` and return it; RuntimeError if `max_steps` do not teach every reply."""
    from ..generation import generate
    from ..loading import load

    path = tiny_checkpoint(path, seed, **text_overrides)
    model, processor = load(path, dtype="float32")
    examples = [_example(processor, reply) for reply in replies]
    inputs, targets, mask = _batch(examples)
    optimizer = optim.Adam(learning_rate=LEARNING_RATE)
    loss_and_grad = nn.value_and_grad(model, _loss)
    for step in range(1, max_steps + 1):
        _, grads = loss_and_grad(model, inputs, targets, mask)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
        if step % CHECK_EVERY or not _teacher_forced_exact(model, inputs, targets, mask):
            continue
        _save(model, path)
        saved, saved_processor = load(path)
        if all(
            generate(
                saved,
                saved_processor,
                reply.messages,
                max_tokens=len(expected) + 1,
                chat_template_kwargs=reply.chat_template_kwargs,
                use_prefix_cache=False,
            ).tokens
            == expected
            for reply, (_, expected) in zip(replies, examples, strict=True)
        ):
            config_file = path / "config.json"
            config = json.loads(config_file.read_text())
            config["mlx_unified_scripted_replies"] = len(replies)
            config_file.write_text(json.dumps(config, indent=2))
            return path
    raise RuntimeError(f"{len(replies)} scripted replies not learned in {max_steps} steps")


def _example(processor: Any, reply: ScriptedReply) -> tuple[list[int], list[int]]:
    prompt = processor(reply.messages, chat_template_kwargs=reply.chat_template_kwargs)["input_ids"][0].tolist()
    expected = processor.tokenizer(reply.reply, add_special_tokens=False)["input_ids"]
    return prompt, expected


def _batch(examples: list[tuple[list[int], list[int]]]) -> tuple[mx.array, mx.array, mx.array]:
    """Right-padded inputs, next-token targets and a mask over the reply positions."""
    length = max(len(prompt) + len(reply) for prompt, reply in examples) - 1
    inputs = np.zeros((len(examples), length), np.int32)
    targets = np.zeros_like(inputs)
    mask = np.zeros(inputs.shape, np.float32)
    for row, (prompt, reply) in enumerate(examples):
        sequence = prompt + reply
        inputs[row, : len(sequence) - 1] = sequence[:-1]
        targets[row, : len(sequence) - 1] = sequence[1:]
        mask[row, len(prompt) - 1 : len(sequence) - 1] = 1
    return mx.array(inputs), mx.array(targets), mx.array(mask)


def _loss(model: nn.Module, inputs: mx.array, targets: mx.array, mask: mx.array) -> mx.array:
    losses = nn.losses.cross_entropy(model(inputs), targets, reduction="none")
    return (losses * mask).sum() / mask.sum()


def _teacher_forced_exact(model: nn.Module, inputs: mx.array, targets: mx.array, mask: mx.array) -> bool:
    """Every reply token is the argmax given the ones before it, also with the weights rounded to bf16."""
    weights = dict(nn.utils.tree_flatten(model.parameters()))
    model.update(nn.utils.tree_unflatten([(k, v.astype(mx.bfloat16).astype(v.dtype)) for k, v in weights.items()]))
    predicted = mx.argmax(model(inputs), axis=-1)
    model.update(nn.utils.tree_unflatten(list(weights.items())))
    return bool(mx.all(mx.where(mask > 0, predicted == targets, True)).item())


def _save(model: nn.Module, path: Path) -> None:
    """The weights in the released layout (`model.` + our names), bf16 as the release."""
    weights = {f"model.{name}": value.astype(mx.bfloat16) for name, value in nn.utils.tree_flatten(model.parameters())}
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "pt"})
