"""Generation with every step's logits kept, for tests that compare runs step by step."""

from __future__ import annotations

import numpy as np

from mlx_unified.generation import generate


class LogitsLog:
    """A logits processor that keeps every step's logits (and changes nothing)."""

    def __init__(self):
        self.steps = []

    def __call__(self, tokens, logits):
        self.steps.append(np.array(logits))
        return logits


def run_logged(model, processor, prompt, max_tokens: int, **kwargs):
    """(GenerationResult, logits of every step)."""
    log = LogitsLog()
    result = generate(model, processor, prompt, max_tokens=max_tokens, logits_processors=[log], **kwargs)
    return result, log.steps
