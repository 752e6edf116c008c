"""Speculative decoding through `stream_generate`: the same replies as plain decoding with every prompt
kind and feature (images, audio with emphasis, video, chunked prefill, the prefix cache), its
statistics, and sampling."""

from __future__ import annotations

import pytest
from media_files import voiced_bursts, write_image, write_video

from mlx_unified import attention as attention_module
from mlx_unified.drafter import load_drafter
from mlx_unified.generation import generate
from mlx_unified.generation_params import GenerationParams
from mlx_unified.prefix_cache import PrefixCache
from mlx_unified.sampling import TokenDistribution
from mlx_unified.testing import tiny_drafter

WINDOW = 16
SYSTEM = "You are a careful voice assistant. Answer briefly and never invent facts. " * 3
pytestmark = pytest.mark.tiny(seed=3, sliding_window=WINDOW)


@pytest.fixture(scope="module")
def drafter(tiny, tmp_path_factory):
    """A drafter of the tiny checkpoint that drafts the last token again (accepted where it repeats)."""
    return load_drafter(tiny_drafter(tmp_path_factory.mktemp("drafter"), tiny.path, copies_last_token=True))


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    return {"image": write_image(folder / "photo.png"), "video": write_video(folder / "clip.mp4")}


def both(tiny, drafter, prompt, **kwargs):
    """(plain reply, speculative reply) of greedy decoding, 24 tokens, no prefix cache unless given."""
    kwargs = {"max_tokens": 24, "use_prefix_cache": False, **kwargs}
    plain = generate(tiny.model, tiny.processor, prompt, **kwargs)
    speculative = generate(tiny.model, tiny.processor, prompt, draft_model=drafter, num_draft_tokens=3, **kwargs)
    return plain, speculative


def test_text_reply_and_statistics(tiny, drafter):
    plain, speculative = both(tiny, drafter, "Count to ten", system=SYSTEM)
    assert speculative.tokens == plain.tokens and speculative.text == plain.text
    assert speculative.draft_tokens >= 3 * 4 and 0 < speculative.accepted_draft_tokens < speculative.draft_tokens
    assert speculative.acceptance_rate == speculative.accepted_draft_tokens / speculative.draft_tokens
    assert 1 < speculative.mean_accepted_length <= 4
    assert plain.draft_tokens == 0 and plain.acceptance_rate == 0.0
    auto = generate(tiny.model, tiny.processor, "Count to ten", system=SYSTEM, max_tokens=24, draft_model=drafter)
    assert auto.tokens == plain.tokens


@pytest.mark.parametrize("kind", ["image, chunked prefill", "audio with emphasis", "video"])
def test_media_prompts(tiny, drafter, media, kind):
    if kind == "image, chunked prefill":
        options = dict(images=[media["image"]], prefill_chunk_size=7)
    elif kind == "audio with emphasis":
        options = dict(audios=[voiced_bursts(1.0)], audio_emphasis=0.5, system=SYSTEM)
    else:
        options = dict(videos=[media["video"]])
    plain, speculative = both(tiny, drafter, "What is this?", **options)
    assert len(plain.tokens) == 24  # no early end of turn: rounds to verify
    assert speculative.tokens == plain.tokens and speculative.draft_tokens > 0


def test_prefix_cache(tiny, drafter):
    """A restored prefix (its rings laid out for the plain window) gets the spare slots and gives the
    same reply; a prefix stored by a speculative run serves a plain one."""
    plain, _ = both(tiny, drafter, "First question", system=SYSTEM)
    store = PrefixCache(1 << 30)
    kwargs = dict(system=SYSTEM, max_tokens=24, prefix_cache=store)
    first = generate(tiny.model, tiny.processor, "First question", draft_model=drafter, **kwargs)
    again = generate(tiny.model, tiny.processor, "First question", draft_model=drafter, **kwargs)
    other = generate(tiny.model, tiny.processor, "Second question", draft_model=drafter, **kwargs)
    reference = generate(tiny.model, tiny.processor, "Second question", system=SYSTEM, max_tokens=24, use_prefix_cache=False)
    plain_after = generate(tiny.model, tiny.processor, "Second question", **kwargs)
    assert first.tokens == again.tokens == plain.tokens
    assert again.cached_tokens > WINDOW and other.cached_tokens > WINDOW and plain_after.cached_tokens > WINDOW
    assert other.tokens == reference.tokens == plain_after.tokens


def test_sampling_is_reproducible_with_a_seed(tiny, drafter):
    kwargs = dict(max_tokens=24, temperature=1.0, top_k=20, draft_model=drafter, num_draft_tokens=3)
    a = generate(tiny.model, tiny.processor, "Tell me a story", seed=4, **kwargs)
    b = generate(tiny.model, tiny.processor, "Tell me a story", seed=4, **kwargs)
    c = generate(tiny.model, tiny.processor, "Tell me a story", seed=5, **kwargs)
    assert a.tokens == b.tokens and a.tokens != c.tokens and a.draft_tokens > 0
    # The API's sampler says what it draws from, so drafts are judged by the rejection rule.
    assert isinstance(GenerationParams(temperature=1.0, top_k=20).make_sampler(), TokenDistribution)


@pytest.mark.parametrize("in_place", [True, False], ids=["in-place", "prefill-path"])
@pytest.mark.parametrize("kv_bits", [8, 4])
def test_quantized_kv_cache_rolls_back_exactly(tiny_factory, tmp_path, kv_bits, in_place, monkeypatch):
    """With a quantized KV cache (from the first position, a prompt past the window so the rings wrap
    while verifying), speculative greedy gives exactly plain greedy's tokens with the same cache,
    reading the rings in place (the decode kernels' path, spare slots included) or block by block."""
    monkeypatch.setattr(attention_module, "decode_in_place", lambda: in_place)
    target = tiny_factory(seed=3, sliding_window=WINDOW, head_dim=32, global_head_dim=64)  # whole groups of 32
    drafter = load_drafter(tiny_drafter(tmp_path / "drafter", target.path, copies_last_token=True))
    kv = dict(kv_bits=kv_bits, kv_group_size=32, quantized_kv_start=0)
    plain, speculative = both(target, drafter, "Count to ten " * 6, system=SYSTEM, **kv)
    assert speculative.tokens == plain.tokens and speculative.draft_tokens > 0
    assert 0 < speculative.accepted_draft_tokens < speculative.draft_tokens  # accepted and rejected rounds
