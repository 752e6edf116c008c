"""What users get: command lines that load nothing heavy before they need it, and a wheel that carries
every file the package opens."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("mlx", "mlx_lm", "transformers", "torch", "gradio", "huggingface_hub")


def imported_by(module: str) -> list[str]:
    """Top-level packages a fresh interpreter has loaded after importing `module`."""
    code = f"import sys, json, {module}; print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.parametrize("module", ["mlx_unified.cli", "mlx_unified.app"])
def test_front_ends_import_no_heavy_package_before_it_is_needed(module):
    # `--help` and refused arguments answer from the parser alone.
    assert not set(HEAVY) & set(imported_by(module))


def package_files() -> set[str]:
    """Every file of the package source tree, as wheel member names."""
    root = REPO / "mlx_unified"
    return {
        path.relative_to(REPO).as_posix()
        for path in root.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }


@pytest.mark.slow
def test_installed_wheel_carries_every_package_file_and_runs_the_kernel_selfcheck(tmp_path):
    # Built from a copy: a build/ folder left in the checkout would hand the wheel stale files.
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", "artifacts", "checkpoints", "results"
    ))  # fmt: skip
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(source)],
        check=True, capture_output=True,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("mlx_unified-*.whl")
    members = set(zipfile.ZipFile(wheel).namelist())
    assert package_files() <= members, sorted(package_files() - members)

    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target), str(wheel)],
        check=True, capture_output=True,
    )  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(target), "MLX_UNIFIED_EMULATOR_CACHE": str(tmp_path / "emulator")}
    # Run outside the checkout, so only the installed copy can be imported.
    where = subprocess.run(
        [sys.executable, "-c", "import mlx_unified; print(mlx_unified.__file__)"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert Path(where.stdout.strip()).is_relative_to(target)
    check = subprocess.run(
        [sys.executable, "-m", "mlx_unified.kernels.selfcheck", "--emulate"],
        cwd=tmp_path, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.strip().splitlines()[-1].endswith("kernels ok")
