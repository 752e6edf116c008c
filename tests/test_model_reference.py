"""Our port against the reference implementation (transformers' gemma4_unified), in float32."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import mlx_unified
from mlx_unified import attention as attention_module
from mlx_unified.emphasis import SpanBias
from mlx_unified.prefill import prefill
from mlx_unified.testing.reference import (
    PROMPTS,
    RELATIVE_TOLERANCE,
    SHAPES,
    VARIED_EMBED_STD,
    assert_varied,
    build_reference_checkpoint,
    image_audio_prompt,
    image_prompt,
    reference_greedy,
    reference_logits,
    relative_error,
    text_prompt,
)


@pytest.fixture(scope="module", params=sorted(SHAPES))
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    ref = build_reference_checkpoint(path, seed=3, **SHAPES[request.param])
    return ref, mlx_unified.load_model(path, dtype="float32")


def ours(model, inputs, **kwargs):
    arrays = {k: mx.array(v) for k, v in inputs.items()}
    return np.array(model(arrays.pop("input_ids"), **arrays, **kwargs))


@pytest.mark.parametrize("kind", sorted(PROMPTS))
def test_logits_match_reference(pair, kind):
    ref, model = pair
    inputs = PROMPTS[kind](np.random.default_rng(7))
    expected = reference_logits(ref, inputs)
    got = ours(model, inputs)
    assert got.shape == expected.shape
    assert relative_error(got, expected) < RELATIVE_TOLERANCE


def test_image_block_is_bidirectional(pair):
    """Without mm_token_type_ids the image is causal: the overlay must change the logits."""
    ref, model = pair
    inputs = image_prompt(np.random.default_rng(8))
    causal = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
    assert relative_error(ours(model, causal), reference_logits(ref, causal)) < RELATIVE_TOLERANCE
    assert np.abs(ours(model, causal) - ours(model, inputs)).max() > 1e-2


def test_logits_to_keep(pair):
    _, model = pair
    inputs = text_prompt(np.random.default_rng(9), 15)
    full = ours(model, inputs)
    assert np.array_equal(ours(model, inputs, logits_to_keep=3), full[:, -3:])


@pytest.mark.parametrize("in_place", [True, False], ids=["in-place", "fused-attention"])
def test_decoding_through_cache_equals_full_forward(pair, in_place, monkeypatch):
    """Token by token past the window: every position's logits equal the full forward's, whether
    decoding reads the caches in place (Metal kernels, CPU references) or runs MLX's fused
    attention over the derived keys (CUDA)."""
    monkeypatch.setattr(attention_module, "decode_in_place", lambda: in_place)
    _, model = pair
    inputs = text_prompt(np.random.default_rng(10), 26)
    full = ours(model, inputs)
    cache = model.make_cache()
    steps = [np.array(model(mx.array(inputs["input_ids"][:, i : i + 1]), cache=cache)) for i in range(26)]
    assert relative_error(np.concatenate(steps, axis=1), full) < RELATIVE_TOLERANCE


@pytest.mark.parametrize("kind", ["text", "image+audio", "audio emphasis"])
def test_query_blocks_equal_one_masked_product(pair, kind):
    """Attention by query blocks (sliding: blocks of several queries over their windows; global:
    blocks of MIN_QUERY_BLOCK, as in short passes and when the score budget is tiny) equals one
    masked product over every key."""
    _, model = pair
    rng = np.random.default_rng(13)
    inputs = text_prompt(rng, 70) if kind == "text" else image_audio_prompt(rng)
    arrays = {k: mx.array(v) for k, v in inputs.items()}
    h = model.embed_inputs(arrays["input_ids"], arrays)
    options = {"mm_token_type_ids": inputs.get("mm_token_type_ids")}
    if kind == "audio emphasis":
        options["key_bias"] = SpanBias(8, 20, 0.7)

    def one_product(*_):  # an observer makes every layer attend in one call (diagnostics' path)
        pass

    whole = np.array(model.forward_embeddings(h, observer=one_product, **options))
    blocked = np.array(model.forward_embeddings(h, **options))
    tiny_blocks = np.array(model.forward_embeddings(h, score_bytes=1, **options))
    assert relative_error(blocked, whole) < 1e-5
    assert relative_error(tiny_blocks, whole) < 1e-5


@pytest.mark.parametrize("chunk", [3, 7, 64])
def test_chunked_prefill_with_image_equals_full_forward(pair, chunk):
    _, model = pair
    inputs = image_audio_prompt(np.random.default_rng(11))
    full = ours(model, inputs)
    cache = model.make_cache()
    last = np.array(prefill(model, inputs, cache, chunk_size=chunk, logits_to_keep=1))
    assert relative_error(last, full[:, -1:]) < RELATIVE_TOLERANCE
    assert cache[0].offset == inputs["input_ids"].shape[1]


@pytest.fixture(scope="module", params=sorted(SHAPES))
def varied_pair(request, tmp_path_factory):
    """A reference whose greedy tokens vary (small embeddings: the layers choose each token), and ours."""
    path = tmp_path_factory.mktemp(f"varied-{request.param}")
    ref = build_reference_checkpoint(path, seed=3, embed_std=VARIED_EMBED_STD, **SHAPES[request.param])
    return ref, mlx_unified.load_model(path, dtype="float32")


def greedy_through_cache(model, inputs: dict[str, np.ndarray], steps: int) -> list[int]:
    cache = model.make_cache()
    logits = prefill(model, inputs, cache, chunk_size=8)
    tokens = []
    for _ in range(steps):
        token = int(mx.argmax(logits[0, -1]).item())
        tokens.append(token)
        logits = model(mx.array([[token]]), cache=cache)
    return tokens


@pytest.mark.parametrize("kind", ["text", "image+audio"])
def test_greedy_tokens_match_reference_generate(varied_pair, kind):
    ref, model = varied_pair
    inputs = PROMPTS[kind](np.random.default_rng(12))
    expected = reference_greedy(ref, inputs, max_new_tokens=32)
    assert_varied(expected)
    assert greedy_through_cache(model, inputs, 32) == expected


def test_greedy_check_fails_with_one_attention_output_zeroed(varied_pair):
    """The check above can fail: with one layer's attention output zeroed, the tokens differ."""
    ref, model = varied_pair
    inputs = PROMPTS["text"](np.random.default_rng(12))
    expected = reference_greedy(ref, inputs, max_new_tokens=32)
    o_proj = model.language_model.layers[0].self_attn.o_proj
    kept = o_proj.weight
    o_proj.weight = mx.zeros_like(kept)
    try:
        assert greedy_through_cache(model, inputs, 32) != expected
    finally:
        o_proj.weight = kept


