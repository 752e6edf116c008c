"""Which checkpoint a front end runs, made ready before any weight is read.

- The folder or hub id the user names; with none, the community conversion that fits this machine
  (`default_model`: mlx-community's 4-bit one on a 16 GB Mac), fetched through huggingface_hub into
  the standard hub cache (its progress bars; an interrupted download resumes).
- `--demo`: the random tiny checkpoint (`testing.tiny_checkpoint`), written once into the cache folder,
  so that the whole pipeline can be seen with no download. Every front end says its weights are random.
- Unquantized weights with `--quantize` (the official `google/gemma-4-12B-it`): converted once,
  streaming, into `<cache>/converted/`, and that conversion reused by the next runs.
- The memory guard (`check_memory`): the weights' size, from the files or the hub's index before any
  download, plus the KV cache and prefill of the asked context (`footprint`) against this machine's
  budget (`budgets.memory_budget_bytes`). What would swap is refused, naming the conversion that fits.

The converter is imported only to convert, or to name a conversion; the model never imports it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .budgets import BUDGET_VARIABLE, GB, memory_budget_bytes
from .checkpoint import HUB_PATTERNS, resolve, stored_weight_bytes
from .config import ModelConfig, load_config, released_config
from .errors import InputError
from .footprint import DEFAULT_MIN_CONTEXT, fits, run_bytes
from .kv_quantization import DEFAULT_KV_GROUP_SIZE

# The community conversions of the 12B model (mlx_vlm.convert's, as the model cards name them), most
# bits first, with their quantization bits (None: unquantized bf16).
COMMUNITY_MODELS: tuple[tuple[str, int | None], ...] = (
    ("mlx-community/gemma-4-12b-it-bf16", None),
    ("mlx-community/gemma-4-12b-it-8bit", 8),
    ("mlx-community/gemma-4-12b-it-4bit", 4),
)
OFFICIAL_MODEL = "google/gemma-4-12B-it"
# The prompt a front end's memory check makes room for, beside the tokens it generates.
GUARD_PROMPT_TOKENS = 4096
CACHE_VARIABLE = "MLX_UNIFIED_CACHE_DIR"
# What a `--quantize` value may name besides a number of bits: a recipe or a floating-point mode.
QUANTIZE_HELP = "bits (2-8), a recipe (e.g. mixed_4_6) or a mode (mxfp4, nvfp4, mxfp8); alone: the plan's pick"


class MemoryGuardError(InputError):
    """Loading this checkpoint with this context would not fit this machine's memory budget."""


class ModelNotAvailable(InputError):
    """The checkpoint asked for (or the default) is neither here nor reachable on the hub."""


def add_source_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    """The front ends' flags for what to `verb` ("run", "load"): --model (default: `default_model`),
    --demo, --quantize."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--model",
        help="local checkpoint folder or hub id (owner/name); default: the community conversion that fits "
        "this machine (mlx-community/gemma-4-12b-it-4bit on a 16 GB Mac), downloaded once",
    )
    source.add_argument(
        "--demo", action="store_true", help=f"{verb} the random tiny demo checkpoint (no download; meaningless text)"
    )
    parser.add_argument(
        "--quantize",
        nargs="?",
        const="",
        metavar="Q",
        help=f"convert unquantized weights (e.g. {OFFICIAL_MODEL}) once, then {verb} that: {QUANTIZE_HELP}",
    )


def cache_root() -> Path:
    """mlx-unified's cache folder: $MLX_UNIFIED_CACHE_DIR, by default ~/.cache/mlx-unified."""
    return Path(os.environ.get(CACHE_VARIABLE, "~/.cache/mlx-unified")).expanduser()


def community_weights_bytes(bits: int | None) -> int:
    """The size of a community conversion's weights (mlx-vlm's plain conversion at `bits`, groups of 64)."""
    from .convert.estimate import weights_bytes
    from .convert.recipes import base_params

    return weights_bytes(released_config(), None if bits is None else base_params(bits, 64))


def default_model(budget_bytes: int | None = None) -> str:
    """The community conversion with the most bits that leaves DEFAULT_MIN_CONTEXT tokens of context in
    this machine's (or the given) budget: the 4-bit one on a 16 GB Mac, the 8-bit one from 24 GB; the
    smallest when none fits (the memory guard then says so)."""
    budget = memory_budget_bytes()[0] if budget_bytes is None else budget_bytes
    config = released_config()
    for repo_id, bits in COMMUNITY_MODELS:
        if fits(config, community_weights_bytes(bits), DEFAULT_MIN_CONTEXT, budget):
            return repo_id
    return COMMUNITY_MODELS[-1][0]


