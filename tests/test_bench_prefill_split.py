"""The prefill split's "shared products" are exactly the linear layers both libraries compute."""

from __future__ import annotations

import pytest
from bench_prefill_split import decoder_linears, shared_inputs, shared_products
from mlx_vlm.utils import load_model as vlm_load_model

from mlx_unified.loading import load_model

PROMPT_TOKENS = 5
pytestmark = pytest.mark.tiny(seed=3)


def _linear_shapes(layers) -> list[tuple[int, int]]:
    """(out, in) of every Linear in the decoder layers, sorted."""
    return sorted(tuple(linear.weight.shape) for linear in decoder_linears(layers))


def test_shared_products_are_every_linear_layer_of_both_libraries(tiny):
    ours, theirs = load_model(tiny.path), vlm_load_model(tiny.path)
    ours_linears = _linear_shapes(ours.language_model.layers)
    assert ours_linears == _linear_shapes(theirs.language_model.model.layers)

    outputs = shared_products(ours, shared_inputs(ours, PROMPT_TOKENS))
    *layer_outputs, head = outputs
    # one product per Linear, each with its output width over the whole pass
    assert sorted((o.shape[-1], o.shape[1]) for o in layer_outputs) == sorted(
        (out, PROMPT_TOKENS) for out, _ in ours_linears
    )
    assert head.shape == (1, 1, ours.config.text.vocab_size)

