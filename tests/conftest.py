import sys
from pathlib import Path

# tests/reference.py (the reference-implementation harness) is imported by name from the tests.
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def scripted(tmp_path_factory) -> Path:
    """A tiny checkpoint taught the conversations of `scripted_replies` (tool calls, thinking)."""
    from scripted_replies import CONTEXT_TOKENS, REPLIES

    from mlx_unified.testing.scripted import scripted_checkpoint

    folder = tmp_path_factory.mktemp("scripted") / "checkpoint"
    return scripted_checkpoint(folder, REPLIES, max_position_embeddings=CONTEXT_TOKENS)