def demo_checkpoint() -> Path:
    """The random tiny checkpoint, written on first use into the cache folder (complete or not at all)."""
    from .testing import tiny_checkpoint

    folder = cache_root() / "demo"
    if not (folder / "config.json").is_file():
        staging = folder.with_name(".demo.partial")
        shutil.rmtree(staging, ignore_errors=True)
        tiny_checkpoint(staging)
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)
    return folder


# ---------------------------------------------------------------- --quantize


@dataclass(frozen=True)
class Quantization:
    """A `--quantize` value: the conversion to make of unquantized weights."""

    value: str  # as `--quantize` takes it: "4", "mixed_4_6", "mxfp4"
    bits: int
    mode: str
    recipe: str

    @property
    def label(self) -> str:
        """In the converted folder's name: "4bit", "mixed_4_6", "mxfp4"."""
        return f"{self.value}bit" if self.value.isdigit() else self.value

    def convert_arguments(self) -> dict[str, Any]:
        from .convert.recipes import RECIPES

        bits = None if RECIPES[self.recipe].fixed_bits else self.bits
        return {"quantize": True, "q_bits": bits, "q_mode": self.mode, "recipe": self.recipe}

    def weights_bytes(self, config: ModelConfig) -> int:
        from .convert.estimate import weights_bytes
        from .convert.recipes import base_params

        return weights_bytes(config, base_params(self.bits, None, self.mode), self.recipe)


def parse_quantize(value: str) -> Quantization:
    """A `--quantize` value: bits (uniform, affine), a recipe name, or a floating-point mode."""
    from .convert.recipes import MODES, RECIPES

    if value.isdigit() and int(value) in MODES["affine"].bits:
        return Quantization(value, int(value), "affine", "uniform")
    if value in RECIPES and RECIPES[value].fixed_bits:
        return Quantization(value, 4, "affine", value)
    if value in MODES and value != "affine":
        return Quantization(value, MODES[value].default_bits, value, "uniform")
    raise InputError(f"--quantize {value}: expected {QUANTIZE_HELP}")


def recommended_row(config: ModelConfig, budget_bytes: int, context_tokens: int) -> Any:
    """The `--plan` table's recommendation for this budget (a PlanRow; None when nothing fits)."""
    from .convert.estimate import plan, recommend

    return recommend(plan(config, budget_bytes), max(context_tokens, DEFAULT_MIN_CONTEXT))


def row_quantization(row: Any) -> Quantization | None:
    """A plan row as a `--quantize` value; None for the unquantized row."""
    from .convert.recipes import RECIPES

    if row.recipe is None:
        return None
    if row.mode != "affine":
        return parse_quantize(row.mode)
    return parse_quantize(row.recipe if RECIPES[row.recipe].fixed_bits else str(row.bits))


def converted_folder(name: str, quantization: Quantization) -> Path:
    """Where the conversion of `name` (a hub id or a folder) with `quantization` is kept."""
    if Path(name).expanduser().exists():
        folder = Path(name).expanduser().resolve()
        stem = f"{folder.name}-{hashlib.sha256(str(folder).encode()).hexdigest()[:8]}"
    else:
        stem = name.replace("/", "--")
    return cache_root() / "converted" / f"{stem}-{quantization.label}"


# ---------------------------------------------------------------- the guard


def check_memory(
    name: str,
    config: ModelConfig,
    weights_bytes: int,
    context_tokens: int,
    budget: tuple[int, str] | None = None,
    kv_bits: int | None = None,
    kv_group_size: int = DEFAULT_KV_GROUP_SIZE,
) -> None:
    """Refuse (MemoryGuardError) a model whose weights, KV cache (bf16, or `kv_bits`-bit in groups of
    `kv_group_size`) and prefill at `context_tokens` exceed the budget (default: this machine's), naming
    a conversion that fits."""
    budget_bytes, where = budget or memory_budget_bytes()
    needed = run_bytes(config, weights_bytes, context_tokens, budget_bytes, kv_bits, kv_group_size)
    if needed <= budget_bytes:
        return
    raise MemoryGuardError(
        f"{name}: needs about {needed / GB:.1f} GB ({weights_bytes / GB:.1f} GB of weights, the rest for "
        f"{context_tokens:,} tokens of context{f', {kv_bits}-bit KV cache' if kv_bits else ''}) but {where} is {budget_bytes / GB:.1f} GB: it would swap. "
        f"{_what_fits(name, config, budget_bytes, context_tokens, kv_bits, kv_group_size)} "
        f"({BUDGET_VARIABLE}=<size>, e.g. 20GB, overrides the budget.)"
    )


