"""The converter: round trips through load_model, recipes, the config section, dequantization, refusals."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx_lm.utils import load_model as mlx_lm_load_model
from peers import bits_by_module
from transformers import Gemma4UnifiedForConditionalGeneration

from mlx_unified.checkpoint import peer_name
from mlx_unified.convert import ConvertError, convert, main
from mlx_unified.convert import conversion as convert_module
from mlx_unified.convert.recipes import RECIPES, QuantizationError
from mlx_unified.loading import load_model
from mlx_unified.safetensors_format import ShardWriter
from mlx_unified.testing.reference import (
    RELATIVE_TOLERANCE,
    build_reference_checkpoint,
    compare,
    image_audio_prompt,
    logits,
    reference_logits,
    text_prompt,
)
from mlx_unified.testing.tokenizer import write_tokenizer

# An MLP width that groups of 64 divide, so the default settings quantize every Linear.
SHAPES = dict(intermediate_size=128)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("reference")
    build_reference_checkpoint(path, seed=5, **SHAPES)
    write_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def float_logits(source) -> list[np.ndarray]:
    model = load_model(source, dtype="float32")
    return [logits(model, prompt) for prompt in _prompts()]


def _prompts() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [text_prompt(rng), image_audio_prompt(rng)]


def _quality(folder: Path, float_logits: list[np.ndarray]) -> dict[str, float]:
    model = load_model(folder, dtype="float32")
    ours = np.concatenate([logits(model, p).reshape(-1, 512) for p in _prompts()])
    return compare(ours, np.concatenate([r.reshape(-1, 512) for r in float_logits]))


@pytest.fixture(scope="module")
def eight_bit(source, tmp_path_factory) -> Path:
    return convert(source, tmp_path_factory.mktemp("q") / "8bit", quantize=True, q_bits=8)


# Random reference models amplify weight noise through their layers (an 8-bit weight error of ~0.2%
# ends as a few percent of the logits), so closeness to float is bounded loosely; the exact check is
# against the same weights dequantized, which is what the quantized model must compute.


def test_8bit_round_trip_is_close_to_float(eight_bit, float_logits):
    quality = _quality(eight_bit, float_logits)
    assert quality["mean_relative_error"] < 0.08
    assert quality["top1_agreement"] >= 0.8


def test_4bit_round_trip_is_close_to_float(source, eight_bit, float_logits, tmp_path):
    out = convert(source, tmp_path / "4bit", quantize=True)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 64
    quality = _quality(out, float_logits)
    assert quality["mean_relative_error"] < 0.8
    assert quality["top1_agreement"] >= 0.4
    assert quality["mean_abs_error"] > _quality(eight_bit, float_logits)["mean_abs_error"]


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_model_computes_its_dequantized_weights(source, tmp_path, bits):
    quantized = convert(source, tmp_path / "q", quantize=True, q_bits=bits)
    restored = convert(quantized, tmp_path / "f32", dequantize=True, dtype="float32")
    expected = [logits(load_model(restored, dtype="float32"), p) for p in _prompts()]
    assert _quality(quantized, expected)["relative_error"] < 1e-4


def test_unquantized_conversion_is_exact(source, float_logits, tmp_path):
    out = convert(source, tmp_path / "f32", dtype="float32")
    assert "quantization" not in json.loads((out / "config.json").read_text())
    assert _quality(out, float_logits)["max_abs_error"] < 1e-4


def test_output_layout_and_copied_files(eight_bit, source):
    index = json.loads((eight_bit / "model.safetensors.index.json").read_text())
    names = set(index["weight_map"])
    # mlx-vlm's and mlx-lm's names: their text model wraps the decoder in a `model`.
    assert "language_model.model.embed_tokens.scales" in names and "lm_head.weight" not in names
    assert not any(n.startswith("model.") or n.startswith("language_model.layers.") for n in names)
    assert "language_model.model.layers.2.self_attn.v_proj.weight" not in names  # K=V global layer
    data = sum(f.stat().st_size for f in eight_bit.glob("*.safetensors"))
    assert 0 < data - index["metadata"]["total_size"] < 1 << 16  # the file is the data plus a header
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "processor_config.json",
        "generation_config.json",
    ):
        assert (eight_bit / name).read_bytes() == (source / name).read_bytes()
    assert not list(eight_bit.parent.glob(".*partial*"))


def _conversions() -> list[tuple[str, dict]]:
    cases = [(f"recipe-{name}", {"recipe": name, "quantize": True}) for name in RECIPES]
    cases += [
        (f"mode-{mode}", {"quantize": True, "q_mode": mode}) for mode in ("mxfp4", "nvfp4", "mxfp8")
    ]
    return cases


@pytest.mark.parametrize("label,kwargs", _conversions(), ids=[c[0] for c in _conversions()])
def test_every_recipe_and_mode_loads(source, float_logits, tmp_path, label, kwargs):
    out = convert(source, tmp_path / label, **kwargs)
    section = json.loads((out / "config.json").read_text())["quantization"]
    quality = _quality(out, float_logits)
    assert np.isfinite(quality["max_abs_error"])
    assert quality["top1_agreement"] >= 0.6
    assert section["vision_embedder.patch_dense"] is False  # as mlx-vlm, every recipe keeps vision float
    if kwargs.get("recipe", "uniform").startswith("mixed"):
        assert section["language_model.model.embed_tokens"]["bits"] > section["bits"]
    if kwargs.get("recipe", "").endswith("_attn"):
        assert section["embed_audio.embedding_projection"] is False  # ours keep every projector float
        assert section["language_model.model.layers.0.self_attn.o_proj"]["bits"] > section["bits"]


def test_section_is_what_mlx_lm_expects(source, tmp_path):
    out = convert(source, tmp_path / "mixed", recipe="mixed_4_6_attn")
    config = json.loads((out / "config.json").read_text())
    section = config["quantization"]
    assert config["quantization_config"] == section
    assert {section["bits"], section["group_size"], section["mode"]} == {4, 64, "affine"}
    ours = load_model(out, dtype="float32")
    modules = {peer_name(path) for path, _ in ours.named_modules()}
    for key, value in section.items():
        if key not in ("bits", "group_size", "mode"):
            assert key in modules and (value is False or set(value) == {"bits", "group_size", "mode"})
    # mlx-lm's own loader and its gemma4 model (text only) read the section and the weights.
    theirs, _ = mlx_lm_load_model(out)
    assert bits_by_module(theirs) == {
        path: bits for path, bits in bits_by_module(ours).items() if path.startswith("language_model.")
    }
    assert theirs.language_model.model.layers[0].self_attn.o_proj.bits == 6
    assert theirs.language_model.model.layers[1].mlp.gate_proj.bits == 4
    prompt = text_prompt(np.random.default_rng(3))
    expected = logits(ours, prompt)
    got = np.array(theirs(mx.array(prompt["input_ids"])).astype(mx.float32))
    assert compare(got, expected)["relative_error"] < 1e-4


def test_dequantize_restores_the_released_layout_for_transformers(source, eight_bit, tmp_path):
    out = convert(eight_bit, tmp_path / "bf16", dequantize=True)
    config = json.loads((out / "config.json").read_text())
    assert "quantization" not in config and config["dtype"] == "bfloat16"
    names = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"])
    assert names == set(mx.load(str(source / "model.safetensors"))) - {"lm_head.weight"}
    reference = Gemma4UnifiedForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    prompt = text_prompt(np.random.default_rng(2))
    ours = logits(load_model(out, dtype="float32"), prompt)
    # Both read the same bf16 weights into float32: the port's tolerance, as for any checkpoint.
    assert compare(ours, reference_logits(reference, prompt))["relative_error"] < RELATIVE_TOLERANCE


# --- refusals: a one-line message, exit code 2 (130 when interrupted), and nothing at DST ---------------


def _refused(capsys, argv: list[str], code: int = 2) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def _copy(source: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(source, tmp_path / "src"))


def test_refuses_missing_source(capsys, tmp_path):
    assert "no such folder" in _refused(
        capsys, ["--hf-path", str(tmp_path / "nope" / "x" / "y"), "--mlx-path", str(tmp_path / "o")]
    )
    assert not (tmp_path / "o").exists()


def test_refuses_unreachable_hub_id(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _refused(capsys, ["--hf-path", "no-such-org/no-such-model", "--mlx-path", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_refuses_folder_without_config(capsys, source, tmp_path):
    src = _copy(source, tmp_path)
    (src / "config.json").unlink()
    assert "no config.json" in _refused(capsys, ["--hf-path", str(src), "--mlx-path", str(tmp_path / "o")])


def test_refuses_partial_checkpoint(capsys, source, tmp_path):
    src = _copy(source, tmp_path)
    weights = mx.load(str(src / "model.safetensors"))
    del weights["model.language_model.layers.3.mlp.down_proj.weight"]
    mx.save_safetensors(str(src / "model.safetensors"), weights)
    err = _refused(capsys, ["--hf-path", str(src), "--mlx-path", str(tmp_path / "o")])
    assert "missing" in err and "down_proj" in err
    assert not (tmp_path / "o").exists()


def test_refuses_missing_shard(capsys, source, tmp_path):
    src = _copy(source, tmp_path)
    index = {"weight_map": {"model.language_model.norm.weight": "model-00002-of-00002.safetensors"}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "missing" in _refused(capsys, ["--hf-path", str(src), "--mlx-path", str(tmp_path / "o")])


def test_refuses_truncated_shard(capsys, source, tmp_path):
    src = _copy(source, tmp_path)
    shard = src / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    assert "truncated" in _refused(capsys, ["--hf-path", str(src), "--mlx-path", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "edit,message",
    [
        ({"model_type": "gemma3"}, "model_type"),
        ({"architectures": ["Gemma4UnifiedForCausalLM"]}, "architecture"),
    ],
)
def test_refuses_unsupported_model(capsys, source, tmp_path, edit, message):
    src = _copy(source, tmp_path)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, **edit}))
    assert message in _refused(capsys, ["--hf-path", str(src), "--mlx-path", str(tmp_path / "o")])


def test_refuses_existing_destination_without_overwrite(capsys, source, tmp_path):
    dst = tmp_path / "o"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert "--overwrite" in _refused(capsys, ["--hf-path", str(source), "--mlx-path", str(dst)])
    assert (dst / "keep.txt").read_text() == "mine"
    assert main(["--hf-path", str(source), "--mlx-path", str(dst), "--overwrite"]) == 0
    assert not (dst / "keep.txt").exists() and (dst / "config.json").exists()


def test_refuses_when_disk_is_too_small(capsys, source, tmp_path, monkeypatch):
    monkeypatch.setattr(
        convert_module.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**6, 10**6, 1000)
    )
    assert "free" in _refused(capsys, ["--hf-path", str(source), "--mlx-path", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_disk_full_mid_write_leaves_nothing(capsys, source, tmp_path, monkeypatch):
    original = ShardWriter.write
    calls = []

    def write(self, name, offset, data):
        calls.append(name)
        if len(calls) > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        original(self, name, offset, data)

    monkeypatch.setattr(ShardWriter, "write", write)
    assert "disk full" in _refused(
        capsys, ["--hf-path", str(source), "--mlx-path", str(tmp_path / "o"), "-q"]
    )
    assert list(tmp_path.iterdir()) == []


def test_interrupted_run_leaves_nothing(capsys, source, tmp_path, monkeypatch):
    original = convert_module._convert_job
    calls = []

    def interrupt_on_third(job, writer, dtype):
        calls.append(job)
        if len(calls) == 3:
            raise KeyboardInterrupt
        original(job, writer, dtype)

    monkeypatch.setattr(convert_module, "_convert_job", interrupt_on_third)
    assert "interrupted" in _refused(
        capsys, ["--hf-path", str(source), "--mlx-path", str(tmp_path / "o")], code=130
    )
    assert list(tmp_path.iterdir()) == []


def test_refuses_quantizing_twice_and_dequantizing_float(capsys, source, eight_bit, tmp_path):
    assert "already quantized" in _refused(
        capsys, ["--hf-path", str(eight_bit), "--mlx-path", str(tmp_path / "a"), "-q"]
    )
    assert "not a quantized" in _refused(
        capsys, ["--hf-path", str(source), "--mlx-path", str(tmp_path / "b"), "--dequantize"]
    )


@pytest.mark.parametrize(
    "flags,message",
    [
        (["-q", "--q-mode", "mxfp4", "--q-bits", "8"], "bits"),
        (["-q", "--q-group-size", "16"], "group size"),
        (["--recipe", "mixed_4_6", "--q-bits", "4"], "own bits"),
        (["--recipe", "mixed_4_6", "--q-mode", "mxfp4"], "affine"),
        (["--recipe", "mixed_4_6", "--q-group-size", "32"], "groups of 64, as mlx-vlm's"),
    ],
)
def test_refuses_bad_quantization_settings(capsys, source, tmp_path, flags, message):
    assert message in _refused(capsys, ["--hf-path", str(source), "--mlx-path", str(tmp_path / "o"), *flags])
    assert not (tmp_path / "o").exists()


def test_the_converter_says_what_it_quantized(capsys, source, tmp_path):
    assert main(["--hf-path", str(source), "--mlx-path", str(tmp_path / "q"), "--recipe", "mixed_4_6"]) == 0
    report, wrote = capsys.readouterr().out.strip().splitlines()
    # 4 layers x 6 matrices + embedding + embed_audio + 2 float vision projectors (K=V globals: no v_proj)
    assert report.startswith("quantized 28 of 30 weight matrices: ") and "at 6 bits (group 64)" in report
    assert "kept in float: 2 by the recipe" in report and "bits per weight" in report
    assert wrote == f"wrote {tmp_path / 'q'}"


def test_refuses_quantization_that_would_quantize_nothing(capsys, tmp_path):
    """A hidden size of 96: no matrix input width but the MLP's and the audio frames' is a multiple of 64;
    with those kept float too (float_projectors, MLP width 96), -q would quantize nothing."""
    source = tmp_path / "narrow"
    build_reference_checkpoint(source, seed=1, hidden_size=96, intermediate_size=96, head_dim=24, global_head_dim=24)
    write_tokenizer(source)
    capsys.readouterr()  # transformers' progress bar while saving
    err = _refused(capsys, ["--hf-path", str(source), "--mlx-path", str(tmp_path / "o"), "-q", "--recipe", "float_projectors"])
    assert "-q would quantize nothing" in err and "groups of 64" in err and "--q-group-size 32" in err
    assert not (tmp_path / "o").exists()
    # Plain -q quantizes the one module that fits, and says how few that is.
    assert main(["--hf-path", str(source), "--mlx-path", str(tmp_path / "p"), "-q"]) == 0
    report = capsys.readouterr().out.splitlines()[0]
    assert report.startswith("quantized 1 of ") and "whose input width is not a multiple of the group size" in report


def test_api_errors_are_typed(source, tmp_path):
    with pytest.raises(ConvertError):
        convert(tmp_path / "missing", tmp_path / "o")
    with pytest.raises(QuantizationError):
        convert(source, tmp_path / "o", quantize=True, q_bits=7)


# --- the source is never deleted or written, the output never half-written ------------------------------


def _digest(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


OUTPUTS_OVER_THE_SOURCE = {
    "the source": lambda src, tmp: src,
    "a folder inside it": lambda src, tmp: src / "out",
    "its parent": lambda src, tmp: src.parent,
    "its parent, spelled with ..": lambda src, tmp: src / "..",
    "the source, spelled with ..": lambda src, tmp: tmp / "elsewhere" / ".." / src.name,
    "a link to the source": lambda src, tmp: _link(tmp / "link", src),
    "a link to its parent": lambda src, tmp: _link(tmp / "link", src.parent),
}


def _link(link: Path, target: Path) -> Path:
    link.symlink_to(target, target_is_directory=True)
    return link


@pytest.mark.parametrize("output", list(OUTPUTS_OVER_THE_SOURCE), ids=list(OUTPUTS_OVER_THE_SOURCE))
def test_overwrite_never_deletes_or_writes_inside_the_source(capsys, source, tmp_path, output):
    work = tmp_path / "work"
    work.mkdir()
    src = _copy(source, work)
    (work / "elsewhere").mkdir()
    (work / "notes.txt").write_text("mine")
    before = _digest(work)
    destination = OUTPUTS_OVER_THE_SOURCE[output](src, work)
    err = _refused(capsys, ["--hf-path", str(src), "--mlx-path", str(destination), "--overwrite"])
    assert "source checkpoint" in err
    assert _digest(work) == before and sorted(p.name for p in work.iterdir()) == sorted(
        ["src", "elsewhere", "notes.txt", *(["link"] if "link" in output else [])]
    )


def test_a_hub_snapshot_s_blobs_count_as_its_source(capsys, source, tmp_path):
    repo = tmp_path / "models--owner--name"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True), snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted(source.iterdir())):
        blob = shutil.copy(file, blobs / f"{i:064x}")
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob.name))
    before = _digest(repo)
    for destination in (blobs, repo):
        assert "source checkpoint" in _refused(
            capsys, ["--hf-path", str(snapshot), "--mlx-path", str(destination), "--overwrite"]
        )
    assert _digest(repo) == before


def test_a_read_only_output_folder_is_one_line_and_nothing_is_written(source, tmp_path):
    import subprocess
    import sys

    from unprivileged import unprivileged

    parent = tmp_path / "read-only"
    parent.mkdir(mode=0o555)
    code = f"import sys; from mlx_unified.convert import main; sys.exit(main(['--hf-path', {str(source)!r}, '--mlx-path', {str(parent / 'out')!r}]))"
    result = subprocess.run([*unprivileged(), sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "Permission denied" in result.stderr and "needs" not in result.stderr
    assert list(parent.iterdir()) == []


@pytest.mark.parametrize(
    "failure,message",
    [(errno.ENOSPC, "disk full, quota reached or no free inodes"), (errno.EROFS, "Read-only file system")],
)
def test_a_failure_to_write_config_json_is_one_line_and_nothing_is_written(capsys, source, tmp_path, monkeypatch, failure, message):
    real_write_text = Path.write_text

    def write_text(self, *args, **kwargs):
        if self.name == "config.json":
            raise OSError(failure, os.strerror(failure), str(self))
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    err = _refused(capsys, ["--hf-path", str(source), "--mlx-path", str(tmp_path / "o")])
    assert message in err and "nothing was written" in err
    assert list(tmp_path.iterdir()) == []


def test_free_space_is_measured_against_what_is_written(capsys, source, tmp_path, monkeypatch):
    output_bytes = sum(f.stat().st_size for f in source.iterdir())
    small = shutil._ntuple_diskusage(10**9, 10**9 - 3 * output_bytes, 3 * output_bytes)
    monkeypatch.setattr(convert_module.shutil, "disk_usage", lambda _: small)
    assert main(["--hf-path", str(source), "--mlx-path", str(tmp_path / "fits")]) == 0  # a small disk that holds it
    capsys.readouterr()
    tiny_disk = shutil._ntuple_diskusage(10**6, 10**6 - 1000, 1000)
    monkeypatch.setattr(convert_module.shutil, "disk_usage", lambda _: tiny_disk)
    err = _refused(capsys, ["--hf-path", str(source), "--mlx-path", str(tmp_path / "o")])
    assert re.search(r"the output needs \d+\.\d\d (KB|MB), 1\.00 KB free", err), err
    assert "0.00 GB" not in err


def test_a_killed_conversion_s_staging_is_removed_by_the_next_run_in_that_folder(source, tmp_path):
    import signal
    import subprocess
    import sys

    parent = tmp_path / "models"
    code = f"""
