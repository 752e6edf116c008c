"""Loading the drafter: the released layout (as transformers saves it) and mlx-vlm's (quantized by
mlx-vlm's own loader and quantizer), dtypes, shards, and the refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_unified.checkpoint import ModelLoadError
from mlx_unified.config import ConfigError
from mlx_unified.drafter import KeyValues, load_drafter
from mlx_unified.testing.reference import (
    build_reference_drafter,
    build_reference_model,
    reference_drafter_step,
    reference_target_outputs,
    reference_token_embedding,
    relative_error,
    text_prompt,
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(reference target, reference drafter with the centroid head, its released-layout folder)."""
    target = build_reference_model(seed=3)
    drafter = build_reference_drafter(target, seed=5, centroids=True)
    path = tmp_path_factory.mktemp("drafter-hf")
    drafter.save_pretrained(path)
    return target, drafter, path


@pytest.fixture(scope="module")
def step_inputs(reference):
    """One draft step's inputs from the reference target: (inputs_embeds, shared KV, position)."""
    target, _, _ = reference
    inputs = text_prompt(np.random.default_rng(30), 21)
    hidden, shared = reference_target_outputs(target, inputs)
    embedded = reference_token_embedding(target, 42)
    return np.concatenate([embedded, hidden[:, -1:]], axis=-1), shared, inputs["input_ids"].shape[1]


def ours_step(drafter, step_inputs):
    inputs_embeds, shared, position = step_inputs
    backbone = drafter.config.backbone_hidden_size
    kv = {kind: KeyValues(mx.array(k), mx.array(v), 0) for kind, (k, v) in shared.items()}
    embedded, hidden = mx.array(inputs_embeds[..., :backbone]), mx.array(inputs_embeds[..., backbone:])
    logits, projected = drafter(embedded, hidden, kv, position)
    return np.array(logits.astype(mx.float32)), np.array(projected.astype(mx.float32))


def mlx_vlm_convert(src: Path, dst: Path, bits: int = 4, group_size: int = 32) -> Path:
    """The mlx-vlm layout, written as `mlx_vlm.convert` writes it (its loader, bf16, its quantizer
    and saver; `pre_projection` at 8 bits as a per-module override), minus the processor files a
    drafter has none of. mlx-vlm reads the released Gemma 4 config keys (`global_head_dim`,
    `hidden_size_per_layer_input`), which transformers folds away on saving: they are put back."""
    from mlx.utils import tree_map
    from mlx_vlm.quant_utils import quantize_model
    from mlx_vlm.utils import load_config, load_model, save_config, save_weights

    staged = dst.parent / f"{dst.name}-staged"
    shutil.copytree(src, staged)
    config = json.loads((staged / "config.json").read_text())
    text = config["text_config"]
    full = next(v for k, v in text["per_layer_config"].items() if text["layer_types"][int(k)] == "full_attention")
    text.update(
        hidden_size_per_layer_input=0,
        global_head_dim=full["head_dim"],
        num_global_key_value_heads=full["num_key_value_heads"],
    )
    (staged / "config.json").write_text(json.dumps(config))
    model = load_model(staged, lazy=True)
    model.update(
        tree_map(lambda v: v.astype(mx.bfloat16) if mx.issubdtype(v.dtype, mx.floating) else v, model.parameters())
    )
    config = load_config(staged)

    def predicate(path, module):
        return {"group_size": group_size, "bits": 8} if path == "pre_projection" else True

    model, config = quantize_model(model, config, group_size, bits, quant_predicate=predicate)
    save_weights(dst, model, donate_weights=True)
    save_config(config, config_path=dst / "config.json")
    return dst


