"""Checkpoints shared with the peers, both ways: every format `mlx_vlm.convert` writes loads here with
mlx-vlm's greedy tokens; the same flags here write the same files, which mlx-vlm (and mlx-lm, for the
text) open with the same bits per module and the same tokens; mlx-lm's text-only conversions load as
text models; float32 goes through either converter and back with --dequantize bit for bit.

Both sides compute in float32 (`peers.in_float32`): the two implementations then agree to rounding
(about 1e-5 of the logits), which in bf16 their different orders of operations would not."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from media_files import write_image
from mlx_lm.convert import convert as lm_convert
from mlx_lm.utils import load_model as lm_load_model
from mlx_vlm.convert import convert as vlm_convert
from peers import bits_by_module, in_float32, lm_greedy, our_greedy, vlm_greedy, vlm_model

from mlx_unified.checkpoint import hf_to_mlx_name
from mlx_unified.config import ModelConfig
from mlx_unified.convert import convert
from mlx_unified.convert.conversion import with_peer_defaults
from mlx_unified.loading import load_model
from mlx_unified.processing import MediaError
from mlx_unified.testing import tiny_checkpoint
from mlx_unified.testing.reference import compare

REPO = Path(__file__).resolve().parents[1]
TOKENS = 16
# Each format mlx_vlm.convert writes: its arguments (as its command line passes them) and ours.
FORMATS = {
    "bf16": ({"dtype": "bfloat16"}, {"dtype": "bfloat16"}),
    "4-bit": ({"quantize": True}, {"quantize": True}),
    "8-bit": ({"quantize": True, "q_bits": 8}, {"quantize": True, "q_bits": 8}),
    "mixed_4_6": ({"quantize": True, "quant_predicate": "mixed_4_6"}, {"recipe": "mixed_4_6"}),
    "mxfp4": ({"quantize": True, "q_mode": "mxfp4"}, {"quantize": True, "q_mode": "mxfp4"}),
    "nvfp4": ({"quantize": True, "q_mode": "nvfp4"}, {"quantize": True, "q_mode": "nvfp4"}),
    "mxfp8": ({"quantize": True, "q_mode": "mxfp8"}, {"quantize": True, "q_mode": "mxfp8"}),
}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """The tiny random checkpoint in float32, its config with the values mlx-lm needs spelled out (it
    reads gemma4_unified with defaults of other Gemma 4 sizes; the converter writes them too)."""
    path = tiny_checkpoint(tmp_path_factory.mktemp("interop") / "source", seed=3, dtype="float32")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(with_peer_defaults(config, ModelConfig.from_dict(config))))
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """`folders(who, label)`: the source converted to format `label` by mlx-vlm or by us, made once."""
    made: dict[tuple[str, str], Path] = {}
    root = tmp_path_factory.mktemp("formats")

    def make(source: Path, who: str, label: str) -> Path:
        if (who, label) not in made:
            out = root / f"{who}-{label}"
            theirs, ours = FORMATS[label]
            if who == "mlx-vlm":
                vlm_convert(str(source), str(out), **{"q_group_size": None, "q_bits": None, **theirs})
            else:
                convert(source, out, **ours)
            made[who, label] = out
        return made[who, label]

    return make


def text_prompt(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input_ids": np.array([[2, *rng.integers(20, 600, 20)]])}


def media_inputs(seed: int = 0) -> dict[str, mx.array]:
    """One image of 7 patches (padded to 9) and one audio clip of 6 frames, as the processor gives them."""
    rng = np.random.default_rng(seed)
    positions = [[i % 3, i // 3] for i in range(7)] + [[-1, -1]] * 2
    return {
        "pixel_values": mx.array(rng.random((1, 9, 6912), dtype=np.float32)),
        "image_position_ids": mx.array(np.array([positions])),
        "input_features": mx.array((0.1 * rng.standard_normal((1, 6, 640))).astype(np.float32)),
        "input_features_mask": mx.ones((1, 6), dtype=mx.bool_),
    }


def assert_same_model(ours, theirs) -> None:
    """The same logits (to float32 rounding) and greedy tokens, and the same image and audio soft tokens.

    The soft tokens are compared as the projectors make them: placed into the text embeddings, mlx-vlm
    rounds them to those embeddings' dtype, which an MX/NV-quantized embedding makes bf16 even here."""
    prompt = text_prompt()
    got = np.array(ours(mx.array(prompt["input_ids"])).astype(mx.float32))
    expected = np.array(theirs(mx.array(prompt["input_ids"])).logits.astype(mx.float32))
    assert compare(got, expected)["relative_error"] < 1e-4
    assert our_greedy(ours, prompt, TOKENS) == vlm_greedy(theirs, prompt, TOKENS)
    media = media_inputs()
    pairs = [
        (
            ours.image_features(media["pixel_values"], media["image_position_ids"]),
            theirs.get_image_features(media["pixel_values"], media["image_position_ids"]),
        ),
        (
            ours.audio_features(media["input_features"], media["input_features_mask"]),
            theirs.get_audio_features(media["input_features"], media["input_features_mask"]),
        ),
    ]
    for mine, peer in pairs:
        mine, peer = np.array(mine.astype(mx.float32)), np.array(peer.astype(mx.float32))
        assert mine.shape == peer.shape and np.abs(mine - peer).max() <= 1e-4 * np.abs(peer).max()