import os, signal
from mlx_unified.convert import conversion
calls = []
real = conversion._convert_job
def killed_on_the_third(job, writer, dtype):
    calls.append(job)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    real(job, writer, dtype)
conversion._convert_job = killed_on_the_third
conversion.convert({str(source)!r}, {str(parent / "first")!r})
"""
    killed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (left,) = parent.iterdir()
    assert left.name.startswith(".first.partial-") and any(left.iterdir())
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        host = convert_module._host()
        running = parent / f".busy.partial-{host}-{live.pid}-0123abcd"  # a live run's folder
        other_host = parent / ".busy.partial-another_host-1-0123abcd"  # another machine's: never judged here
        running.mkdir(), other_host.mkdir()
        convert(source, parent / "second")  # another output, same folder
        assert sorted(p.name for p in parent.iterdir()) == sorted([running.name, other_host.name, "second"])
    finally:
        live.kill()
        live.wait()


def test_nan_weights_are_refused_by_the_converter_naming_the_tensor(capsys, source, tmp_path):
    src = _copy(source, tmp_path)
    weights = dict(mx.load(str(src / "model.safetensors")))
    name = "model.language_model.layers.1.self_attn.o_proj.weight"
    weights[name] = mx.where(mx.arange(weights[name].size).reshape(weights[name].shape) == 7, float("inf"), weights[name])
    mx.save_safetensors(str(src / "model.safetensors"), weights)
    err = _refused(capsys, ["--hf-path", str(src), "--mlx-path", str(tmp_path / "o"), "-q"])
    assert f"tensor {name} holds NaN or infinite values" in err and str(src / "model.safetensors") in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
