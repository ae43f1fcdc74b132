"""One writer per OUT: an exclusive lock on the file ``.OUT.bnb-lock`` beside it, held while a run writes.

The lock is filelock's native lock on an open descriptor (``flock`` on Unix, ``LockFileEx`` on Windows),
which the kernel drops when its holder exits, however it dies: a lock file left by a killed run blocks
no one, the next run simply locks it. The holder writes its pid into the file (for the message a second
run prints) and removes the file on release *before* unlocking it. A run that opened the old file in
the meantime finds, once it has the lock, that the file is no longer at the path, and starts again on
the path's new file: two runs never hold locks on two different files.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import filelock

_OPEN = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)


class LockBusy(Exception):
    """Another process holds the lock; ``holder`` is its pid, when it has written it yet."""

    def __init__(self, holder: int | None) -> None:
        super().__init__(holder)
        self.holder = holder


def acquire(path: Path) -> int:
    """Lock ``path`` (made if missing) and return the descriptor that holds the lock; ``LockBusy`` when
    another process holds it. OSError when the folder cannot hold the file."""
    while True:
        fd = os.open(path, _OPEN, 0o644)
        try:
            if not filelock.lock_descriptor(fd, blocking=False):
                raise LockBusy(_holder(fd))
            if _is_at(fd, path):
                os.ftruncate(fd, 0)
                os.write(fd, str(os.getpid()).encode())
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # its holder removed it between our open and our lock: lock the path's new file


def release(path: Path, fd: int) -> None:
    """Remove the lock file, then unlock it (closing the descriptor unlocks it)."""
    try:
        if _is_at(fd, path):  # nobody else removes it while we hold the lock
            path.unlink()
    except OSError:  # already gone, or Windows, which removes no open file: the next run locks it as it is
        pass
    finally:
        os.close(fd)


def _is_at(fd: int, path: Path) -> bool:
    """Whether the open file is still the one at ``path``."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
    except FileNotFoundError:
        return False


def _holder(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        os.lseek(fd, 0, os.SEEK_SET)
        return int(os.read(fd, 32).strip()) or None
    return None