def _what_fits(
    name: str, config: ModelConfig, budget_bytes: int, context_tokens: int, kv_bits: int | None, kv_group_size: int
) -> str:
    row = recommended_row(config, budget_bytes, context_tokens)
    quantization = None if row is None else row_quantization(row)
    if quantization is None:
        return (
            f"No conversion of this model leaves {max(context_tokens, DEFAULT_MIN_CONTEXT):,} tokens of "
            "context in that budget."
        )
    size = f"{row.label}, about {row.weights_bytes / GB:.1f} GB of weights"
    if not config.quantization:
        return (
            f"Convert it to fit ({size}): add --quantize {quantization.value} (converted once into "
            f"{cache_root() / 'converted'}), or run: python convert.py --hf-path {name} "
            f"--mlx-path {Path(name).name}-{quantization.label} {row.convert_flags}."
        )
    community = default_model(budget_bytes)
    weights = community_weights_bytes(dict(COMMUNITY_MODELS)[community])
    if fits(released_config(), weights, context_tokens, budget_bytes, kv_bits, kv_group_size):
        return f"Run --model {community} instead, which fits."
    return f"Convert the official weights to fit ({size}): --model {OFFICIAL_MODEL} --quantize {quantization.value}."


# ---------------------------------------------------------------- getting the files


def _hub_preview(repo_id: str, shown: str) -> tuple[Path, int | None]:
    """A hub checkpoint's small files (config, index, tokenizer) in the hub cache, and its weights' size
    when known before downloading them: from the index, else the hub's file listing."""
    from huggingface_hub import HfApi, snapshot_download

    folder = Path(_hub_call(shown, lambda: snapshot_download(repo_id, allow_patterns=["*.json"])))
    size = stored_weight_bytes(folder)
    if size is None:
        info = _hub_call(shown, lambda: HfApi().model_info(repo_id, files_metadata=True))
        size = sum(s.size or 0 for s in info.siblings or [] if s.rfilename.endswith(".safetensors")) or None
    return folder, size


def _download(repo_id: str, shown: str) -> Path:
    """The whole checkpoint in the hub cache (huggingface_hub's progress bars; resumes a partial one)."""
    from huggingface_hub import snapshot_download

    return Path(_hub_call(shown, lambda: snapshot_download(repo_id, allow_patterns=HUB_PATTERNS)))


def _hub_call(repo_id: str, call: Callable[[], Any]) -> Any:
    """`call()`, its hub errors as ModelNotAvailable naming `repo_id` and the way out."""
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return call()
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise ModelNotAvailable(
            f"{repo_id}: not found on the hub, or access not granted ({type(e).__name__}); check the id, or "
            "log in with `hf auth login` for a gated model"
        ) from e
    except LocalEntryNotFoundError as e:
        raise ModelNotAvailable(
            f"{repo_id}: not in the local hub cache, and the hub cannot be reached (offline?). Connect and run "
            "again to download it once (resumable), pass --model with a checkpoint folder, or run with --demo "
            "to see the pipeline work with random weights"
        ) from e
    except OSError as e:
        raise ModelNotAvailable(f"{repo_id}: download failed ({e}); run again to resume it") from e


def _is_hub_id(name: str) -> bool:
    return not Path(name).expanduser().exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None


@dataclass
class Prepared:
    """A checkpoint folder ready to load, and how it was found (for the front end to tell)."""

    folder: Path
    name: str  # as the user (or the default) named it
    note: str = ""  # e.g. "the default model for this machine"


