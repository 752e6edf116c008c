"""The prefix cache: exact reuse in memory and across a disk round trip, LRU bound, file checks."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from logits_log import run_logged
from mlx.utils import tree_flatten

from mlx_unified import prefix_cache as prefix_cache_module
from mlx_unified.budgets import prefix_cache_bytes
from mlx_unified.cache import snapshot
from mlx_unified.checkpoint import model_identity
from mlx_unified.emphasis import SpanBias
from mlx_unified.generation import generate
from mlx_unified.model import Model
from mlx_unified.prefill import prefill_chunks
from mlx_unified.prefix_cache import (
    DiskPrefixStore,
    PrefixCache,
    PrefixCacheError,
    PrefixKeys,
    PrefixState,
    default_prefix_cache,
    load_prefix,
    save_prefix,
)

WINDOW = 16
LONG_SYSTEM = "You are a careful voice assistant. Answer briefly and never invent facts. " * 3
SHORT_SYSTEM = "Be kind."
pytestmark = pytest.mark.tiny(seed=3, sliding_window=WINDOW)


def messages(system: str, question: str) -> list[dict]:
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


def run(model, processor, prompt, **kwargs):
    return run_logged(model, processor, prompt, 8, **kwargs)


def arrays(layers) -> list[mx.array]:
    """Every array the layer caches hold (their `state`'s arrays)."""
    return [a for layer in layers for a in layer.state if isinstance(a, mx.array)]


def system_end(processor, prompt) -> int:
    ids = processor(prompt)["input_ids"][0]
    turn = processor.tokenizer.convert_tokens_to_ids("<|turn>")
    return int(np.nonzero(ids == turn)[0][-2])  # the last user turn starts at the last-but-one marker


@pytest.mark.parametrize(
    "system", [LONG_SYSTEM, SHORT_SYSTEM], ids=["prefix-beyond-window", "prefix-inside-window"]
)
def test_second_request_reuses_the_system_prefix_and_matches_no_cache(tiny, system):
    model, processor = tiny.model, tiny.processor
    first, second = messages(system, "What time is it?"), messages(system, "Tell me a joke.")
    boundary = system_end(processor, second)
    assert (boundary > WINDOW) == (system is LONG_SYSTEM)
    store = PrefixCache()
    cold, _ = run(model, processor, first, prefix_cache=store)
    assert cold.cached_tokens == 0 and len(store) == 2  # system prefix and whole prompt
    warm, warm_logits = run(model, processor, second, prefix_cache=store)
    plain, plain_logits = run(model, processor, second, use_prefix_cache=False)
    assert warm.cached_tokens == boundary
    assert warm.tokens == plain.tokens
    for a, b in zip(warm_logits, plain_logits, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_reuse_is_bit_exact_against_the_same_chunking(tiny):
    model, processor = tiny.model, tiny.processor
    prompt = messages(LONG_SYSTEM, "Tell me a joke.")
    store = PrefixCache()
    cold, cold_logits = run(model, processor, prompt, prefix_cache=store)
    store._entries.pop(next(reversed(store._entries)))  # drop the whole-prompt snapshot, keep the system one
    warm, warm_logits = run(model, processor, prompt, prefix_cache=store)
    assert warm.cached_tokens == system_end(processor, prompt)
    assert cold.tokens == warm.tokens
    assert all(np.array_equal(a, b) for a, b in zip(cold_logits, warm_logits, strict=True))


def test_next_chat_turn_reuses_the_whole_previous_prompt(tiny):
    model, processor = tiny.model, tiny.processor
    store = PrefixCache()
    first = processor(messages(LONG_SYSTEM, "Hello there."))["input_ids"]
    extended = np.concatenate(
        [first, np.array(processor.tokenizer.encode("Hi!<turn|>\n", add_special_tokens=False))[None]], 1
    )
    generate(model, processor, {"input_ids": first}, max_tokens=2, prefix_cache=store)
    again, logits = run(model, processor, {"input_ids": extended}, prefix_cache=store)
    plain, plain_logits = run(model, processor, {"input_ids": extended}, use_prefix_cache=False)
    assert again.cached_tokens == first.shape[1]
    assert again.tokens == plain.tokens
    np.testing.assert_allclose(logits[0], plain_logits[0], atol=1e-4)


def test_disk_round_trip_gives_identical_output(tiny, tmp_path):
    path, model, processor = tiny.path, tiny.model, tiny.processor
    prompt = messages(LONG_SYSTEM, "Tell me a joke.")
    writer = PrefixCache.for_checkpoint(path, folder=tmp_path)
    run(model, processor, messages(LONG_SYSTEM, "What time is it?"), prefix_cache=writer)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1 and not list(tmp_path.glob(".partial-*"))
    reader = PrefixCache.for_checkpoint(path, folder=tmp_path)  # a fresh process: empty memory
    warm, warm_logits = run(model, processor, prompt, prefix_cache=reader)
    plain, plain_logits = run(model, processor, prompt, use_prefix_cache=False)
    assert warm.cached_tokens == system_end(processor, prompt)
    assert warm.tokens == plain.tokens
    np.testing.assert_allclose(warm_logits[0], plain_logits[0], atol=1e-4)


def test_restored_cache_is_independent_of_the_stored_snapshot(tiny):
    model = tiny.model
    cache = model.make_cache()
    ids = mx.array(np.arange(3, 3 + 2 * WINDOW)[None])
    model(ids, cache=cache)
    layers = snapshot(cache)
    before = [np.array(a) for a in arrays(layers)]
    model(mx.array([[5, 6]]), cache=cache)  # the live cache moves on
    restored = snapshot(layers)
    model(mx.array([[7, 8, 9]]), cache=restored)  # so does a restored one
    after = [np.array(a) for a in arrays(layers)]
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    assert restored[0].offset == 2 * WINDOW + 3 and restored[0].keys is not layers[0].keys


def _state(model, length: int, name: str) -> PrefixState:
    cache = model.make_cache()
    model(mx.array(np.arange(3, 3 + length)[None]), cache=cache)
    return PrefixState(name, np.arange(3, 3 + length, dtype=np.int32), snapshot(cache))


def test_memory_store_is_bounded_in_bytes_least_recently_used_out(tiny):
    model = tiny.model
    a, b, c = (_state(model, 10, n) for n in "abc")
    keys = PrefixKeys(np.arange(3, 20), model="m")
    a.name = keys.name(10)
    store = PrefixCache(max_bytes=2 * a.nbytes)
    store.store(a)
    store.store(b)
    assert store.lookup(keys) is a  # a is now the most recently used
    store.store(c)
    assert len(store) == 2 and store.nbytes <= store.max_bytes
    assert "b" not in store._entries and a.name in store._entries


def test_longest_stored_prefix_shorter_than_the_prompt_wins(tiny):
    model = tiny.model
    keys = PrefixKeys(np.arange(3, 23), model="m")
    store = PrefixCache()
    for length in (5, 12, 20):
        store.store(_state(model, length, keys.name(length)))
    assert store.lookup(keys).length == 12  # 20 is the whole prompt: nothing would be left to run
    other = PrefixKeys(np.concatenate([np.arange(3, 10), [99], np.arange(11, 23)]), model="m")
    assert store.lookup(other).length == 5


def test_prefix_names_depend_on_media_embeddings_and_the_bias_after_its_start():
    ids = np.arange(20)
    rows = np.ones((4, 8), np.float32)
    base = PrefixKeys(ids, model="m", media_positions=np.arange(10, 14), media_rows=rows)
    other_audio = PrefixKeys(ids, model="m", media_positions=np.arange(10, 14), media_rows=rows * 2)
    assert base.name(10) == other_audio.name(10) and base.name(12) != other_audio.name(12)
    biased = PrefixKeys(
        ids, model="m", media_positions=np.arange(10, 14), media_rows=rows, key_bias=SpanBias(10, 14, 0.7)
    )
    assert biased.name(10) == base.name(10) and biased.name(11) != base.name(11)
    assert PrefixKeys(ids, model="other").name(5) != PrefixKeys(ids, model="m").name(5)


def test_saved_prefix_is_checked_on_load(tiny, tmp_path):
    path, model = tiny.path, tiny.model
    identity = model_identity(path)
    state = _state(model, 12, "n")
    file = save_prefix(tmp_path / "p.safetensors", state, identity)
    loaded = load_prefix(file, identity, np.arange(3, 30))
    assert loaded.length == 12 and loaded.name == "n"
    assert all(
        np.array_equal(np.array(x), np.array(y))
        for x, y in zip(arrays(state.layers), arrays(loaded.layers), strict=True)
    )
    assert [(type(c), c.offset) for c in loaded.layers] == [(type(c), c.offset) for c in state.layers]
    with pytest.raises(PrefixCacheError, match="another model"):
        load_prefix(file, "not-this-model")
    with pytest.raises(PrefixCacheError, match="not a prefix"):
        load_prefix(file, identity, np.arange(4, 30))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(file.read_bytes()[:100])
    with pytest.raises(PrefixCacheError, match="unreadable"):
        load_prefix(broken, identity)
    earlier = tmp_path / "version-1.safetensors"  # the format before caches were stored by their state
    mx.save_safetensors(str(earlier), {"token_ids": mx.arange(12)}, metadata={"format_version": "1"})
    version = prefix_cache_module.FORMAT_VERSION
    with pytest.raises(PrefixCacheError, match=f"format '1', this version reads '{version}'"):
        load_prefix(earlier, identity)


def test_disk_store_caps_its_size_oldest_first(tiny, tmp_path):
    path, model = tiny.path, tiny.model
    states = [_state(model, 8, f"s{i}") for i in range(3)]
    store = DiskPrefixStore(tmp_path, model_identity(path), max_bytes=1)
    store.max_bytes = 2 * states[0].nbytes + 4096  # room for two files with their headers
    for i, state in enumerate(states):
        store.put(state)
        os.utime(store.path(state.name), (1000 + i, 1000 + i))
    store._evict()
    assert store.get("s0", states[0].token_ids) is None
    assert store.get("s2", states[2].token_ids).name == "s2"
    assert sum(p.stat().st_size for p in tmp_path.glob("*.safetensors")) <= store.max_bytes


def test_damaged_cache_file_is_removed_not_used(tiny, tmp_path):
    path, model = tiny.path, tiny.model
    store = DiskPrefixStore(tmp_path, model_identity(path))
    state = _state(model, 8, "s")
    store.put(state)
    store.path("s").write_bytes(b"not safetensors")
    assert store.get("s", state.token_ids) is None and not store.path("s").exists()


def test_prefill_chunks_end_at_snapshot_boundaries():
    assert prefill_chunks(None, 10, 4, boundaries=(6,)) == [(0, 4), (4, 6), (6, 10)]
    assert prefill_chunks(None, 10, 4, start=6) == [(6, 10)]
    types = np.array([[0, 0, 1, 1, 1, 0, 0, 0]])
    assert prefill_chunks(types, 8, 8, boundaries=(3,)) == [(0, 8)]  # never inside an image block


def test_default_store_is_sized_for_the_model(tiny):
    model = tiny.model
    store = default_prefix_cache(model)
    assert store is default_prefix_cache(model)  # one store per model
    assert store.max_bytes == prefix_cache_bytes(model.nbytes)
    assert model.nbytes == sum(w.nbytes for _, w in tree_flatten(model.parameters())) > 0


def test_a_default_store_lives_as_long_as_its_model(tiny):
    other = Model(tiny.model.config)  # another model object: a store of its own, not an attribute of it
    assert default_prefix_cache(other) is not default_prefix_cache(tiny.model)
    assert "prefix" not in " ".join(vars(other))
    key = id(other)
    del other
    gc.collect()
    assert key not in prefix_cache_module._DEFAULT_CACHES


def test_bad_bounds_are_refused():
    with pytest.raises(ValueError, match="positive"):
        PrefixCache(max_bytes=0)
    with pytest.raises(ValueError, match="positive"):
        DiskPrefixStore("/tmp/x", "id", max_bytes=-1)


# ---------------------------------------------------------------- identity, integrity, unusable folders


def warm_then_ask(checkpoint, folder, **overrides):
    """Fill `folder` with `checkpoint`'s system prefix, then ask a new question through a fresh cache
    there (a new process's view); returns (that answer, the same question without any cache)."""
    model, processor = checkpoint.model, checkpoint.processor
    run(model, processor, messages(LONG_SYSTEM, "What time is it?"), prefix_cache=PrefixCache.for_checkpoint(checkpoint.path, folder=folder))
    return ask(checkpoint, folder, **overrides)


def ask(checkpoint, folder, model=None):
    model = model or checkpoint.model
    prompt = messages(LONG_SYSTEM, "Tell me a joke.")
    cached = run(model, checkpoint.processor, prompt, prefix_cache=PrefixCache.for_checkpoint(checkpoint.path, folder=folder))
    plain = run(model, checkpoint.processor, prompt, use_prefix_cache=False)
    return cached, plain


def stored_files(folder):
    return sorted(folder.glob("*.safetensors"))


def test_checkpoints_alike_in_config_and_file_sizes_never_share_prefixes(tiny_factory, tmp_path):
    a, b = tiny_factory(seed=3, sliding_window=WINDOW), tiny_factory(seed=4, sliding_window=WINDOW)
    assert (a.path / "config.json").read_bytes() == (b.path / "config.json").read_bytes()
    assert (a.path / "model.safetensors").stat().st_size == (b.path / "model.safetensors").stat().st_size
    run(a.model, a.processor, messages(LONG_SYSTEM, "What time is it?"), prefix_cache=PrefixCache.for_checkpoint(a.path, folder=tmp_path))
    (cached, cached_logits), (plain, plain_logits) = ask(b, tmp_path)
    assert cached.cached_tokens == 0  # A's state is not B's
    assert cached.tokens == plain.tokens
    np.testing.assert_allclose(cached_logits[0], plain_logits[0], atol=1e-4)


def test_weights_overwritten_in_place_invalidate_their_prefixes(tiny_factory, tmp_path):
    import shutil

    from conftest import TinyCheckpoint

    original, other = tiny_factory(seed=3, sliding_window=WINDOW), tiny_factory(seed=4, sliding_window=WINDOW)
    copy = TinyCheckpoint(Path(shutil.copytree(original.path, tmp_path / "checkpoint")))
    folder = tmp_path / "cache"
    (reused, _), _ = warm_then_ask(copy, folder)
    assert reused.cached_tokens > 0
    weights = copy.path / "model.safetensors"
    before = weights.stat()
    with open(weights, "r+b") as f:  # same file, same size, same modification time: new content
        f.write((other.path / "model.safetensors").read_bytes())
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (weights.stat().st_ino, weights.stat().st_size) == (before.st_ino, before.st_size)
    changed = TinyCheckpoint(copy.path)
    (cached, _), (plain, _) = ask(changed, folder)
    assert cached.cached_tokens == 0 and cached.tokens == plain.tokens


def test_the_weights_are_hashed_once_and_again_when_they_change(tiny, tmp_path, monkeypatch):
    from mlx_unified import checkpoint as checkpoint_module

    hashed = []
    content_hash = checkpoint_module._content_hash
    monkeypatch.setattr(checkpoint_module, "_content_hash", lambda f, first_sight: hashed.append(f) or content_hash(f, first_sight))
    records = tmp_path / "identities"
    first = model_identity(tiny.path, records)
    assert model_identity(tiny.path, records) == first and len(hashed) == 1  # the record stood in
    os.utime(tiny.path / "model.safetensors")  # touched: hashed again, same content, same identity
    assert model_identity(tiny.path, records) == first and len(hashed) == 2
    assert model_identity(tiny.path) == first and len(hashed) == 3  # without records: every time


def test_a_hub_snapshot_is_identified_by_its_blob_names_until_a_blob_changes(tiny, tmp_path):
    import hashlib

    repo = tmp_path / "models--owner--name"
    blobs, snapshot_folder = repo / "blobs", repo / "snapshots" / "abc123"
    blobs.mkdir(parents=True), snapshot_folder.mkdir(parents=True)
    for file in tiny.path.iterdir():
        data = file.read_bytes()
        blob = blobs / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot_folder / file.name).symlink_to(os.path.relpath(blob, snapshot_folder))
    records = tmp_path / "identities"
    assert model_identity(snapshot_folder, records) == model_identity(tiny.path)
    blob = (snapshot_folder / "model.safetensors").resolve()
    with open(blob, "r+b") as f:  # a damaged blob: its name no longer stands for its content
        f.seek(-4, os.SEEK_END)
        f.write(b"\x00\x01\x02\x03")
    assert model_identity(snapshot_folder, records) != model_identity(tiny.path)


def _damage_first_layer_array(file, write):
    from mlx_unified.safetensors_format import read_header

    tensors, _ = read_header(file)
    info = tensors["layer.0.0"]
    with open(file, "r+b") as f:
        f.seek(info.begin)
        f.write(write(info.end - info.begin))


def test_values_written_into_a_stored_snapshot_are_detected_and_the_file_removed(tiny, tmp_path, caplog):
    folder = tmp_path / "cache"
    run(tiny.model, tiny.processor, messages(LONG_SYSTEM, "What time is it?"), prefix_cache=PrefixCache.for_checkpoint(tiny.path, folder=folder))
    (file,) = stored_files(folder)
    _damage_first_layer_array(file, lambda n: np.random.default_rng(0).bytes(n))  # metadata kept
    with caplog.at_level("WARNING", logger="mlx_unified.prefix_cache"):
        (cached, _), (plain, _) = ask(tiny, folder)
    assert cached.cached_tokens == 0 and cached.tokens == plain.tokens
    assert "do not match their checksum" in caplog.text and "removed it" in caplog.text
    assert stored_files(folder) == [file]  # removed, and written again by this run
    (again, _), _ = ask(tiny, folder)
    assert again.cached_tokens > 0 and again.tokens == plain.tokens


def test_a_stored_snapshot_of_the_wrong_shape_is_refused_and_removed(tiny, tmp_path, caplog):
    folder = tmp_path / "cache"
    run(tiny.model, tiny.processor, messages(LONG_SYSTEM, "What time is it?"), prefix_cache=PrefixCache.for_checkpoint(tiny.path, folder=folder))
    (file,) = stored_files(folder)
    identity = model_identity(tiny.path)
    state = load_prefix(file, identity)
    first = state.layers[0]
    keys, values, offset, window = first.state
    state.layers[0] = type(first).from_state((keys[:, :1], values[:, :1], offset, window))  # one KV head fewer
    save_prefix(file, state, identity)  # a well-formed file, checksum and all, of the wrong shape
    with caplog.at_level("WARNING", logger="mlx_unified.prefix_cache"):
        (cached, _), (plain, _) = ask(tiny, folder)
    assert "does not fit this model's caches (layer 0 holds an array (1, 1," in caplog.text
    assert cached.cached_tokens == 0 and cached.tokens == plain.tokens
    (again, _), _ = ask(tiny, folder)  # the later run is not hurt: the file was replaced by a good one
    assert again.cached_tokens > 0 and again.tokens == plain.tokens


def test_a_snapshot_computed_in_another_dtype_is_not_reused(tiny, tmp_path):
    from mlx_unified.loading import load_model

    folder = tmp_path / "cache"
    run(tiny.model, tiny.processor, messages(LONG_SYSTEM, "What time is it?"), prefix_cache=PrefixCache.for_checkpoint(tiny.path, folder=folder))
    bf16 = load_model(tiny.path)  # the float32 run's files hold float32 states
    prompt = messages(LONG_SYSTEM, "Tell me a joke.")
    cached = generate(bf16, tiny.processor, prompt, max_tokens=8, prefix_cache=PrefixCache.for_checkpoint(tiny.path, folder=folder))
    plain = generate(bf16, tiny.processor, prompt, max_tokens=8, use_prefix_cache=False)
    assert cached.cached_tokens == 0 and cached.tokens == plain.tokens


def _unusable_folder(kind, tmp_path, monkeypatch):
    """A cache folder that cannot be used: a file in its place, one that refuses new files
    (read-only), or one whose disk fills up while a snapshot is written."""
    import errno

    from mlx_unified import safetensors_format

    folder = tmp_path / "cache"
    if kind == "a file":
        folder.write_text("not a folder")
    elif kind == "read-only":
        folder.mkdir()

        def refuse(*args, **kwargs):
            raise OSError(errno.EROFS, "Read-only file system")

        monkeypatch.setattr(prefix_cache_module.tempfile, "mkstemp", refuse)
    else:
        real_write = safetensors_format.ShardWriter.write

        def fill_up(self, name, offset, data):
            if name.startswith("layer.2"):
                raise OSError(errno.ENOSPC, "No space left on device")
            real_write(self, name, offset, data)

        monkeypatch.setattr(safetensors_format.ShardWriter, "write", fill_up)
    return folder


@pytest.mark.parametrize("kind", ["a file", "read-only", "full disk"])
def test_an_unusable_cache_folder_means_no_cache_and_one_warning(tiny, tmp_path, monkeypatch, caplog, kind):
    folder = _unusable_folder(kind, tmp_path, monkeypatch)
    model, processor = tiny.model, tiny.processor
    with caplog.at_level("WARNING", logger="mlx_unified.prefix_cache"):
        store = PrefixCache.for_checkpoint(tiny.path, folder=folder)
        answers = [run(model, processor, messages(LONG_SYSTEM, q), prefix_cache=store) for q in ("Hi.", "Tell me a joke.")]
        plain = run(model, processor, messages(LONG_SYSTEM, "Tell me a joke."), use_prefix_cache=False)
    warnings = [r for r in caplog.records if "is unusable" in r.getMessage()]
    assert len(warnings) == 1, caplog.text
    assert str(folder) in warnings[0].getMessage()
    assert answers[1][0].tokens == plain[0].tokens
    assert answers[1][0].cached_tokens > 0  # the memory part still serves the system prefix
    if folder.is_dir():
        assert not list(folder.rglob("*.safetensors"))  # no snapshot, and nothing half-written, left
