"""The converter's memory estimate against the formula and an actual conversion, the runtime budgets,
and the --plan table."""

from __future__ import annotations

import json

import pytest
import torch

from mlx_unified.attention_blocks import MIN_PREFILL_CHUNK, PREFILL_CHUNK
from mlx_unified.budgets import (
    GIB,
    gpu_budget_bytes,
    memory_budget_bytes,
    parse_size,
    prefill_score_bytes,
    prefix_cache_bytes,
)
from mlx_unified.config import load_config, released_config
from mlx_unified.convert import convert, main
from mlx_unified.convert.estimate import estimate, longest_context, plan, recommend
from mlx_unified.footprint import DEFAULT_MIN_CONTEXT, activation_bytes, kv_bytes, prefill_sizes, run_bytes
from mlx_unified.kv_quantization import DEFAULT_QUANTIZED_KV_START
from mlx_unified.model_source import community_weights_bytes
from mlx_unified.testing import scaled_text
from mlx_unified.testing.reference import build_reference_checkpoint

HIDDEN, MLP, VOCAB, LAYERS = 3840, 15360, 262144, 48
SLIDING, GLOBAL = 40, 8


def test_parameter_count_is_the_released_12b():
    assert estimate(released_config())["parameters"] == pytest.approx(11.95e9, rel=0.005)


def test_4bit_estimate_matches_the_formula():
    """Quantized Linear/embedding params cost bits/8 + 2 bf16 (scale, bias) per group; the rest bf16,
    the vision projectors included (plain -q keeps them float, as mlx-vlm's does)."""
    attention_sliding = HIDDEN * (16 * 256 + 2 * 8 * 256) + 16 * 256 * HIDDEN
    attention_global = HIDDEN * (16 * 512 + 512) + 16 * 512 * HIDDEN  # K=V: no v_proj
    quantized = (
        VOCAB * HIDDEN
        + SLIDING * attention_sliding
        + GLOBAL * attention_global
        + LAYERS * 3 * HIDDEN * MLP
        + HIDDEN * 640  # embed_audio
    )
    unquantized = (
        LAYERS * (4 * HIDDEN + 1)
        + SLIDING * 2 * 256
        + GLOBAL * 2 * 512
        + HIDDEN
        + 1120 * 2 * HIDDEN
        + 2 * 6912
        + HIDDEN
        + 4 * HIDDEN
        + HIDDEN * 6912  # patch_dense
        + HIDDEN * HIDDEN  # embed_vision
    )
    formula = quantized * (4 / 8 + 2 * 2 / 64) + unquantized * 2
    result = estimate(released_config(), bits=4, group_size=64)
    assert result["weights_bytes"] == pytest.approx(formula, rel=0.05)
    assert result["weights_bytes"] == pytest.approx(6.7e9, rel=0.05)  # the release notes' figure