def bf16_ulp(values: np.ndarray) -> np.ndarray:
    """The spacing of bfloat16 numbers at |values| (8 significant bits)."""
    exponent = np.floor(np.log2(np.maximum(np.abs(values), np.float32(2.0**-126))))
    return np.float32(2.0) ** (exponent - 7)


@pytest.mark.parametrize("activation", ["gelu_pytorch_tanh", "gelu"])
def test_geglu_rounds_once_like_the_reference_in_bf16(activation):
    """The MLP's act(gate) * up in bf16, as the released weights run: the activation is computed in
    float32 and rounded once, as PyTorch does. Bit identity is not portable: each library's float32
    erf/tanh is its own vectorised approximation (MLX JIT-compiles it for the CPU it runs on), within
    about 2 float32 ulps of |gate| of the exact value. So: (a) every product is within the bound that
    error allows (one bf16 ulp of the activation may flip, then the product rounds); (b) where the gate
    is above -3, at most 1% of products differ, by at most 2 bf16 ulps. MLX's bf16 gelu, which rounds
    each step, differs in 29%; an exactly rounded float32 activation, standing in for another CPU's
    approximation, in 0.08% (tanh form)."""
    import torch
    from transformers.activations import ACT2FN

    from mlx_unified.model import geglu_erf, geglu_tanh

    rng = np.random.default_rng(14)
    gate, up = (rng.normal(0, 3, (64, 1024)).astype(np.float32) for _ in range(2))
    to_torch = lambda a: torch.tensor(a).to(torch.bfloat16)  # noqa: E731
    act_ref = ACT2FN[activation](to_torch(gate).float())  # float32, as PyTorch computes it in bf16
    expected = (act_ref.to(torch.bfloat16) * to_torch(up)).float().numpy()
    assert np.array_equal(expected, (ACT2FN[activation](to_torch(gate)) * to_torch(up)).float().numpy())
    geglu = geglu_tanh if activation == "gelu_pytorch_tanh" else geglu_erf
    got = geglu(mx.array(gate).astype(mx.bfloat16), mx.array(up).astype(mx.bfloat16))
    assert got.dtype == mx.bfloat16
    got = np.array(got.astype(mx.float32))
    gate_bf16 = to_torch(gate).float().numpy()
    up_bf16 = to_torch(up).float().numpy()
    act_error = 4 * 2.0**-23 * np.abs(gate_bf16)  # both libraries' float32 activation errors
    bound = np.abs(up_bf16) * (act_error + bf16_ulp(act_ref.numpy())) + bf16_ulp(expected)
    assert (np.abs(got - expected) <= bound).all()
    bulk = gate_bf16 > -3
    assert bulk.mean() > 0.8
    differ = bulk & (got != expected)
    assert differ.mean() <= 1e-2
    assert (np.abs(got - expected)[differ] <= 2 * bf16_ulp(expected[differ])).all()
