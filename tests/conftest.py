"""Fixtures every test module shares: the tiny random checkpoints, and a prefix-cache folder of its own."""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any

import pytest

from mlx_unified.testing import tiny_checkpoint


class TinyCheckpoint:
    """A tiny random checkpoint (`mlx_unified.testing.tiny_checkpoint`) and, read on first use, its
    float32 model and its processor."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @cached_property
    def model(self) -> Any:
        from mlx_unified.loading import load_model

        return load_model(self.path, dtype="float32")

    @cached_property
    def processor(self) -> Any:
        from mlx_unified.processing import Processor

        return Processor.from_pretrained(self.path)


@pytest.fixture(scope="session")
def tiny_factory(tmp_path_factory) -> Callable[..., TinyCheckpoint]:
    """`tiny_factory(seed=0, **text_overrides)`: the tiny checkpoint of these settings, written once per
    session (modules that ask for the same settings share it)."""
    made: dict[tuple, TinyCheckpoint] = {}

    def make(seed: int = 0, **text_overrides: Any) -> TinyCheckpoint:
        key = (seed, *sorted(text_overrides.items()))
        if key not in made:
            folder = tmp_path_factory.mktemp(f"tiny-{seed}") / "checkpoint"
            made[key] = TinyCheckpoint(tiny_checkpoint(folder, seed=seed, **text_overrides))
        return made[key]

    return make


@pytest.fixture(scope="module")
def tiny(request, tiny_factory) -> TinyCheckpoint:
    """The module's tiny checkpoint, with the settings of its `pytestmark = pytest.mark.tiny(seed=...,
    **text_overrides)` (without one: seed 0, the default shapes)."""
    marker = request.node.get_closest_marker("tiny")
    return tiny_factory(**marker.kwargs) if marker else tiny_factory()


@pytest.fixture(autouse=True, scope="session")
def prefix_cache_folder(tmp_path_factory) -> Path:
    """Persisted prompt prefixes go to a test folder, never to the user's ~/.cache (the CLI and the app,
    also as subprocesses, persist them by default)."""
    folder = tmp_path_factory.mktemp("prefix-cache")
    os.environ["MLX_UNIFIED_CACHE_DIR"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def scripted(tmp_path_factory) -> Path:
    """A tiny checkpoint taught the conversations of `scripted_replies` (tool calls, thinking)."""
    from scripted_replies import CONTEXT_TOKENS, REPLIES

    from mlx_unified.testing.scripted import scripted_checkpoint

    folder = tmp_path_factory.mktemp("scripted") / "checkpoint"
    return scripted_checkpoint(folder, REPLIES, max_position_embeddings=CONTEXT_TOKENS)