def prepare(
    name: str | None,
    *,
    context_tokens: int,
    demo: bool = False,
    quantize: str | None = None,
    draft_model: str | None = None,
    say: Callable[[str], None] = lambda text: print(text, file=sys.stderr, flush=True),
    kv_bits: int | None = None,
    kv_group_size: int = DEFAULT_KV_GROUP_SIZE,
) -> Prepared:
    """The checkpoint to load for `name` (None: the default for this machine), checked against the
    memory budget (with a KV cache of `context_tokens`, bf16 or `kv_bits`-bit) before any weight is
    downloaded or read; `quantize` (see `parse_quantize`; "" for the plan's recommendation) converts
    unquantized weights once into the cache folder. `draft_model`: a drafter loaded beside it
    (speculative decoding), whose stored weights the check counts too. `say` reports the slow steps
    (downloading, converting)."""
    kv = {"kv_bits": kv_bits, "kv_group_size": kv_group_size}
    if demo:
        if name or quantize is not None:
            raise InputError("--demo runs the random demo checkpoint: drop --model and --quantize")
        return Prepared(demo_checkpoint(), "demo", "the random demo checkpoint")
    note = ""
    if name is None:
        name, note = default_model(), "the default model for this machine"
    shown = describe(Prepared(Path(), name, note))
    hub = _is_hub_id(name)
    if hub:
        preview, size = _hub_preview(name, shown)
    else:
        preview = resolve(name)
        size = stored_weight_bytes(preview)
    config = load_config(preview)
    if quantize is not None:
        converted = _converted(name, preview, config, quantize, context_tokens, hub, say, kv)
        if converted is not None:
            return converted
    if size is not None:
        check_memory(name, config, size + _drafter_bytes(draft_model), context_tokens, **kv)
    if hub:
        say(f"Fetching {shown} from the hub ({_gb(size)}; kept in the hub cache, resumed if interrupted) ...")
        folder = _download(name, shown)
    else:
        folder = preview
    return Prepared(Path(folder), name, note)


def _drafter_bytes(draft_model: str | None) -> int:
    """The stored weights of a local drafter folder (0 without one, or for a hub id: the drafter is a
    small fraction of the model, and its size is known only once it is fetched)."""
    if not draft_model or _is_hub_id(draft_model):
        return 0
    return stored_weight_bytes(resolve(draft_model)) or 0


def _converted(
    name: str,
    preview: Path,
    config: ModelConfig,
    quantize: str,
    context_tokens: int,
    hub: bool,
    say: Callable[[str], None],
    kv: dict[str, Any],
) -> Prepared | None:
    """The conversion of `name` with `quantize`, made now or found from an earlier run; None when the
    plan's pick is the unquantized model itself."""
    if config.quantization:
        raise InputError(f"--quantize {quantize}: {name} is quantized already; drop --quantize")
    budget_bytes, where = memory_budget_bytes()
    if quantize:
        quantization = parse_quantize(quantize)
    else:
        row = recommended_row(config, budget_bytes, context_tokens)
        if row is None:
            raise MemoryGuardError(
                f"{name}: no conversion of this model leaves {max(context_tokens, DEFAULT_MIN_CONTEXT):,} tokens "
                f"of context in {where}, "
                f"{budget_bytes / GB:.1f} GB ({BUDGET_VARIABLE}=<size> overrides the budget)"
            )
        quantization = row_quantization(row)
        if quantization is None:
            say(f"{name} fits {where} unquantized: --quantize has nothing to do")
            return None
    target = converted_folder(name, quantization)
    if (target / "config.json").is_file():
        check_memory(str(target), load_config(target), stored_weight_bytes(target) or 0, context_tokens, **kv)
        return Prepared(target, name, f"converted earlier with --quantize {quantization.label}")
    check_memory(
        f"{name} --quantize {quantization.label}", config, quantization.weights_bytes(config), context_tokens, **kv
    )
    from .convert import convert

    source = preview
    if hub:
        say(f"Fetching {name} from the hub to convert it once (kept in the hub cache, resumed if interrupted) ...")
        source = _download(name, name)
    say(f"Converting {name} once into {target} ({quantization.label}; reused by the next runs) ...")
    convert(source, target, report=say, **quantization.convert_arguments())
    return Prepared(target, name, f"converted with --quantize {quantization.label}")


def _gb(size: int | None) -> str:
    return "size unknown" if size is None else f"{size / GB:.1f} GB"


def describe(prepared: Prepared) -> str:
    """One line for the front end: which checkpoint, and why this one."""
    return f"{prepared.name} ({prepared.note})" if prepared.note else prepared.name

