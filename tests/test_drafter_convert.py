"""The converter on the MTP drafter: float and quantized conversions load and compute what the drafter
computes, dequantizing restores the released layout (transformers reads it), and the memory plan counts
the drafter beside the model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from transformers import Gemma4UnifiedAssistantForCausalLM

from mlx_unified.convert import ConvertError, convert, main
from mlx_unified.drafter import KeyValues, load_drafter
from mlx_unified.testing.reference import build_reference_drafter, build_reference_model, shared_kv_patch


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A reference drafter with the centroid head (its token ordering int64, as released), float32."""
    path = tmp_path_factory.mktemp("drafter-source")
    build_reference_drafter(build_reference_model(seed=3), seed=5, centroids=True).save_pretrained(path)
    return path


def outputs(drafter, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One draft step on random inputs (the target's keys included): logits and projected state."""
    rng = np.random.default_rng(seed)
    text, backbone = drafter.config.text, drafter.config.backbone_hidden_size

    def kv(layer: int, length: int = 12) -> KeyValues:
        shape = text.layer(layer)
        keys = mx.array(rng.standard_normal((1, shape.num_kv_heads, length, shape.head_dim)).astype(np.float32))
        return KeyValues(keys, keys * 0.5, 0)

    target = {kind: kv(text.layer_types.index(kind)) for kind in set(text.layer_types)}
    token = mx.array(rng.standard_normal((1, 1, backbone)).astype(np.float32))
    hidden = mx.array(rng.standard_normal((1, 1, backbone)).astype(np.float32))
    logits, state = drafter(token, hidden, target, 12)
    return np.array(logits), np.array(state)


def test_float_conversion_is_exact(source, tmp_path):
    out = convert(source, tmp_path / "float")
    converted, original = load_drafter(out, dtype="float32"), load_drafter(source, dtype="float32")
    for (name, a), (_, b) in zip(
        nn.utils.tree_flatten(converted.parameters()), nn.utils.tree_flatten(original.parameters()), strict=True
    ):
        assert np.array_equal(np.array(a), np.array(b)), name
    assert np.array_equal(np.array(converted.masked_embedding.token_ordering), np.array(original.masked_embedding.token_ordering))


def test_quantized_drafter_computes_its_quantized_weights_and_dequantizes_for_transformers(source, tmp_path):
    """4 bits, groups of 32: the quantized modules are exactly those whose rows split into groups; the
    drafter loaded from it computes what the float drafter quantized in memory computes; dequantized,
    transformers loads it, with our weights and token ordering."""
    out = convert(source, tmp_path / "q4", quantize=True, q_bits=4, q_group_size=32)
    quantized = load_drafter(out, dtype="float32")
    expected = load_drafter(source, dtype="float32")
    nn.quantize(
        expected, group_size=32, bits=4,
        class_predicate=lambda _, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % 32 == 0,
    )  # fmt: skip
    assert isinstance(quantized.model.embed_tokens, nn.QuantizedEmbedding)
    assert isinstance(quantized.masked_embedding.centroids, nn.QuantizedLinear)
    for got, want in zip(outputs(quantized), outputs(expected), strict=True):
        assert np.array_equal(got, want)
    restored = convert(out, tmp_path / "bf16", dequantize=True)
    with shared_kv_patch():
        reference = Gemma4UnifiedAssistantForCausalLM.from_pretrained(restored, dtype=torch.float32)
    ordering = reference.masked_embedding.token_ordering
    assert ordering.dtype == torch.int64
    assert np.array_equal(ordering.numpy(), np.array(quantized.masked_embedding.token_ordering))
    ours = load_drafter(restored, dtype="float32")
    assert np.allclose(np.array(ours.model.embed_tokens.weight), reference.model.embed_tokens.weight.detach().float().numpy())


def test_a_drafter_with_missing_tensors_is_refused(source, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((source / "config.json").read_text())
    weights = mx.load(str(source / "model.safetensors"))
    del weights["post_projection.weight"]
    mx.save_safetensors(str(partial / "model.safetensors"), weights)
    with pytest.raises(ConvertError, match="missing.*post_projection"):
        convert(partial, tmp_path / "out")


def test_the_memory_plan_counts_the_drafter(tmp_path, capsys):
    """The released drafter's shapes (a config.json is all --plan reads) add to every row's weights."""
    from test_drafter import released_drafter_config

    (tmp_path / "config.json").write_text(json.dumps(released_drafter_config()))

    def weights_column(argv: list[str]) -> tuple[str, list[float]]:
        assert main(["--plan", "--memory", "16GB", *argv]) == 0
        text = capsys.readouterr().out
        return text, [float(m) for m in re.findall(r"^\S+(?: \S+)?\s+(\d+\.\d+)\s", text, flags=re.M)]

    plain_text, plain = weights_column([])
    with_drafter_text, with_drafter = weights_column(["--draft-model", str(tmp_path)])
    assert "draft model" in with_drafter_text and "draft model" not in plain_text
    assert len(plain) == len(with_drafter) > 3
    assert all(b > a for a, b in zip(plain, with_drafter, strict=True))
    assert with_drafter[0] - plain[0] > 0.5  # bf16: the 262144 x 1024 embedding alone is 0.54 GB
    assert main(["--plan", "--draft-model", str(tmp_path / "nope")]) == 2