def test_released_layout_float32_equals_the_reference(reference, step_inputs):
    """Every tensor as stored (token_ordering as int32); one step within 1e-4 of the reference."""
    _, ref, path = reference
    drafter = load_drafter(path, dtype="float32")
    ours = dict(nn.utils.tree_flatten(drafter.parameters()))
    theirs = {k: v.detach().numpy() for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        assert np.array_equal(np.array(ours[name]), value), name
    assert ours["masked_embedding.token_ordering"].dtype == mx.int32
    ref_logits, ref_projected = reference_drafter_step(ref, *step_inputs)
    logits, projected = ours_step(drafter, step_inputs)
    assert relative_error(logits, ref_logits) < 1e-4
    assert relative_error(projected, ref_projected) < 1e-4


def test_bfloat16_by_default_and_sharded(reference, step_inputs, tmp_path):
    _, ref, _ = reference
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    drafter = load_drafter(tmp_path)
    assert drafter.dtype == mx.bfloat16 and drafter.model.embed_tokens.weight.dtype == mx.bfloat16
    ref_logits, _ = reference_drafter_step(ref, *step_inputs)
    logits, _ = ours_step(drafter, step_inputs)
    assert relative_error(logits, ref_logits) < 0.05  # bf16 weights and activations


def test_mlx_vlm_layout_quantized(reference, step_inputs, tmp_path):
    """The quantized mlx-vlm layout loads into exactly the drafter we get by quantizing the released
    weights the same way (bf16, 4 bits in groups of 32, pre_projection at 8 bits, modules whose input
    width the group does not divide left in bf16): the same tensors, the same logits."""
    _, ref, path = reference
    converted = mlx_vlm_convert(path, tmp_path / "vlm-4bit")
    config = json.loads((converted / "config.json").read_text())
    assert config["quantization"]["pre_projection"] == {"group_size": 32, "bits": 8}
    drafter = load_drafter(converted)
    assert isinstance(drafter.pre_projection, nn.QuantizedLinear) and drafter.pre_projection.bits == 8
    assert isinstance(drafter.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    assert drafter.model.layers[0].self_attn.q_proj.bits == 4
    assert isinstance(drafter.model.embed_tokens, nn.QuantizedEmbedding)
    assert isinstance(drafter.model.layers[0].mlp.down_proj, nn.Linear)  # 48 inputs: not in groups of 32

    expected = load_drafter(path)
    stored = mx.load(str(converted / "model.safetensors"))

    def predicate(module_path, module):
        if f"{module_path}.scales" not in stored:
            return False
        return {"group_size": 32, "bits": 8 if module_path == "pre_projection" else 4}

    nn.quantize(expected, class_predicate=predicate)
    ours = dict(nn.utils.tree_flatten(drafter.parameters()))
    for name, value in nn.utils.tree_flatten(expected.parameters()):
        assert ours[name].dtype == value.dtype and mx.array_equal(ours[name], value).item(), name
    np.testing.assert_array_equal(ours_step(drafter, step_inputs)[0], ours_step(expected, step_inputs)[0])
    ref_logits, _ = reference_drafter_step(ref, *step_inputs)
    assert relative_error(ours_step(drafter, step_inputs)[0], ref_logits) < 0.3  # 4-bit weights


def rewrite_weights(path: Path, change) -> None:
    file = path / "model.safetensors"
    weights = dict(mx.load(str(file)))
    change(weights)
    mx.save_safetensors(str(file), weights, metadata={"format": "pt"})


def test_missing_unexpected_and_misshapen_weights_are_named(reference, tmp_path):
    _, _, path = reference
    missing = shutil.copytree(path, tmp_path / "missing")
    rewrite_weights(missing, lambda w: w.pop("model.layers.1.self_attn.q_norm.weight"))
    with pytest.raises(ModelLoadError, match=r"missing.*missing weights: model\.layers\.1\.self_attn\.q_norm\.weight"):
        load_drafter(missing)
    extra = shutil.copytree(path, tmp_path / "extra")
    rewrite_weights(extra, lambda w: w.update({"model.layers.0.self_attn.k_proj.weight": mx.zeros((32, 32))}))
    with pytest.raises(ModelLoadError, match=r"unexpected weights: model\.layers\.0\.self_attn\.k_proj\.weight"):
        load_drafter(extra)
    misshapen = shutil.copytree(path, tmp_path / "misshapen")
    rewrite_weights(misshapen, lambda w: w.update({"pre_projection.weight": mx.zeros((32, 100))}))
    with pytest.raises(ModelLoadError, match=r"misshapen.*pre_projection\.weight"):
        load_drafter(misshapen)


def test_unreadable_checkpoints_are_refused(reference, tmp_path):
    _, _, path = reference
    truncated = shutil.copytree(path, tmp_path / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="model.safetensors: (unreadable or )?truncated"):
        load_drafter(truncated)
    with pytest.raises(ModelLoadError, match="no such folder"):
        load_drafter(tmp_path / "nowhere")
    with pytest.raises(ModelLoadError, match="dtype 'int8'"):
        load_drafter(path, dtype="int8")


def test_a_target_checkpoint_is_not_a_drafter(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma4_unified", "text_config": {}}))
    with pytest.raises(ConfigError, match=r"config\.json: model_type 'gemma4_unified'"):
        load_drafter(tmp_path)


@pytest.mark.parametrize("centroids", [False, True])
def test_saved_drafter_loads_in_transformers_and_mlx_vlm(reference, step_inputs, tmp_path, centroids):
    """`save_drafter` writes the released layout: transformers' Gemma4UnifiedAssistantForCausalLM and
    mlx-vlm's drafter loader read it (the training benchmark's drafter is written so), and the
    reference then computes what ours does."""
    import torch
    from mlx_vlm.utils import load_model as vlm_load_model
    from transformers import Gemma4UnifiedAssistantForCausalLM

    from mlx_unified.drafter import Drafter, DrafterConfig, save_drafter
    from mlx_unified.testing.reference import shared_kv_patch

    target, _, _ = reference
    t = target.config.text_config
    text = dict(
        model_type="gemma4_unified_text", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
        attention_k_eq_v=True, num_kv_shared_layers=2, hidden_size_per_layer_input=0, vocab_size=t.vocab_size,
        sliding_window=t.sliding_window, layer_types=["sliding_attention", "full_attention"],
    )
    config = DrafterConfig.from_dict(
        dict(model_type="gemma4_unified_assistant", backbone_hidden_size=t.hidden_size, text_config=text,
             use_ordered_embeddings=centroids, num_centroids=16, centroid_intermediate_top_k=4)
    )
    drafter = Drafter(config)
    if centroids:
        drafter.masked_embedding.token_ordering = mx.array(np.random.default_rng(0).permutation(t.vocab_size), mx.int32)
    mx.eval(drafter.parameters())
    save_drafter(drafter, tmp_path)
    with shared_kv_patch():
        ref = Gemma4UnifiedAssistantForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ref_logits, ref_projected = reference_drafter_step(ref, *step_inputs)
    logits, projected = ours_step(drafter, step_inputs)
    assert relative_error(logits, ref_logits) < 1e-4
    assert relative_error(projected, ref_projected) < 1e-4
    vlm = vlm_load_model(tmp_path)
    ours = dict(nn.utils.tree_flatten(drafter.parameters()))
    for name, value in nn.utils.tree_flatten(vlm.parameters()):
        assert mx.array_equal(ours[name], value).item(), name
