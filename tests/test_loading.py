"""Config reading, checkpoint loading (released layout, shards, hub ids) and the tiny checkpoint."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers import Gemma4UnifiedForConditionalGeneration

import mlx_unified
from mlx_unified.checkpoint import ModelLoadError, hf_to_mlx_name, module_quantization, peer_name, resolve
from mlx_unified.config import GLOBAL, SLIDING, ConfigError, ModelConfig, load_config
from mlx_unified.kernels.rope_tables import inv_freq
from mlx_unified.testing import tiny_checkpoint
from mlx_unified.testing.reference import build_reference_checkpoint, reference_logits


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ref")
    ref = build_reference_checkpoint(path, seed=5)
    return path, ref


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_both_spellings_of_the_global_layer_shape(checkpoint):
    path, _ = checkpoint
    data = json.loads((path / "config.json").read_text())
    per_layer = ModelConfig.from_dict(data).text
    assert per_layer.per_layer_config is not None
    text = dict(data["text_config"])
    text.pop("per_layer_config")
    text.update(global_head_dim=32, num_global_key_value_heads=1)
    spelled = ModelConfig.from_dict({**data, "text_config": text}).text
    for i in range(per_layer.num_hidden_layers):
        assert per_layer.layer(i) == spelled.layer(i)
    assert per_layer.layer(0).layer_type == SLIDING and per_layer.layer(0).head_dim == 16
    assert per_layer.layer(3).layer_type == GLOBAL and per_layer.layer(3).head_dim == 32
    assert per_layer.layer(3).num_kv_heads == 1 and per_layer.layer(3).k_eq_v


def test_released_12b_config_defaults():
    config = ModelConfig.from_dict(
        {"model_type": "gemma4_unified", "text_config": {}, "vision_config": {}, "audio_config": {}}
    )
    text = config.text
    assert text.layer_types.count(GLOBAL) == 8 and text.layer_types[-1] == GLOBAL
    assert text.layer(5) == text.layer(47)
    assert (text.layer(5).head_dim, text.layer(5).num_kv_heads, text.layer(5).k_eq_v) == (512, 1, True)
    assert (text.layer(0).head_dim, text.layer(0).num_kv_heads) == (256, 8)
    freq = np.array(inv_freq(text.layer(5).rope, 512))
    assert (freq > 0).sum() == 64 and freq[0] == 1.0


@pytest.mark.parametrize("model_type", ["gemma4", "llama", None])
def test_other_model_types_are_refused(tmp_path, model_type):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, "text_config": {}}))
    with pytest.raises(ConfigError, match="not supported"):
        load_config(tmp_path)


def test_config_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        load_config(tmp_path)


def test_weight_names_map_once():
    assert hf_to_mlx_name("model.language_model.layers.3.self_attn.q_proj.weight") == (
        "language_model.layers.3.self_attn.q_proj.weight"
    )
    assert hf_to_mlx_name("model.vision_embedder.pos_embedding") == "vision_embedder.pos_embedding"
    assert hf_to_mlx_name("model.embed_vision.patch_ln1.weight") == "vision_embedder.patch_ln1.weight"
    assert hf_to_mlx_name("model.embed_vision.multimodal_embedder.embedding_projection.weight") == (
        "embed_vision.embedding_projection.weight"
    )
    assert hf_to_mlx_name("lm_head.weight") is None
    # our own earlier converted layout passes through unchanged; mlx-vlm's and mlx-lm's wrap the decoder
    assert hf_to_mlx_name("language_model.norm.weight") == "language_model.norm.weight"
    assert hf_to_mlx_name("language_model.model.layers.3.mlp.down_proj.scales") == (
        "language_model.layers.3.mlp.down_proj.scales"
    )
    assert hf_to_mlx_name("vision_embedder.patch_dense.weight") == "vision_embedder.patch_dense.weight"
    for name in ("language_model.layers.0.self_attn.o_proj", "embed_audio.embedding_projection"):
        assert hf_to_mlx_name(peer_name(name)) == name
    assert peer_name("language_model.embed_tokens") == "language_model.model.embed_tokens"


def test_quantization_overrides_of_every_layout_are_keyed_by_our_paths():
    section = {
        "group_size": 64,
        "bits": 4,
        "mode": "affine",
        "language_model.model.embed_tokens": {"group_size": 64, "bits": 6},  # mlx-vlm's, without a mode
        "language_model.layers.1.mlp.down_proj": {"group_size": 32, "bits": 8, "mode": "affine"},  # ours
        "vision_embedder.patch_dense": False,
    }
    assert module_quantization(section) == {
        "group_size": 64,
        "bits": 4,
        "mode": "affine",
        "language_model.embed_tokens": {"group_size": 64, "bits": 6},
        "language_model.layers.1.mlp.down_proj": {"group_size": 32, "bits": 8, "mode": "affine"},
        "vision_embedder.patch_dense": False,
    }


def test_sharded_checkpoint_loads_through_its_index(tmp_path, checkpoint):
    _, ref = checkpoint
    ref.save_pretrained(str(tmp_path), max_shard_size="200KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    model = mlx_unified.load_model(tmp_path, dtype="float32")
    ids = np.array([[2, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49]])
    np.testing.assert_allclose(
        np.array(model(mx.array(ids))), reference_logits(ref, {"input_ids": ids}), rtol=0, atol=1e-3
    )


def test_bfloat16_is_the_default_and_float32_on_request(checkpoint):
    path, _ = checkpoint
    assert mlx_unified.load_model(path).dtype == mx.bfloat16
    assert mlx_unified.load_model(path, dtype="float32").dtype == mx.float32
    with pytest.raises(ModelLoadError, match="dtype"):
        mlx_unified.load_model(path, dtype="int8")


def test_bfloat16_checkpoint_matches_reference_in_bfloat16(tmp_path, checkpoint):
    _, ref = checkpoint
    ref.to(torch.bfloat16).save_pretrained(str(tmp_path))
    ref.float()
    bf16_ref = Gemma4UnifiedForConditionalGeneration.from_pretrained(str(tmp_path), dtype=torch.bfloat16).eval()
    model = mlx_unified.load_model(tmp_path)
    ids = np.array([[2, 60, 61, 62, 63, 64, 65, 66]])
    with torch.no_grad():
        expected = bf16_ref(input_ids=torch.from_numpy(ids)).logits.float().numpy()
    got = np.array(model(mx.array(ids)).astype(mx.float32))
    # bf16 has 8 mantissa bits: the two stacks round differently, the logits agree to a few units
    assert np.abs(got - expected).max() / np.abs(expected).max() < 0.05
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.85


def test_missing_and_unexpected_weights_are_named(tmp_path, checkpoint):
    path, _ = checkpoint
    weights = mx.load(str(path / "model.safetensors"))
    dropped = "model.language_model.layers.1.mlp.up_proj.weight"
    del weights[dropped]
    weights["model.language_model.layers.1.mlp.extra.weight"] = mx.zeros((2, 2))
    target = copy_checkpoint(path, tmp_path / "broken")
    mx.save_safetensors(str(target / "model.safetensors"), weights)
    with pytest.raises(ModelLoadError) as err:
        mlx_unified.load_model(target)
    assert "language_model.layers.1.mlp.up_proj.weight" in str(err.value)
    assert "language_model.layers.1.mlp.extra.weight" in str(err.value)


def test_truncated_shard_and_missing_files_are_refused(tmp_path, checkpoint):
    path, _ = checkpoint
    target = copy_checkpoint(path, tmp_path / "truncated")
    data = (target / "model.safetensors").read_bytes()
    (target / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        mlx_unified.load_model(target)
    (target / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        mlx_unified.load_model(target)
    with pytest.raises(ModelLoadError, match="not a checkpoint folder"):
        mlx_unified.load_model(tmp_path / "nowhere")


def test_hub_ids_offline_and_malformed(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="offline"):
        resolve("google/gemma-4-12B-it")
    with pytest.raises(ModelLoadError, match="not a hub id"):
        resolve("no/such/folder/here")


def test_tiny_checkpoint_is_the_released_layout(tmp_path):
    """The reference itself loads our tiny checkpoint, and both give the same logits."""
    path = tiny_checkpoint(tmp_path / "tiny", seed=1)
    config = json.loads((path / "config.json").read_text())
    assert config["mlx_unified_random_weights"] is True
    ref = Gemma4UnifiedForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32).eval()
    model = mlx_unified.load_model(path, dtype="float32")
    ids = np.array([[2, 30, 31, 32, 33, 34, 35, 36, 37]])
    got = np.array(model(mx.array(ids)))
    expected = reference_logits(ref, {"input_ids": ids})
    assert np.abs(got - expected).max() / np.abs(expected).max() < 1e-4


# ---------------------------------------------------------------- damaged checkpoints: typed, named refusals


@pytest.fixture
def tiny_copy(tiny, tmp_path):
    return Path(shutil.copytree(tiny.path, tmp_path / "checkpoint"))


def _rewrite_weights(folder, change):
    weights = dict(mx.load(str(folder / "model.safetensors")))
    change(weights)
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "pt"})


def test_a_tensor_of_the_wrong_shape_is_refused_naming_it_and_its_file(tiny_copy):
    name = "model.language_model.layers.1.mlp.up_proj.weight"
    _rewrite_weights(tiny_copy, lambda w: w.update({name: w[name][:-1]}))
    with pytest.raises(ModelLoadError) as refused:
        mlx_unified.load_model(tiny_copy)
    message = str(refused.value)
    assert str(tiny_copy / "model.safetensors") in message
    assert "language_model.layers.1.mlp.up_proj.weight has shape (127, 64)" in message and "(128, 64)" in message


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_infinite_weights_are_refused_naming_the_tensor(tiny_copy, value):
    name = "model.language_model.layers.2.self_attn.k_norm.weight"
    _rewrite_weights(tiny_copy, lambda w: w.update({name: mx.concatenate([w[name][:3], mx.array([value], w[name].dtype), w[name][4:]])}))
    with pytest.raises(ModelLoadError, match="tensor language_model.layers.2.self_attn.k_norm.weight holds NaN or infinite"):
        mlx_unified.load_model(tiny_copy)


# Config entries of the wrong type or range, each refused naming the entry (a ConfigError, not a crash).
BAD_CONFIG = {
    "hidden_size as text": ("text_config", "hidden_size", "64", "text_config.hidden_size must be a positive integer"),
    "hidden_size fractional": ("text_config", "hidden_size", 64.5, "text_config.hidden_size must be a positive integer"),
    "hidden_size negative": ("text_config", "hidden_size", -64, "text_config.hidden_size must be a positive integer"),
    "hidden_size zero": ("text_config", "hidden_size", 0, "text_config.hidden_size must be a positive integer"),
    "hidden_size boolean": ("text_config", "hidden_size", True, "text_config.hidden_size must be a positive integer"),
    "layers as text": ("text_config", "num_hidden_layers", "6", "text_config.num_hidden_layers must be a positive integer"),
    "window negative": ("text_config", "sliding_window", -1, "text_config.sliding_window must be a positive integer"),
    "eps as text": ("text_config", "rms_norm_eps", "1e-6", "text_config.rms_norm_eps must be a positive number"),
    "layer types not a list": ("text_config", "layer_types", 5, "text_config.layer_types must be a list of layer type names"),
    "rope parameters a list": ("text_config", "rope_parameters", [1], "text_config.rope_parameters must be a JSON object"),
    "rope theta as text": ("text_config", "rope_parameters", {"full_attention": {"rope_theta": "big"}}, "rope_parameters.full_attention.rope_theta"),
    "per-layer key": ("text_config", "per_layer_config", {"x": {}}, "per_layer_config.x: the key must be a layer index"),
    "eos as text": ("text_config", "eos_token_id", "1", "text_config.eos_token_id must be a token id"),
    "eos outside the vocabulary": ("text_config", "eos_token_id", 10**6, "text_config.eos_token_id 1000000 is outside the vocabulary"),
    "heads not divisible": ("text_config", "num_key_value_heads", 3, "which do not divide num_attention_heads 4"),
    "k=v flag as text": ("text_config", "attention_k_eq_v", "yes", "text_config.attention_k_eq_v must be true or false"),
    "text config a list": (None, "text_config", [], "text_config must be a JSON object"),
    "vision config a number": (None, "vision_config", 5, "vision_config must be a JSON object"),
    "patch size zero": ("vision_config", "patch_size", 0, "vision_config.patch_size must be a positive integer"),
    "audio frame as text": ("audio_config", "audio_embed_dim", "640", "audio_config.audio_embed_dim must be a positive integer"),
    "image token negative": (None, "image_token_id", -5, "image_token_id must be a token id"),
    "image token outside the vocabulary": (None, "image_token_id", 10**6, "image_token_id 1000000 is outside the vocabulary"),
    "quantization a list": (None, "quantization", [4], "quantization must be a JSON object"),
    "quantization bits as text": (None, "quantization", {"bits": "4", "group_size": 64}, "quantization.bits must be a positive integer"),
}


def _edit_config(folder, section, key, value):
    config = json.loads((folder / "config.json").read_text())
    (config[section] if section else config)[key] = value
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("case", list(BAD_CONFIG), ids=list(BAD_CONFIG))
def test_config_entries_of_the_wrong_type_or_range_are_refused_naming_them(tiny_copy, case):
    section, key, value, message = BAD_CONFIG[case]
    _edit_config(tiny_copy, section, key, value)
    with pytest.raises(ConfigError, match=re.escape(message)) as refused:
        mlx_unified.load_model(tiny_copy)
    assert str(tiny_copy / "config.json") in str(refused.value)
