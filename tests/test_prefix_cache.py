"""The prefix cache: exact reuse in memory and across a disk round trip, LRU bound, file checks."""

from __future__ import annotations

import gc
import os

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
