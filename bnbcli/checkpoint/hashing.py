"""sha256 of whole source files, computed beside the conversion rather than inside it.

The manifest records the standard sha256 of each source shard (the digest the Hub shows for LFS files),
which has to see every byte in file order. One stream runs at ~2 GB/s on a core, slower than a
GPU conversion reads its input, so each file is hashed by its own worker, in parallel with the
pipeline and with the other files; hashlib releases the GIL on large updates. The workers read the
same files the pipeline reads, so with a warm page cache the second read costs memory bandwidth only.
`bnb quantize` starts them as soon as it has read its arguments, before it imports torch, in a child
interpreter (``hash_sources_early``).
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from bnbcli.checkpoint import sha256_worker
from bnbcli.checkpoint.sha256_worker import sha256_of
from bnbcli.errors import InputError


def file_sha256(path: Path) -> str:
    try:
        return sha256_of(path)
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}", hint="check the file and its permissions") from e


def _workers(files: int) -> int:
    return max(1, min(files, (os.cpu_count() or 2) // 2))


# Hashes started at start-up by hash_sources_early, by real path, with the file's size and mtime then;
# each is taken by the first FileHashes that wants that file, if the file still looks the same. Only the
# latest call's are kept: a run that ended early (an error) takes none, and a process that runs `bnb
# quantize` again and again (tests, the fuzzer) would otherwise keep every file's future for good.
_early: dict[str, tuple[tuple[int, int], Future[str]]] = {}
_early_lock = threading.Lock()


def _stamp(path: str | Path) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns


def hash_sources_early(src: str) -> None:
    """Start hashing the shards of SRC now, when it is a local folder: `bnb quantize` calls this before it
    imports torch (seconds), and the digests are often ready before the last tensor is written. The
    hashing runs in a child interpreter (``sha256_worker``), which shares no lock with that import; if the
    child cannot run, threads of this process take over. A guess from SRC alone: the pipeline takes the
    digests of the files it reads and ignores the others. Nothing here is waited for when a run ends
    early (an error)."""
    folder = Path(src)
    try:
        files = sorted({os.path.realpath(f) for f in [*folder.glob("*.safetensors"), *folder.glob("*/*.safetensors")]})
    except OSError:
        return
    pending: dict[str, Future[str]] = {}
    with _early_lock:
        _early.clear()  # an earlier run's untaken hashes (their collector still settles them, for nobody)
        for path in files:
            future: Future[str] = Future()
            try:
                _early[path] = (_stamp(path), future)
            except OSError:
                continue
            pending[path] = future
    if pending:
        threading.Thread(target=_collect_early, args=(pending,), name="bnb-hash-early", daemon=True).start()


def _collect_early(pending: dict[str, Future[str]]) -> None:
    """Settle each future from the child's answers, then hash in this process whatever it left (it
    could not start, died, or said something else): no future is left waiting."""
    try:
        _answers_from_child(pending)
    finally:
        leftovers: queue.SimpleQueue[tuple[str, Future[str]]] = queue.SimpleQueue()
        for item in pending.items():
            leftovers.put(item)

        def work() -> None:
            while True:
                try:
                    path, future = leftovers.get_nowait()
                except queue.Empty:
                    return
                _settle(future, path)

        for _ in range(_workers(len(pending)) if pending else 0):
            threading.Thread(target=work, name="bnb-hash-early", daemon=True).start()


def _answers_from_child(pending: dict[str, Future[str]]) -> None:
    """Run sha256_worker on the files; each answer settles (and leaves) ``pending``."""
    paths = list(pending)
    command = [sys.executable, "-I", sha256_worker.__file__, str(os.getpid()), str(_workers(len(paths))), *paths]
    try:
        child = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
    except (OSError, ValueError):  # no interpreter to run (an embedded Python): all hashed here
        return
    assert child.stdout is not None
    with child.stdout:
        for line in child.stdout:
            index, _, digest = line.rstrip("\n").partition("\t")
            path = paths[int(index)] if index.isdigit() and int(index) < len(paths) else ""
            future = pending.pop(path, None)
            if future is None:
                continue
            if len(digest) == 64 and future.set_running_or_notify_cancel():
                future.set_result(digest)
            else:  # "!": unreadable there; hashing it here reports the error the pipeline shows
                _settle(future, path)
    child.wait()


def _settle(future: Future[str], path: str) -> None:
    if future.set_running_or_notify_cancel():
        try:
            future.set_result(file_sha256(Path(path)))
        except BaseException as exc:  # the pipeline reports it, for the files it needs
            future.set_exception(exc)
            # exc's traceback holds this frame, and the frame the future: without this cycle the error (and
            # the frames below it) is freed with the future, not at the next full garbage collection
            del future


def _take_early(path: Path) -> Future[str] | None:
    with _early_lock:
        stamp, future = _early.pop(os.path.realpath(path), (None, None))
    try:
        return future if stamp is not None and stamp == _stamp(path) else None
    except OSError:
        return None


class FileHashes:
    """Starts hashing ``paths`` at once (or takes the hashes started early); ``result()`` waits and
    returns {str(path): sha256}."""

    def __init__(self, paths: list[Path], workers: int | None = None) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers or _workers(len(paths)), thread_name_prefix="bnb-hash")
        self._futures: dict[str, Future[str]] = {
            str(p): _take_early(p) or self._pool.submit(file_sha256, p) for p in paths
        }

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