def test_estimate_equals_what_a_conversion_writes(tmp_path):
    """A scaled checkpoint (5:1 pattern, K=V globals, bf16) converted at 4 bits, group 64."""
    source = tmp_path / "src"
    shapes = scaled_text(hidden=256, heads=4, head_dim=64, window=8, vocab_size=4096)
    build_reference_checkpoint(source, dtype=torch.bfloat16, **shapes)
    out = convert(source, tmp_path / "out", quantize=True, q_bits=4, q_group_size=64)
    predicted = estimate(load_config(source), bits=4, group_size=64)["weights_bytes"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == predicted
    on_disk = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert on_disk == pytest.approx(predicted, rel=0.05)


def test_kv_cache_caps_sliding_layers_and_keeps_one_tensor_on_global_layers():
    config = released_config()
    window = config.text.sliding_window
    sliding_full = SLIDING * 2 * 8 * window * 256 * 2  # K and V, 8 heads x 256, bf16
    global_per_token = GLOBAL * 1 * 512 * 2  # values only, 1 head x 512
    assert kv_bytes(config, window) == sliding_full + window * global_per_token
    assert kv_bytes(config, 10 * window) - kv_bytes(config, window) == 9 * window * global_per_token
    assert kv_bytes(config, 8192, kv_bits=8) < 0.6 * kv_bytes(config, 8192)


def test_quantized_kv_counts_bits_and_a_scale_and_bias_per_group():
    config = released_config()
    elements = kv_bytes(config, 262144) // 2  # bf16: 2 bytes an element
    assert kv_bytes(config, 262144, kv_bits=8) == int(elements * (1 + 4 / 64))
    assert kv_bytes(config, 262144, kv_bits=4) == int(elements * (0.5 + 4 / 64))
    assert kv_bytes(config, 262144, kv_bits=4, kv_group_size=32) == int(elements * (0.5 + 4 / 32))


def test_prefill_shortens_its_passes_only_when_memory_is_tight():
    config = released_config()
    weights = estimate(config, bits=4, group_size=64)["weights_bytes"]
    roomy = prefill_sizes(config, weights, 8192, budget_bytes=gpu_budget_bytes(32 * GIB))
    assert roomy.chunk == PREFILL_CHUNK
    assert roomy.score_bytes == prefill_score_bytes(weights, gpu_budget_bytes(32 * GIB), kv_bytes(config, 8192))
    # 262K tokens on a 12 GB Mac, 8-bit KV: what is left beside weights and cache takes shorter passes
    tight = prefill_sizes(config, weights, 262144, kv_bits=8, budget_bytes=gpu_budget_bytes(12 * GIB))
    assert MIN_PREFILL_CHUNK <= tight.chunk < PREFILL_CHUNK
    needed = weights + kv_bytes(config, 262144, 8) + activation_bytes(config, 262144, tight.chunk, tight.score_bytes, 8)
    assert needed <= gpu_budget_bytes(12 * GIB)


def test_quantized_attention_is_counted_within_its_score_bound():
    """Past the bound a quantized layer attends its keys in blocks: its count stops growing with the
    context, while the float path's scores and derived keys span every key."""
    config = released_config()
    assert activation_bytes(config, 262144, 512, 128 << 20, 8) == activation_bytes(config, 131072, 512, 128 << 20, 8)
    assert activation_bytes(config, 262144, 512, 128 << 20, 8) < activation_bytes(config, 262144, 512, 128 << 20)


def test_estimate_totals_and_grows_with_context():
    short, long = (estimate(released_config(), context_tokens=n) for n in (4096, 65536))
    for result in (short, long):
        assert (
            result["total_bytes"] == result["weights_bytes"] + result["kv_bytes"] + result["activation_bytes"]
        )
    assert long["kv_bytes"] > short["kv_bytes"] and long["weights_bytes"] == short["weights_bytes"]
    assert estimate(released_config(), bits=None)["weights_bytes"] == pytest.approx(2 * 11.96e9, rel=0.01)


def test_gpu_budget_and_sizes():
    assert parse_size("16GB") == 16 * GIB == parse_size("16")
    assert gpu_budget_bytes(16 * GIB) == pytest.approx(11_453_251_584, rel=1e-6)
    assert gpu_budget_bytes(64 * GIB) == 48 * GIB
    with pytest.raises(ValueError):
        parse_size("lots")


def test_prefix_cache_is_sized_to_the_memory_beside_the_weights():
    weights = estimate(released_config(), bits=4, group_size=64)["weights_bytes"]
    on_16gb = prefix_cache_bytes(weights, gpu_budget_bytes(16 * GIB))
    on_12gb = prefix_cache_bytes(weights, gpu_budget_bytes(12 * GIB))
    snapshot_21k = kv_bytes(released_config(), 21000)
    # Several 21K-token snapshots on a 16 GB Mac, at least one on 12 GB; never what the model needs.
    assert on_16gb == (gpu_budget_bytes(16 * GIB) - weights) // 2 and on_16gb > 4 * snapshot_21k
    assert snapshot_21k < on_12gb < gpu_budget_bytes(12 * GIB) - weights
    assert prefix_cache_bytes(weights, 256 * GIB) == 4 * GIB
    assert prefix_cache_bytes(weights, weights) == GIB // 4  # nothing spare: the smallest store
    budget, source = memory_budget_bytes()
    assert budget > 0 and source
    assert prefix_cache_bytes(weights) == prefix_cache_bytes(weights, budget)


def test_plan_trades_bits_for_context():
    config = released_config()
    budget = gpu_budget_bytes(16 * GIB)
    rows = plan(config, budget)
    by_label = {row.label: row for row in rows}
    assert by_label["bf16"].context_bf16_kv == 0  # 24 GB of weights do not fit
    assert by_label["4-bit"].context_bf16_kv > by_label["6-bit"].context_bf16_kv > 0
    best = recommend(rows, 16384)
    assert best is not None and best.context_bf16_kv >= 16384
    assert (
        longest_context(config, budget, by_label["4-bit"].weights_bytes) == by_label["4-bit"].context_bf16_kv
    )


@pytest.mark.parametrize("memory_gb", [8, 12, 16, 24])
def test_a_quantized_cache_never_reaches_less_context_than_a_float_one(memory_gb):
    """The cache stays float until it holds quantized_kv_start positions (run_bytes counts that, as the
    run does), and keys that fit one block are attended in one product: in every row of the plan, the
    8-bit and 4-bit columns reach at least the bf16 one."""
    rows = plan(released_config(), gpu_budget_bytes(memory_gb * GIB))
    for row in rows:
        assert row.context_kv8 >= row.context_bf16_kv and row.context_kv4 >= row.context_bf16_kv, row
        if row.context_bf16_kv >= DEFAULT_MIN_CONTEXT:
            assert row.context_kv4 >= row.context_kv8


def test_below_quantized_kv_start_a_quantized_run_needs_what_a_float_one_does():
    config, budget = released_config(), gpu_budget_bytes(12 * GIB)
    weights = community_weights_bytes(4)
    for tokens in (100, 4000, DEFAULT_QUANTIZED_KV_START):
        assert run_bytes(config, weights, tokens, budget, kv_bits=8) == run_bytes(config, weights, tokens, budget)
    beyond = 4 * DEFAULT_QUANTIZED_KV_START
    assert run_bytes(config, weights, beyond, budget, kv_bits=8) < run_bytes(config, weights, beyond, budget)
    assert run_bytes(config, weights, beyond, budget, kv_bits=8, quantized_kv_start=0) <= run_bytes(
        config, weights, beyond, budget, kv_bits=8
    )


def test_plan_shows_the_context_quantized_kv_reaches():
    rows = {row.label: row for row in plan(released_config(), gpu_budget_bytes(12 * GIB))}
    four_bit = rows["4-bit"]
    assert four_bit.context_bf16_kv < 262144 == four_bit.context_kv8  # the whole context on a 12 GB Mac
    assert four_bit.context_kv8 == longest_context(released_config(), gpu_budget_bytes(12 * GIB),
                                                   four_bit.weights_bytes, kv_bits=8)


def test_plan_cli(capsys):
    assert main(["--plan", "--memory", "12GB"]) == 0
    out = capsys.readouterr().out
    assert "Recommended:" in out and "4-bit" in out and "8.59 GB" in out
    four_bit = next(line for line in out.splitlines() if line.startswith("4-bit "))
    assert four_bit.split()[4:6] == ["262,144", "262,144"] and "8-bit KV" in out
    assert main(["--plan", "--memory", "lots"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
