"""Quantized KV caches (8- and 4-bit, mlx-lm's affine groups): what attention reads, how far the logits
move from the float cache's, when the cache switches, and the settings' refusals.

Two questions are kept apart:
- Does attention read the quantized cache right? A quantized cache must give what the float model gives
  when each cached key and value is rounded through `mx.quantize` and back: the same numbers, read
  through MLX's quantized products (or the kernels' references) instead of float ones. That is exact up
  to float32 summation order, so the bound is the one every float-path test uses.
- How much does the rounding itself move the logits? That depends on the model, not on the code; the
  bounds below are what it does to these random checkpoints, stated with why.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from logits_log import run_logged

import mlx_unified
from mlx_unified import attention as attention_module
from mlx_unified import cache as cache_module
from mlx_unified.cache import (
    KVCache,
    QuantizedKVCache,
    QuantizedSharedKVCache,
    QuantizedSlidingWindowCache,
    SharedKVCache,
    SlidingWindowCache,
    maybe_quantize,
    snapshot,
)
from mlx_unified.config import default_layer_types
from mlx_unified.emphasis import SpanBias
from mlx_unified.errors import InputError
from mlx_unified.generation import generate_step
from mlx_unified.generation_params import GenerationParams, ParameterError
from mlx_unified.kernels.attention_global import (
    causal_bias,
    quantized_global_kv_attention,
    quantized_global_kv_attention_reference,
)
from mlx_unified.kernels.attention_sliding import (
    quantized_sliding_window_attention,
    quantized_sliding_window_attention_reference,
)
from mlx_unified.kernels.quantized_attention import (
    MIN_KEY_BLOCK,
    DerivedKeys,
    QuantizedKeys,
    quantized_attention,
)
from mlx_unified.kernels.rope_tables import PROPORTIONAL_ROPE
from mlx_unified.kv_quantization import KVQuantization, KVQuantizationError, kv_quantization
from mlx_unified.model import Model
from mlx_unified.prefill import prefill, prefill_chunks
from mlx_unified.prefix_cache import PrefixCache, PrefixKeys, PrefixState, plan_prefix
from mlx_unified.testing.reference import VARIED_EMBED_STD, assert_varied, build_reference_model, text_prompt

RELATIVE_TOLERANCE = 1e-4  # float32 summation order, as in tests/test_model_reference.py
SIX_LAYERS = default_layer_types(6)
SHAPES = {
    # the released proportions: 5 sliding layers (GQA 2) then a global K=V layer of twice the head dim
    "kv_shared": dict(head_dim=64, global_head_dim=128, num_hidden_layers=6, layer_types=SIX_LAYERS),
    # global layers with their own v_proj keep mlx-lm's KVCache, quantized to its QuantizedKVCache
    "separate_kv": dict(
        head_dim=64, global_head_dim=128, num_hidden_layers=6, layer_types=SIX_LAYERS, attention_k_eq_v=False,
        num_attention_heads=8, num_key_value_heads=2,
    ),
}
WINDOW = 16  # every prompt below runs past it: the ring wraps


def relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def reference_built(path, shape: str, **overrides) -> Model:
    """Reference-built random weights; q_norm and k_norm scaled so that query-key scores have about
    unit variance, as attention scale 1.0 needs of trained norms (the raw random norms give scores of
    standard deviation sqrt(head_dim) = 8, an attention that is nearly one-hot)."""
    reference = build_reference_model(seed=5, sliding_window=WINDOW, **SHAPES[shape], **overrides)
    with torch.no_grad():
        for name, weight in reference.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                weight.mul_(weight.shape[0] ** -0.25)
    reference.save_pretrained(str(path))
    return mlx_unified.load_model(path, dtype="float32")


@pytest.fixture(scope="module", params=sorted(SHAPES))
def model(request, tmp_path_factory):
    return reference_built(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module", params=sorted(SHAPES))
def varied_model(request, tmp_path_factory):
    """The same, with small embeddings: its greedy tokens vary, so agreeing with them means something."""
    return reference_built(tmp_path_factory.mktemp(f"varied-{request.param}"), request.param, embed_std=VARIED_EMBED_STD)


def rounded_float_caches(monkeypatch, bits: int, group_size: int = 64) -> None:
    """Make the float caches store every key and value rounded through mx.quantize and back: the
    numbers a quantized cache holds, read by the float attention paths."""

    def rounded(x: mx.array) -> mx.array:
        return mx.dequantize(*mx.quantize(x, group_size=group_size, bits=bits), group_size=group_size, bits=bits)

    monkeypatch.setattr(SlidingWindowCache, "_stored", lambda self, x: rounded(x))
    monkeypatch.setattr(SharedKVCache, "_stored", lambda self, x: rounded(x))
    update = KVCache.update_and_fetch
    monkeypatch.setattr(KVCache, "update_and_fetch", lambda self, k, v: update(self, rounded(k), rounded(v)))


def run(model, ids: np.ndarray, prompt: int, kv: KVQuantization | None, chunk: int = 8) -> np.ndarray:
    """Logits of every position: the first `prompt` tokens in passes of `chunk` that end at the
    switch (what `prefill` does, keeping every position's logits), the rest one by one."""
    cache = model.make_cache()
    logits = []
    passes = prefill_chunks(None, prompt, chunk, 0, () if kv is None else (kv.start,))
    steps = passes + [(i, i + 1) for i in range(prompt, ids.shape[1])]
    for begin, end in steps:
        maybe_quantize(cache, kv)
        logits.append(np.array(model(mx.array(ids[:, begin:end]), cache=cache)))
    return np.concatenate(logits, axis=1)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("in_place", [True, False], ids=["in-place", "prefill-path"])
def test_quantized_cache_gives_what_float_attention_gives_over_the_rounded_cache(model, bits, in_place, monkeypatch):
    """Chunked prefill (quantized products by query blocks, derived keys on K=V layers), then decoding
    past the window: through the decode paths (kernels' fallback: MLX's quantized products) or through
    the prefill path (CUDA's), each position as the float model over the rounded cache."""
    monkeypatch.setattr(attention_module, "decode_in_place", lambda: in_place)
    ids = text_prompt(np.random.default_rng(1), 44)["input_ids"]
    quantized = run(model, ids, 30, KVQuantization(bits, 64, start=0))
    rounded_float_caches(monkeypatch, bits)
    expected = run(model, ids, 30, None)
    assert relative_error(quantized, expected) < RELATIVE_TOLERANCE


def _quantized_cache(model, bits: int) -> list:
    cache = model.make_cache()
    maybe_quantize(cache, KVQuantization(bits, 64, start=0))
    return cache


def test_every_layer_kind_has_its_quantized_cache(model):
    kinds = {type(c) for c in _quantized_cache(model, 8)}
    assert QuantizedSlidingWindowCache in kinds
    assert (QuantizedSharedKVCache if model.config.text.attention_k_eq_v else QuantizedKVCache) in kinds


# Measured on these checkpoints (44 positions, both shapes): max error / max |logit| 0.010 to 0.015 at
# 8 bits, 0.15 to 0.19 at 4 bits. Why so much: these decoders have random weights, so nothing in them
# is redundant, and each layer's post-attention norm rescales its attention output (an average of many
# values, small) back to unit size, magnifying a perturbation of the values with it. The rounding acts
# as noise would: Gaussian noise of the rounding's RMS added to the float cache moves the logits about
# as much (the last test below). The bounds leave 2x that margin; 4-bit rounding steps are 17x the
# 8-bit ones (15 levels against 255), and the errors scale with them.
LOGIT_BOUND = {8: 0.03, 4: 0.4}


@pytest.mark.parametrize("bits", [8, 4])
def test_logits_stay_within_the_stated_bound_of_float_kv_logits(model, bits):
    ids = text_prompt(np.random.default_rng(2), 44)["input_ids"]
    float_kv = run(model, ids, 30, None)
    quantized = run(model, ids, 30, KVQuantization(bits, 64, start=0))
    assert relative_error(quantized, float_kv) < LOGIT_BOUND[bits]
    assert relative_error(quantized, float_kv) > 1e-4  # the cache really was quantized


def greedy(model, ids: np.ndarray, steps: int, **kv) -> tuple[list[int], list[float]]:
    """Greedy tokens, and each step's margin between the top two logits as a fraction of the logits'
    range (the spread of the step's log-probabilities)."""
    tokens, margins = [], []
    for token, logprobs in generate_step(model, {"input_ids": ids}, max_tokens=steps, prefill_chunk_size=8, **kv):
        ordered = np.sort(np.array(logprobs))
        tokens.append(token)
        margins.append(float((ordered[-1] - ordered[-2]) / (ordered[-1] - ordered[0])))
    return tokens, margins


# A near tie: a float top-2 margin below this fraction of the logits' range, where the 8-bit cache's
# rounding may pick the other token, as any perturbation of its size would.
NEAR_TIE = 0.01


def test_greedy_tokens_agree_with_float_kv_at_8_bits(varied_model):
    """Greedy decoding through `generate_step` with an 8-bit cache, 16 tokens from three prompts of a
    model whose greedy tokens vary: the float cache's tokens up to the first near tie (at least 16
    compared). A 4-bit cache moves the logits by a tenth of their range (`LOGIT_BOUND`), more than
    most margins of such a model: its greedy tokens are bounded through the logits test above."""
    compared, references = 0, []
    for seed in (3, 4, 5):
        ids = text_prompt(np.random.default_rng(seed), 24)["input_ids"]
        expected, margins = greedy(varied_model, ids, 16)
        references += expected
        tokens, _ = greedy(varied_model, ids, 16, kv_bits=8, quantized_kv_start=0)
        clear = next((i for i, m in enumerate(margins) if m < NEAR_TIE), len(margins))
        assert tokens[:clear] == expected[:clear]
        compared += clear
    assert_varied(references)
    assert compared >= 16


@pytest.mark.parametrize("bits", [8, 4])
def test_rounding_moves_the_logits_as_noise_of_its_size_does(model, bits, monkeypatch):
    """The why of the bounds: the same float caches, once with each value rounded, once with Gaussian
    noise of the rounding's RMS added instead. The logit errors agree within 2x either way."""
    ids = text_prompt(np.random.default_rng(4), 44)["input_ids"]
    float_kv = run(model, ids, 30, None)
    quantized = run(model, ids, 30, KVQuantization(bits, 64, start=0))
    mx.random.seed(0)

    def noisy(x: mx.array) -> mx.array:
        error = mx.dequantize(*mx.quantize(x, group_size=64, bits=bits), group_size=64, bits=bits) - x
        return x + mx.sqrt(mx.mean(error * error)) * mx.random.normal(x.shape)

    monkeypatch.setattr(SlidingWindowCache, "_stored", lambda self, x: noisy(x))
    monkeypatch.setattr(SharedKVCache, "_stored", lambda self, x: noisy(x))
    update = KVCache.update_and_fetch
    monkeypatch.setattr(KVCache, "update_and_fetch", lambda self, k, v: update(self, noisy(k), noisy(v)))
    noise = run(model, ids, 30, None)
    ratio = relative_error(quantized, float_kv) / relative_error(noise, float_kv)
    assert 0.5 < ratio < 2


# Passes cut elsewhere compute keys and values in other float32 summation orders: a value within that
# rounding of a level boundary lands on the neighbouring level, one step (at 8 bits, 1/255 of its
# group's range) in one element. Such flips move the logits by a small share of what the rounding as a
# whole does (measured: 4e-4 of the logit range, against 0.015).
CHUNKING_BOUND = 3e-3


def test_the_switch_is_a_position_whatever_the_chunks(model):
    """quantized_kv_start=13: positions before it see the float cache, later ones the quantized one,
    whether prefill passes end at 5, 7 or 64 tokens (each ends at 13 too) or the switch comes while
    decoding; before the switch nothing differs from a float cache."""
    ids = text_prompt(np.random.default_rng(5), 40)["input_ids"]
    kv = KVQuantization(8, 64, start=13)
    runs = [run(model, ids, prompt, kv, chunk) for prompt, chunk in ((30, 5), (30, 7), (30, 64), (10, 4))]
    for other in runs[1:]:
        assert relative_error(other, runs[0]) < CHUNKING_BOUND
        assert np.array_equal(other.argmax(-1), runs[0].argmax(-1))
    float_kv = run(model, ids, 30, None, 13)
    assert np.array_equal(runs[2][:, :13], float_kv[:, :13])  # the same first pass [0, 13), no switch yet
    assert relative_error(runs[0][:, 13:], float_kv[:, 13:]) > 1e-4
    assert relative_error(runs[0], float_kv) < LOGIT_BOUND[8]


def test_prefill_switches_where_its_passes_end(model):
    """`prefill` itself: the same passes, the same switch, the same last logits as the loop above."""
    ids = text_prompt(np.random.default_rng(5), 30)["input_ids"]
    kv = KVQuantization(8, 64, start=13)
    cache = model.make_cache()
    last = np.array(prefill(model, {"input_ids": ids}, cache, 5, kv_quantization=kv))
    assert np.array_equal(last, run(model, ids, 30, kv, 5)[:, -1:])
    assert all(c.quantization is not None for c in cache)
    short = model.make_cache()
    prefill(model, {"input_ids": ids[:, :13]}, short, 5, kv_quantization=kv)
    assert not any(c.quantization is not None for c in short)  # 13 positions: still float


def test_snapshots_of_quantized_caches_restore_exactly(model):
    """Rolling back: a snapshot taken mid-decode, restored, decodes exactly as the live cache did."""
    ids = text_prompt(np.random.default_rng(6), 36)["input_ids"]
    cache = model.make_cache()
    kv = KVQuantization(4, 32, start=0)
    prefill(model, {"input_ids": ids[:, :20]}, cache, 8, kv_quantization=kv)
    kept = snapshot(cache)
    live = [np.array(model(mx.array(ids[:, i : i + 1]), cache=cache)) for i in range(20, 36)]
    restored = snapshot(kept)
    again = [np.array(model(mx.array(ids[:, i : i + 1]), cache=restored)) for i in range(20, 36)]
    assert all(np.array_equal(a, b) for a, b in zip(live, again, strict=True))
    assert kept[0].offset == 20 and restored[0].offset == 36


def test_quantized_ring_holds_the_float_ring_rounded():
    """Slot for slot, across wrap-around and multi-token writes, what a float ring holds, quantized."""
    float_ring, ring = SlidingWindowCache(8), QuantizedSlidingWindowCache(8, group_size=32, bits=8)
    for length in (5, 13, 1, 1, 30, 1, 3):
        x = mx.random.normal((1, 2, length, 64))
        seen, seen_q = float_ring.update_and_fetch(x, -x), ring.update_and_fetch(x, -x)
        assert seen[2] == seen_q[2]
        assert mx.array_equal(mx.dequantize(*seen_q[0], group_size=32, bits=8),
                              mx.dequantize(*mx.quantize(seen[0], group_size=32, bits=8), group_size=32, bits=8))
    keys, values, offset, window, group_size, bits = ring.state
    assert (offset, window, group_size, bits) == (54, 8, 32, 8) and keys[0].shape == (1, 2, 8, 16)
    restored = QuantizedSlidingWindowCache.from_state(ring.state)
    assert restored.offset == 54 and all(mx.array_equal(a, b) for a, b in zip(restored.keys, ring.keys, strict=True))


def test_quantized_caches_take_what_the_bits_say():
    shared, quantized8, quantized4 = SharedKVCache(), QuantizedSharedKVCache(64, 8), QuantizedSharedKVCache(64, 4)
    x = mx.ones((1, 1, 1024, 512), dtype=mx.bfloat16)
    for c in (shared, quantized8, quantized4):
        c.update_and_fetch(x)
    # per element: bits / 8 bytes, plus a bf16 scale and bias per group of 64
    assert quantized8.nbytes == 1024 * 512 * (1 + 4 / 64) and quantized4.nbytes == 1024 * 512 * (0.5 + 4 / 64)
    assert shared.nbytes == 1024 * 512 * 2


def test_converting_keeps_what_was_cached():
    ring = SlidingWindowCache(8)
    x = mx.random.normal((1, 2, 11, 64))
    ring.update_and_fetch(x, x)
    quantized = ring.to_quantized(group_size=64, bits=4)
    assert quantized.offset == 11 and quantized.to_quantized(64, 4) is quantized
    assert mx.array_equal(quantized.keys[0], mx.quantize(ring.keys, group_size=64, bits=4)[0])
    empty = SharedKVCache().to_quantized(32, 8)
    assert empty.values is None and empty.offset == 0 and (empty.group_size, empty.bits) == (32, 8)
    with pytest.raises(KVQuantizationError, match="already quantized to 4 bits"):
        quantized.to_quantized(64, 8)


def test_settings_are_checked():
    assert kv_quantization(None) is None
    assert kv_quantization(8) == KVQuantization(8, 64, 5000)  # mlx-lm's defaults
    for (bits, group_size, start), message in (
        ((3, 64, 0), "kv_bits: must be one of 4, 8, got 3"),
        ((8.0, 64, 0), "kv_bits: must be one of 4, 8, got 8.0"),
        ((8, 48, 0), "kv_group_size: must be one of 32, 64, 128, got 48"),
        ((8, 64, -1), "quantized_kv_start: must be >= 0, got -1"),
    ):
        with pytest.raises(ParameterError, match=message):
            KVQuantization(bits, group_size, start)
        with pytest.raises(ParameterError, match=message):  # the one validation every surface runs
            GenerationParams(kv_bits=bits, kv_group_size=group_size, quantized_kv_start=start).validate()
    with pytest.raises(KVQuantizationError, match="does not divide this model's head dim 16") as refused:
        KVQuantization(8, 32).check([16, 32])
    assert refused.value.param == "kv_group_size"
    assert issubclass(KVQuantizationError, ParameterError) and issubclass(ParameterError, InputError)
    assert GenerationParams(kv_bits=8, max_kv_size=1024).validate().kv_bits == 8  # a cap, not a rotation


def test_generate_step_refuses_settings_the_model_cannot_take(tiny):
    """The default tiny checkpoint's heads are 16 and 32 wide: no group size fits them."""
    with pytest.raises(KVQuantizationError, match="head dim 16"):
        next(generate_step(tiny.model, {"input_ids": np.array([[2, 5, 6]])}, kv_bits=8))


def test_the_cache_module_names_each_kind():
    assert set(cache_module.LAYER_CACHES) >= {"QuantizedSlidingWindowCache", "QuantizedSharedKVCache",
                                              "QuantizedKVCache"}


# -- the prefix cache with quantized KV ---------------------------------------------------------------

LONG_SYSTEM = "You are a careful voice assistant. Answer briefly and never invent facts. " * 3


@pytest.fixture(scope="module")
def chat(tiny_factory):
    """A tiny checkpoint whose heads (64, global 128) take groups of 64, with its processor."""
    return tiny_factory(seed=3, sliding_window=WINDOW, head_dim=64, global_head_dim=128)


def messages(question: str) -> list[dict]:
    return [{"role": "system", "content": LONG_SYSTEM}, {"role": "user", "content": question}]


def system_end(processor, prompt) -> int:
    ids = processor(prompt)["input_ids"][0]
    turn = processor.tokenizer.convert_tokens_to_ids("<|turn>")
    return int(np.nonzero(ids == turn)[0][-2])  # the last user turn starts at the last-but-one marker


def reply(chat, prompt, **kwargs):
    return run_logged(chat.model, chat.processor, prompt, 8, **kwargs)


@pytest.mark.parametrize("bits", [8, 4])
def test_a_restored_quantized_prefix_gives_the_no_cache_output(chat, bits, tmp_path):
    """The system prompt's quantized KV, from memory and from disk in a fresh store, then the rest of
    the prompt: bit for bit what a run without the prefix cache gives with the same settings and the
    same passes (each ends at the system prompt's end), and within the chunking bound of one cut
    elsewhere, with the same tokens."""
    first, second = messages("What time is it?"), messages("Tell me a joke.")
    boundary = system_end(chat.processor, second)
    kv = dict(kv_bits=bits, quantized_kv_start=8)
    writer = PrefixCache.for_checkpoint(chat.path, folder=tmp_path)
    reply(chat, first, prefix_cache=writer, **kv)
    warm, warm_logits = reply(chat, second, prefix_cache=writer, **kv)
    from_disk, disk_logits = reply(chat, second, prefix_cache=PrefixCache.for_checkpoint(chat.path, folder=tmp_path),
                                   **kv)
    plain, plain_logits = reply(chat, second, use_prefix_cache=False, prefill_chunk_size=boundary, **kv)
    elsewhere, elsewhere_logits = reply(chat, second, use_prefix_cache=False, **kv)
    assert warm.cached_tokens == from_disk.cached_tokens == boundary
    assert warm.tokens == from_disk.tokens == plain.tokens == elsewhere.tokens
    assert all(np.array_equal(a, b) for a, b in zip(warm_logits, plain_logits, strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(disk_logits, plain_logits, strict=True))
    assert relative_error(np.stack(elsewhere_logits), np.stack(plain_logits)) < CHUNKING_BOUND


def test_quantized_prefix_files_are_smaller(chat, tmp_path):
    sizes = {}
    for bits in (None, 8, 4):
        folder = tmp_path / str(bits)
        reply(chat, messages("Hello."), prefix_cache=PrefixCache.for_checkpoint(chat.path, folder=folder),
              kv_bits=bits, quantized_kv_start=0)
        (file,) = folder.glob("*.safetensors")
        sizes[bits] = file.stat().st_size
    # float32 test weights: 4 bytes an element, against about 1 (8-bit) and 0.5 (4-bit) with scales
    assert sizes[4] < sizes[8] < 0.4 * sizes[None]


def test_a_prefix_is_reused_only_with_the_settings_it_was_computed_with(chat):
    """Past quantized_kv_start a prefix depends on the KV settings; before it, it is the float cache's
    state, shared by every setting whose switch comes later."""
    prompt = messages("Tell me a joke.")
    boundary = system_end(chat.processor, prompt)
    store = PrefixCache()
    reply(chat, messages("What time is it?"), prefix_cache=store, kv_bits=8, quantized_kv_start=0)
    for other in (dict(kv_bits=4, quantized_kv_start=0), dict(kv_bits=8, kv_group_size=32, quantized_kv_start=0),
                  dict(kv_bits=8, quantized_kv_start=5), {}):
        assert reply(chat, prompt, prefix_cache=store, **other)[0].cached_tokens == 0
    assert reply(chat, prompt, prefix_cache=store, kv_bits=8, quantized_kv_start=0)[0].cached_tokens == boundary
    shared = PrefixCache()
    reply(chat, messages("What time is it?"), prefix_cache=shared)  # float KV
    late_switch = dict(kv_bits=4, quantized_kv_start=boundary)
    warm, warm_logits = reply(chat, prompt, prefix_cache=shared, **late_switch)
    plain, plain_logits = reply(chat, prompt, use_prefix_cache=False, prefill_chunk_size=boundary, **late_switch)
    assert warm.cached_tokens == boundary and warm.tokens == plain.tokens
    assert all(np.array_equal(a, b) for a, b in zip(warm_logits, plain_logits, strict=True))


def test_a_prefix_of_other_bits_under_the_name_is_not_restored(chat):
    """The layers record their bits and group size: one quantized otherwise is never restored, even
    under the name these settings look up."""
    model, processor = chat.model, chat.processor
    prompt = messages("Tell me a joke.")
    ids = processor(prompt)["input_ids"]
    boundary = system_end(processor, prompt)
    kv8 = KVQuantization(8, 64, start=0)
    embeddings = model.embed_inputs(mx.array(ids), {})
    store = PrefixCache()
    planned = plan_prefix(model, processor.tokenizer, store, ids, embeddings, None, kv8)
    cache = model.make_cache()
    prefill(model, {"input_ids": ids[:, :boundary]}, cache, kv_quantization=KVQuantization(4, 64, start=0))
    name = PrefixKeys(ids[0], model=f"model-object-{id(model)}", kv_quantization=kv8).name(boundary)
    store.store(PrefixState(name, ids[0, :boundary].astype(np.int32), snapshot(cache)))
    assert planned.reused == 0 and store.lookup(PrefixKeys(ids[0], model=f"model-object-{id(model)}",
                                                           kv_quantization=kv8)) is not None
    assert plan_prefix(model, processor.tokenizer, store, ids, embeddings, None, kv8).reused == 0


def test_key_blocks_merge_to_what_one_block_gives():
    """Attention a key block at a time (a tight score bound: blocks of MIN_KEY_BLOCK keys, the last one
    partial, one fully masked for some queries) merged by the running soft-max equals one block."""
    mx.random.seed(7)
    length = 3 * MIN_KEY_BLOCK + 100
    values = tuple(mx.quantize(mx.random.normal((1, 1, length, 256)), group_size=64, bits=8))
    weight = 1 + 0.2 * mx.random.normal((256,))
    queries = mx.random.normal((1, 4, 3, 256)) * 256**-0.5
    mask = causal_bias(length, 3, SpanBias(10, 900, 0.5))
    window = mx.where(mx.arange(length) >= length - 200, 0.0, -mx.inf)  # only the last block is visible
    for keys, m in ((DerivedKeys(values, weight, 0, PROPORTIONAL_ROPE, 64, 8), mask),
                    (QuantizedKeys(values, 64, 8), mask + window)):
        whole = quantized_attention(queries, keys, values, m, score_bytes=1 << 40)
        blocked = quantized_attention(queries, keys, values, m, score_bytes=1)
        assert relative_error(np.array(blocked), np.array(whole)) < 1e-5


def test_prefill_within_a_tiny_score_bound_equals_a_roomy_one(model):
    """The model's quantized prefill with every attention block as small as it goes (query blocks of
    MIN_QUERY_BLOCK, key blocks of MIN_KEY_BLOCK) against one block each."""
    ids = mx.array(text_prompt(np.random.default_rng(8), 40)["input_ids"])
    outputs = []
    for score_bytes in (1, 1 << 40):
        cache = _quantized_cache(model, 8)
        outputs.append(np.array(model.forward_embeddings(model.embed_text(ids), cache=cache, score_bytes=score_bytes)))
    assert relative_error(outputs[0], outputs[1]) < 1e-5


def test_off_metal_the_quantized_decode_attention_equals_the_kernels_references():
    """What decoding runs without Metal (MLX's quantized products over the packed cache) against the
    references the kernels are proven against: the global K=V layer with a span bias and three
    queries, and a ring larger than its window, wrapped."""
    mx.random.seed(9)
    queries = mx.random.normal((1, 16, 3, 512)) * 512**-0.5
    values = tuple(mx.quantize(mx.random.normal((1, 1, 160, 512)), group_size=64, bits=4))
    weight = 1 + 0.2 * mx.random.normal((512,))
    options = dict(group_size=64, bits=4, span_bias=SpanBias(20, 60, 1.5))
    got = quantized_global_kv_attention(queries, values, weight, 150, **options)
    expected = quantized_global_kv_attention_reference(queries, values, weight, 150, **options)
    assert relative_error(np.array(got), np.array(expected)) < RELATIVE_TOLERANCE
    queries = mx.random.normal((1, 4, 2, 128)) * 128**-0.5
    keys, values = (tuple(mx.quantize(mx.random.normal((1, 1, 96, 128)), group_size=32, bits=8)) for _ in range(2))
    got = quantized_sliding_window_attention(queries, keys, values, 150, 40, group_size=32, bits=8)
    expected = quantized_sliding_window_attention_reference(queries, keys, values, 150, 40, group_size=32, bits=8)
    assert relative_error(np.array(got), np.array(expected)) < RELATIVE_TOLERANCE
