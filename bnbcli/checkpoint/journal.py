"""What an interrupted `bnb quantize` had finished, so that `--resume` can keep it.

While a run writes into its temporary folder, each output shard that is complete *and on disk*
(fsync'd) is recorded in a small journal file beside it, rewritten atomically, together with a
fingerprint of everything that decides the output: the tool version, the plan (scheme, every tensor's
action, shards and their exact sizes) and each source file's size and modification time. Source
sha256s are recorded as soon as the hashing threads have them.

A resumed run adopts the dead run's temporary folder and keeps a recorded shard only if the
fingerprint is the same and the shard file still has its recorded size; it converts everything else.
At the end it compares the sha256 of every source file with the recorded ones: a source whose bytes
changed under an unchanged size and mtime fails the run instead of mixing two sources.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bnbcli import __version__, json_text
from bnbcli.checkpoint.durable import write_json

JOURNAL_NAME = ".bnb-journal.json"
JOURNAL_VERSION = 1


def fingerprint(layout: list[Any], settings: dict[str, Any], sources: list[Path]) -> str:
    """A digest of what decides one component's output bytes."""

    def identity(path: Path) -> list[Any]:
        st = path.stat()
        return [str(path), st.st_size, st.st_mtime_ns]

    document = {
        "tool": __version__,
        "plan": layout,
        "settings": settings,
        "sources": [identity(p) for p in sources],
    }
    return hashlib.sha256(json.dumps(document, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class FinishedShard:
    data_bytes: int
    size: int
    records: dict[str, dict[str, Any]]  # tensor name -> {"outputs": {key: sha256}, "error": {...} | None}


class Journal:
    """The journal of one component's output folder: read what a previous run finished, record ours."""

    def __init__(self, folder: Path, fingerprint: str, resume: bool) -> None:
        self.path = folder / JOURNAL_NAME
        self.fingerprint = fingerprint
        self._lock = threading.Lock()
        self.finished: dict[str, FinishedShard] = {}
        self.source_sha256: dict[str, str] = {}  # as the interrupted run recorded them
        self._sources: dict[str, str] = {}  # as this run records them
        self.discarded = False  # a previous journal existed but did not match
        if resume:
            self._load(folder)
        self._shards: dict[str, dict[str, Any]] = {
            name: {"data_bytes": s.data_bytes, "size": s.size, "records": s.records}
            for name, s in self.finished.items()
        }

    def _load(self, folder: Path) -> None:
        try:
            document = json_text.loads(self.path.read_text())
        except (OSError, ValueError):
            return
        if (
            not isinstance(document, dict)
            or document.get("version") != JOURNAL_VERSION
            or document.get("fingerprint") != self.fingerprint
        ):
            self.discarded = True
            return
        for name, shard in (document.get("shards") or {}).items():
            path = folder / name
            try:
                if path.stat().st_size == shard["size"]:
                    self.finished[name] = FinishedShard(shard["data_bytes"], shard["size"], shard["records"])
            except (OSError, KeyError, TypeError):
                continue
        self.source_sha256 = dict(document.get("source_sha256") or {})

    def require_sources(self, paths: list[Path]) -> None:
        """Keep nothing unless the interrupted run recorded every source file's sha256: the resumed run
        compares them at its end, and without them a changed source could not be told apart."""
        if any(str(p) not in self.source_sha256 for p in paths):
            self.discarded = self.discarded or bool(self.finished)
            self.finished = {}
            self._shards = {}

    def record_shard(
        self, name: str, data_bytes: int, size: int, records: dict[str, dict[str, Any]], sources: dict[str, str]
    ) -> None:
        """Called once the shard is on disk, with the source sha256s known by then: one rewrite for both
        (the journal of 200,000 tiny tensors is tens of MB)."""
        with self._lock:
            self._shards[name] = {"data_bytes": data_bytes, "size": size, "records": records}
            self._sources.update(sources)
            self._write()

    def _write(self) -> None:
        document = {
            "version": JOURNAL_VERSION,
            "fingerprint": self.fingerprint,
            "source_sha256": self._sources,
            "shards": self._shards,
        }
        write_json(self.path, document)

    def remove(self) -> None:
        """The finished output carries the manifest instead."""
        self.path.unlink(missing_ok=True)
