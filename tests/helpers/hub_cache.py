"""A Hugging Face cache made by hand (what `hf download` leaves), for Hub repo ids without the Hub."""

from __future__ import annotations

import os
from pathlib import Path


def make_hub_cache(cache: Path, repo_id: str, files: dict[str, bytes], commit: str = "a" * 40) -> Path:
    """The HF cache layout: refs/main → commit, snapshots/<commit>/<file> → ../../blobs/<id> links."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs/main").write_text(commit)
    (repo / "blobs").mkdir()
    for i, (name, data) in enumerate(files.items()):
        blob = repo / "blobs" / f"blob{i}"
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return repo / "snapshots" / commit
