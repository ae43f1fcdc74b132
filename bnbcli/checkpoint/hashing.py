"""sha256 of whole source files, computed beside the conversion rather than inside it.

The manifest records the standard sha256 of each source shard (the digest the Hub shows for LFS files),
which has to see every byte in file order. One stream runs at ~2 GB/s on a core, slower than a
GPU conversion reads its input, so each file is hashed by its own worker, in parallel with the
pipeline and with the other files; hashlib releases the GIL on large updates. The workers read the
same files the pipeline reads, so with a warm page cache the second read costs memory bandwidth only.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from bnbcli.errors import InputError

CHUNK = 16 << 20  # bytes per read: large enough that hashlib drops the GIL, small enough to stay in cache


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    try:
        with path.open("rb", buffering=0) as f:
            while n := f.readinto(buffer):
                digest.update(view[:n])
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}", hint="check the file and its permissions") from e
    return digest.hexdigest()


class FileHashes:
    """Starts hashing ``paths`` at once; ``result()`` waits and returns {str(path): sha256}."""

    def __init__(self, paths: list[Path], workers: int | None = None) -> None:
        count = workers or max(1, min(len(paths), (os.cpu_count() or 2) // 2))
        self._pool = ThreadPoolExecutor(max_workers=count, thread_name_prefix="bnb-hash")
        self._futures: dict[str, Future[str]] = {str(p): self._pool.submit(file_sha256, p) for p in paths}

    def result(self) -> dict[str, str]:
        try:
            return {path: future.result() for path, future in self._futures.items()}
        finally:
            self._pool.shutdown(wait=True)

    def finished(self) -> dict[str, str]:
        """The digests ready so far (never waits)."""
        return {p: f.result() for p, f in self._futures.items() if f.done() and not f.cancelled() and not f.exception()}

    def cancel(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
