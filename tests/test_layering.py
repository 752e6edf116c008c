"""Which parts of the package load which (each checked in a fresh interpreter): the model never loads the
converter, the converter never the model; the decoder and its caches load no request validation, media
processing or front end; shipped code loads no test machinery."""

from __future__ import annotations

import subprocess
import sys

import pytest

# What converting may load of mlx_unified: the converter itself, the checkpoint's names and shapes,
# the config (the drafter's too), the user-error base, the runtime memory budgets, the prefill sizes and
# the runtime's KV/activation count (footprint) its estimate follows, the generation parameters' KV-cache
# quantization settings it counts, the safetensors format.
CONVERTER_MAY_LOAD = {
    "mlx_unified",
    "mlx_unified.attention_blocks",
    "mlx_unified.budgets",
    "mlx_unified.checkpoint",
    "mlx_unified.config",
    "mlx_unified.drafter",
    "mlx_unified.drafter.config",
    "mlx_unified.errors",
    "mlx_unified.kv_quantization",
    "mlx_unified.safetensors_format",
    "mlx_unified.footprint",
}
# What the decoder's layers must not load: request validation, media processing, the front ends, the
# converter and the test machinery sit above them.
ABOVE_THE_DECODER = (
    "mlx_unified.generation_params",
    "mlx_unified.generation",
    "mlx_unified.processing",
    "mlx_unified.cli",
    "mlx_unified.app",
    "mlx_unified.server",
    "mlx_unified.convert",
    "mlx_unified.testing",
)


def loaded_by(module: str) -> list[str]:
    """The mlx_unified modules in sys.modules after importing `module` alone."""
    code = f"import sys, {module}; print(*sorted(m for m in sys.modules if m.startswith('mlx_unified')))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return run.stdout.split()


def test_the_model_loads_no_converter_module():
    modules = loaded_by("mlx_unified.model")
    assert "mlx_unified.model" in modules and "mlx_unified.cache" in modules
    assert [m for m in modules if "convert" in m or "quant_recipes" in m] == []


def test_the_converter_loads_no_model_module():
    modules = loaded_by("mlx_unified.convert")
    assert "mlx_unified.convert.conversion" in modules
    others = {m for m in modules if not m.startswith("mlx_unified.convert")}
    assert others <= CONVERTER_MAY_LOAD, others - CONVERTER_MAY_LOAD


@pytest.mark.parametrize(
    "module", ["mlx_unified.model", "mlx_unified.cache", "mlx_unified.footprint", "mlx_unified.speculative"]
)
def test_the_decoder_and_its_caches_load_nothing_above_them(module):
    above = [m for m in loaded_by(module) if m.startswith(ABOVE_THE_DECODER)]
    assert above == []


def test_the_kernel_selfcheck_loads_no_test_machinery():
    modules = loaded_by("mlx_unified.kernels.selfcheck")
    assert "mlx_unified.kernels.cases" in modules
    assert [m for m in modules if m.startswith("mlx_unified.testing")] == []
