"""The one safetensors header check (`safetensors_format.read_header`): every damaged header the format's
reference reader refuses is refused, naming the file and the tensor, by it and so by the loader and
the converter, which use it; a checkpoint's index may not lead outside its folder."""

from __future__ import annotations

import json
import os
import shutil
import struct

import mlx.core as mx
import numpy as np
import pytest
from safetensors import SafetensorError, safe_open
from safetensors_edits import edit_header, join, split, tensor_names

from mlx_unified.checkpoint import ModelLoadError
from mlx_unified.convert import ConvertError, convert
from mlx_unified.loading import load_model
from mlx_unified.safetensors_format import SafetensorsError, read_array, read_header


@pytest.fixture
def sample(tmp_path):
    path = tmp_path / "sample.safetensors"
    mx.save_safetensors(
        str(path),
        {"a": mx.arange(6, dtype=mx.float32).reshape(2, 3), "b": mx.ones((4,), mx.bfloat16), "c": mx.array([7], mx.int32)},
        metadata={"format": "pt"},
    )
    return path


def reference_refuses(path) -> bool:
    """Whether the `safetensors` package (the format's reference reader) refuses the file."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            f.keys()
    except (SafetensorError, OSError, ValueError):
        return True
    return False


def first(header):
    return tensor_names(header)[0]


def second(header):
    return tensor_names(header)[1]


# Each edit damages the header one way; `reason` is what the refusal says.
EDITS = {
    "negative offset": (lambda h: h[first(h)].update(data_offsets=[-8, h[first(h)]["data_offsets"][1]]), "invalid data_offsets"),
    "overlapping offsets": (
        lambda h: h[second(h)].update(data_offsets=[h[second(h)]["data_offsets"][0] - 4, h[second(h)]["data_offsets"][1] - 4]),
        "overlaps the tensor before it",
    ),
    "gap between tensors": (
        lambda h: h[second(h)].update(data_offsets=[h[second(h)]["data_offsets"][0] + 2, h[second(h)]["data_offsets"][1] + 2]),
        "leaves a gap",
    ),
    "past the end of the file": (
        lambda h: [h[n].update(data_offsets=[o + 1000 for o in h[n]["data_offsets"]]) for n in tensor_names(h)],
        "leaves a gap",
    ),
    "wrong byte length for the shape": (lambda h: h[first(h)].update(shape=[3, 3]), "inconsistent offsets"),
    "wrong byte length for the dtype": (lambda h: h[first(h)].update(dtype="F16"), "inconsistent offsets"),
    "unknown dtype": (lambda h: h[first(h)].update(dtype="Q7"), "unknown dtype"),
    "shape of strings": (lambda h: h[first(h)].update(shape=["2", "3"]), "invalid shape"),
    "shape of booleans": (lambda h: h[first(h)].update(shape=[True, 3]), "invalid shape"),
    "offsets not a pair": (lambda h: h[first(h)].update(data_offsets=[0]), "invalid data_offsets"),
    "metadata not strings": (lambda h: h.update(__metadata__={"format": 3}), "__metadata__ must map strings"),
    "entry not an object": (lambda h: h.update({first(h): [1, 2]}), "corrupt header entry"),
}


@pytest.mark.parametrize("damage", list(EDITS), ids=list(EDITS))
def test_damaged_headers_are_refused_naming_the_file_and_tensor(sample, damage):
    edit, reason = EDITS[damage]
    header, _ = split(sample)
    names = tensor_names(header)
    edit_header(sample, edit)
    with pytest.raises(SafetensorsError, match=reason) as refused:
        read_header(sample)
    assert str(sample) in str(refused.value)
    assert damage == "metadata not strings" or any(name in str(refused.value) for name in names)
    assert reference_refuses(sample)  # the reference reader agrees it is damaged


def test_truncated_files_and_absurd_header_lengths_are_refused(sample):
    raw = sample.read_bytes()
    cases = {
        "no header": raw[:5],
        "header longer than the file": struct.pack("<Q", len(raw)) + raw[8:],
        "header of 2**60 bytes": struct.pack("<Q", 2**60) + raw[8:],
        "truncated data": raw[:-3],
        "bytes after the last tensor": raw + b"\0" * 8,
        "not JSON": join(b"{nope" + b" " * 40, split(sample)[1]),
        "a JSON list": join(b"[1, 2]", split(sample)[1]),
        "a tensor listed twice": join(
            b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}',
            b"\0" * 8,
        ),
    }
    for name, data in cases.items():
        sample.write_bytes(data)
        with pytest.raises(SafetensorsError, match=str(sample)):
            read_header(sample)
        assert reference_refuses(sample), name


def test_a_sound_file_reads_as_the_reference_reads_it(sample):
    tensors, metadata = read_header(sample)
    assert metadata == {"format": "pt"} and set(tensors) == {"a", "b", "c"}
    with safe_open(str(sample), framework="numpy") as f:
        np.testing.assert_array_equal(read_array(tensors["a"]), f.get_tensor("a"))
        np.testing.assert_array_equal(read_array(tensors["c"]), f.get_tensor("c"))
    assert read_array(tensors["b"]).tolist() == [0x3F80] * 4  # bfloat16 1.0, as raw bits


@pytest.fixture
def checkpoint(tiny, tmp_path):
    return shutil.copytree(tiny.path, tmp_path / "checkpoint")


def test_negative_offsets_are_refused_by_the_converter_and_the_loader(checkpoint, tmp_path):
    def point_norm_at_the_header(header):
        norm = header["model.language_model.norm.weight"]
        size = norm["data_offsets"][1] - norm["data_offsets"][0]
        norm["data_offsets"] = [-size, 0]

    edit_header(checkpoint / "model.safetensors", point_norm_at_the_header)
    with pytest.raises(ConvertError, match="model.language_model.norm.weight has invalid data_offsets"):
        convert(checkpoint, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ModelLoadError, match="model.language_model.norm.weight has invalid data_offsets"):
        load_model(checkpoint)


def test_overlapping_offsets_are_refused_by_the_converter_and_the_loader(checkpoint, tmp_path):
    def overlap(header):
        a, b = tensor_names(header)[:2]
        header[b]["data_offsets"] = header[a]["data_offsets"]
        header[b]["shape"], header[b]["dtype"] = header[a]["shape"], header[a]["dtype"]

    edit_header(checkpoint / "model.safetensors", overlap)
    with pytest.raises(ConvertError, match="overlaps the tensor before it"):
        convert(checkpoint, tmp_path / "out")
    with pytest.raises(ModelLoadError, match="overlaps the tensor before it"):
        load_model(checkpoint)


def _index(checkpoint, shard, shard_name):
    header, _ = split(shard)
    weight_map = dict.fromkeys((n for n in header if n != "__metadata__"), shard_name)
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("where", ["absolute path", "parent folder", "symbolic link out"])
def test_an_index_may_not_point_outside_the_checkpoint(checkpoint, tmp_path, where):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shard = shutil.move(checkpoint / "model.safetensors", outside / "model.safetensors")
    if where == "absolute path":
        _index(checkpoint, shard, str(shard))
    elif where == "parent folder":
        _index(checkpoint, shard, "../elsewhere/model.safetensors")
    else:
        (checkpoint / "model.safetensors").symlink_to(shard)
        _index(checkpoint, shard, "model.safetensors")
    with pytest.raises(ModelLoadError, match="outside the checkpoint folder|not a file name inside"):
        load_model(checkpoint)
    with pytest.raises(ConvertError, match="outside the checkpoint folder|not a file name inside"):
        convert(checkpoint, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_hub_snapshot_links_into_its_blobs_and_loads(tiny, tmp_path):
    repo = tmp_path / "models--owner--name"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True), snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted(tiny.path.iterdir())):
        blob = shutil.copy(file, blobs / f"{i:064x}")
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    model = load_model(snapshot, dtype="float32")
    ids = mx.array([[2, 30, 31, 32]])
    np.testing.assert_array_equal(np.array(model(ids)), np.array(tiny.model(ids)))
