"""A local Hugging Face hub cache, laid out as huggingface_hub writes one, for the first-run tests: with
HF_HUB_CACHE pointing at it and HF_HUB_OFFLINE=1, a hub id resolves to these files and nothing else."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

REVISION = "0123456789abcdef0123456789abcdef01234567"


def add_to_hub_cache(cache: Path, repo_id: str, folder: Path, files: Iterable[str] | None = None) -> Path:
    """Put `folder`'s files (or only `files`, names in it) into `cache` as a download of `repo_id` at its
    main revision: `models--owner--name/blobs/<sha256>`, `snapshots/<revision>/<file>` linking to the
    blobs, `refs/main` naming the revision. Returns the snapshot folder."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(REVISION)
    names = sorted(p.name for p in folder.iterdir() if p.is_file()) if files is None else list(files)
    for name in names:
        digest = hashlib.sha256((folder / name).read_bytes()).hexdigest()
        blob = repo / "blobs" / digest
        if not blob.exists():
            shutil.copyfile(folder / name, blob)
        link = snapshot / name
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(os.path.relpath(blob, snapshot), link)
    return snapshot
