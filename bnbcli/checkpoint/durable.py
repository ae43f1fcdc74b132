"""Small files that are whole after a crash: the old content or the new one, never a mix or a stub.

Every JSON file bnb writes goes through ``atomic_file``: the plan cache, the manifest, config.json, the
shard index and the journal's first write (its later lines are appended: checkpoint/journal.py). The bytes
go to a temporary file in the same folder (so the rename stays on one filesystem), are flushed and fsync'd,
then renamed onto the target in one step (``os.replace``: atomic on POSIX and Windows); last, the folder is
fsync'd so that the rename itself is on disk. A failed write removes its temporary file and leaves the
target as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)


def fsync_dir(path: Path) -> None:
    """Put a folder's entries (a rename, a new file) on disk; a no-op where folders cannot be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(path: Path, tmp: Path | None = None) -> Iterator[BinaryIO]:
    """A binary file that replaces ``path`` whole when the block ends, or not at all if it raises. ``tmp``
    is the temporary file's name, by default one of this process and thread, so concurrent writers never
    share one."""
    tmp = tmp or path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        try:
            fd = os.open(tmp, _CREATE, 0o666)  # O_EXCL: never follows a link, never truncates a stranger's file
        except FileExistsError:  # left by a killed process that had our pid
            tmp.unlink()
            fd = os.open(tmp, _CREATE, 0o666)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def write_atomically(path: Path, data: str | bytes, tmp: Path | None = None) -> None:
    """Replace ``path`` with ``data`` (a str is written as UTF-8) whole or not at all."""
    with atomic_file(path, tmp) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


def write_json(path: Path, document: Any, *, indent: int | None = None) -> None:
    """``document`` as JSON with a trailing newline, through ``write_atomically``."""
    write_atomically(path, json.dumps(document, indent=indent) + "\n")
