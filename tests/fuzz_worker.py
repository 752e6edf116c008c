"""The fuzz test's worker (`test_fuzz_corruption.py`): loads each corrupted file of a case list, in this
one process, and prints one JSON line per case, so that the test can tell a crash or a hang (no line
comes) from a refusal or a load.

    python tests/fuzz_worker.py CASES.json

A case is {"kind": "checkpoint", "path": folder} or {"kind": "prefix", "path": file}; the case list
also names the intact checkpoint, the prefix's identity and the prompt it belongs to. Each result:
{"case": i, "outcome": "refused", "error": type, "typed": is an InputError, "message": ...} or
{"case": i, "outcome": "loaded", "digests": {name: sha256 of its bytes}, "tokens": greedy tokens}.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_unified.cache import snapshot
from mlx_unified.errors import InputError
from mlx_unified.generation import generate_step
from mlx_unified.loading import load_model
from mlx_unified.prefix_cache import CacheLayout, load_prefix

PROMPT = np.array([[2, 30, 31, 32, 33, 34, 35, 36]])
TOKENS = 6


def digest(array: mx.array) -> str:
    raw = array.view(mx.uint16) if array.dtype == mx.bfloat16 else array
    return hashlib.sha256(np.asarray(raw).tobytes()).hexdigest()


def continue_from(model, layers, token_ids: np.ndarray) -> list[int]:
    """Greedy tokens after a prompt whose first tokens' state is `layers`: the last prompt token runs."""
    cache = snapshot(layers)
    inputs = {"input_ids": np.concatenate([token_ids, [token_ids[-1]]])[None]}
    steps = generate_step(model, inputs, prompt_cache=cache, max_tokens=TOKENS)
    return [token for token, _ in steps]


def run_case(case: dict, spec: dict, intact) -> dict:
    if case["kind"] == "checkpoint":
        model = load_model(Path(case["path"]))
        tokens = [t for t, _ in generate_step(model, {"input_ids": PROMPT}, max_tokens=TOKENS)]
        digests = {name: digest(value) for name, value in tree_flatten(model.parameters())}
        return {"outcome": "loaded", "digests": digests, "tokens": tokens}
    token_ids = np.array(spec["prefix_tokens"], dtype=np.int32)
    layout = CacheLayout.of(intact, intact.make_cache())
    state = load_prefix(Path(case["path"]), spec["identity"], token_ids, layout)
    digests = {f"{i}.{j}": digest(a) for i, layer in enumerate(state.layers) for j, a in enumerate(layer.state) if isinstance(a, mx.array)}
    return {"outcome": "loaded", "digests": digests, "tokens": continue_from(intact, state.layers, state.token_ids)}


def main(spec_file: str) -> None:
    logging.disable(logging.WARNING)  # the random-weights notice, once per load
    spec = json.loads(Path(spec_file).read_text())
    intact = load_model(Path(spec["checkpoint"]))
    print(json.dumps({"ready": True}), flush=True)
    for i in range(spec["start"], len(spec["cases"])):
        case = spec["cases"][i]
        try:
            result = run_case(case, spec, intact)
        except Exception as e:  # reported, and judged by the test: only typed refusals pass
            result = {"outcome": "refused", "error": type(e).__name__, "typed": isinstance(e, InputError), "message": str(e)}
        print(json.dumps({"case": i, **result}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