def tensors(folder: Path) -> dict[str, mx.array]:
    weights = {}
    for shard in folder.glob("*.safetensors"):
        weights.update(mx.load(str(shard)))
    return weights


def assert_same_tensors(a: dict[str, mx.array], b: dict[str, mx.array]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert mx.array_equal(a[name], b[name]).item(), name


@pytest.mark.parametrize("label", list(FORMATS))
def test_ours_loads_every_format_mlx_vlm_writes(source, folders, label):
    folder = folders(source, "mlx-vlm", label)
    ours = load_model(folder, dtype="float32")
    theirs = vlm_model(folder)
    assert bits_by_module(ours) == bits_by_module(theirs)
    if label != "bf16":
        assert bits_by_module(ours)  # a quantized format: its modules are quantized here too
    assert_same_model(ours, theirs)


@pytest.mark.parametrize("label", list(FORMATS))
def test_the_same_flags_write_the_same_files_which_mlx_vlm_opens(source, folders, label):
    ours_folder, theirs_folder = folders(source, "ours", label), folders(source, "mlx-vlm", label)
    assert_same_tensors(tensors(ours_folder), tensors(theirs_folder))
    opened = vlm_model(ours_folder)  # mlx-vlm's loader reads our config's section
    assert bits_by_module(opened) == bits_by_module(vlm_model(theirs_folder))
    assert bits_by_module(opened) == bits_by_module(load_model(ours_folder, dtype="float32"))
    assert_same_model(load_model(ours_folder, dtype="float32"), opened)


def test_mixed_4_6_gives_mlx_vlms_bits(source, folders):
    """Its rule, module by module: vision in float; the embedding and the sensitive layers' v_proj and
    down_proj at 6 bits; everything else, the audio projector too, at 4; groups of 64."""
    bits = bits_by_module(load_model(folders(source, "ours", "mixed_4_6"), dtype="float32"))
    sensitive = {2, 5}  # of 6 layers: the last eighth (5), and every third after the first eighth (2, 5)
    for path, (b, group, mode) in bits.items():
        name = path.rsplit(".", 1)[-1]
        layer = int(path.split(".")[2]) if ".layers." in path else None
        high = name == "embed_tokens" or (name in ("v_proj", "down_proj") and layer in sensitive)
        assert (b, group, mode) == (6 if high else 4, 64, "affine"), path
    assert "embed_audio.embedding_projection" in bits
    assert not any(path.startswith(("vision_embedder", "embed_vision")) for path in bits)


@pytest.mark.parametrize("recipe", ["mixed_4_6_attn", "float_projectors"])
def test_our_own_recipes_open_in_mlx_vlm(source, tmp_path, recipe):
    out = convert(source, tmp_path / recipe, quantize=True, recipe=recipe)
    ours = load_model(out, dtype="float32")
    opened = vlm_model(out)
    assert bits_by_module(opened) == bits_by_module(ours)
    assert "embed_audio.embedding_projection" not in bits_by_module(ours)
    assert_same_model(ours, opened)


@pytest.mark.parametrize("who", ["ours", "mlx-vlm"])
def test_float32_through_either_converter_and_back_is_bit_identical(source, folders, tmp_path, who):
    out = tmp_path / "f32"
    if who == "mlx-vlm":
        vlm_convert(str(source), str(out), dtype="float32")
    else:
        convert(source, out)
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    back = convert(out, tmp_path / "back", dequantize=True, dtype="float32")
    assert_same_tensors(tensors(back), tensors(source))


def our_names(weights: dict[str, mx.array], dtype: mx.Dtype | None = None) -> dict[str, mx.array]:
    """`weights` under our names, floating ones cast to `dtype` when given."""
    cast = {k: v.astype(dtype) if dtype and mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    return {hf_to_mlx_name(k): v for k, v in cast.items()}


@pytest.mark.parametrize("label", ["4-bit", "mixed_4_6", "mxfp4"])
def test_dequantizing_an_mlx_vlm_folder_gives_exactly_its_weights(source, folders, tmp_path, label):
    """Every weight as mx.dequantize computes it from the stored one, as mlx-vlm's own --dequantize."""
    folder = folders(source, "mlx-vlm", label)
    ours = our_names(tensors(convert(folder, tmp_path / "ours", dequantize=True, dtype="float32")))
    vlm_convert(str(folder), str(tmp_path / "theirs"), dequantize=True)
    assert_same_tensors(ours, our_names(tensors(tmp_path / "theirs"), mx.float32))
    stored = our_names(tensors(folder))
    section = json.loads((folder / "config.json").read_text())["quantization"]
    path = "language_model.layers.2.mlp.down_proj"  # a sensitive layer: 6 bits in mixed_4_6
    params = {**section, **section.get("language_model.model.layers.2.mlp.down_proj", {})}
    expected = mx.dequantize(
        stored[f"{path}.weight"],
        stored[f"{path}.scales"],
        stored.get(f"{path}.biases"),
        group_size=params["group_size"],
        bits=params["bits"],
        mode=params["mode"],
        dtype=mx.float32,
    )
    assert mx.array_equal(ours[f"{path}.weight"], expected).item()


def test_reconverting_an_mlx_vlm_folder_equals_converting_the_source(source, folders, tmp_path):
    again = convert(folders(source, "mlx-vlm", "bf16"), tmp_path / "again", quantize=True)
    direct = convert(source, tmp_path / "direct", quantize=True, dtype="bfloat16")
    assert_same_tensors(tensors(again), tensors(direct))


# --- mlx-lm: text-only conversions of this model, and our conversions opened by its gemma4 model ----


@pytest.mark.parametrize("quantize", [False, True], ids=["bf16", "4-bit"])
def test_mlx_lm_text_only_conversions_load_as_text_models(source, tmp_path, quantize):
    out = tmp_path / "lm"
    lm_convert(str(source), str(out), quantize=quantize)
    theirs = in_float32(lm_load_model(out)[0])
    ours = load_model(out, dtype="float32")
    assert ours.config.vision is None and ours.config.audio is None
    assert bits_by_module(ours) == bits_by_module(theirs)
    prompt = text_prompt()
    assert our_greedy(ours, prompt, TOKENS) == lm_greedy(theirs, prompt["input_ids"], TOKENS)
    media = media_inputs()
    with pytest.raises(MediaError, match="text-only.*vision weights"):
        ours.embed(mx.array(prompt["input_ids"]), pixel_values=media["pixel_values"],
                   image_position_ids=media["image_position_ids"])  # fmt: skip
    with pytest.raises(MediaError, match="text-only.*audio weights"):
        ours.embed(mx.array(prompt["input_ids"]), input_features=media["input_features"])


@pytest.mark.parametrize("label", ["4-bit", "mixed_4_6"])
def test_mlx_lm_opens_our_conversions(source, folders, label):
    folder = folders(source, "ours", label)
    theirs = in_float32(lm_load_model(folder)[0])
    ours = load_model(folder, dtype="float32")
    text = {p: b for p, b in bits_by_module(ours).items() if p.startswith("language_model.")}
    assert bits_by_module(theirs) == text
    prompt = text_prompt()
    assert our_greedy(ours, prompt, TOKENS) == lm_greedy(theirs, prompt["input_ids"], TOKENS)


def test_the_command_line_refuses_an_image_for_a_text_only_checkpoint(source, tmp_path):
    out = tmp_path / "lm"
    lm_convert(str(source), str(out), quantize=True)
    image = write_image(tmp_path / "picture.png")
    run = subprocess.run(
        [sys.executable, str(REPO / "generate.py"), "--model", str(out), "--image", str(image), "--prompt", "What is it?"],
        capture_output=True, text=True, timeout=240, cwd=REPO,
    )  # fmt: skip
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("mlx-unified-generate: error: this checkpoint is text-only")
    text = subprocess.run(
        [sys.executable, str(REPO / "generate.py"), "--model", str(out), "--prompt", "Hello", "--max-tokens", "4"],
        capture_output=True, text=True, timeout=240, cwd=REPO,
    )  # fmt: skip
    assert text.returncode == 0 and text.stdout.strip(), text.stderr
