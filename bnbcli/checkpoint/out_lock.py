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

from bnbcli import interrupts

_OPEN = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)


class LockBusy(Exception):
    """Another process holds the lock; ``holder`` is its pid, when it has written it yet."""

    def __init__(self, holder: int | None) -> None:
        super().__init__(holder)
        self.holder = holder


class OutLock:
    """The lock file at ``path``. The open descriptor is kept on the object from the moment it exists,
    so that ``release`` cleans up after an ``acquire`` that a Ctrl-C cut short anywhere."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> None:
        """Lock the file (made if missing) and write our pid in it; ``LockBusy`` when another process holds
        it. OSError when the folder cannot hold the file."""
        with interrupts.held():  # the file made is ours to remove only once self.fd holds it
            self._acquire()

    def _acquire(self) -> None:
        while True:
            self.fd = os.open(self.path, _OPEN, 0o644)
            if not filelock.lock_descriptor(self.fd, blocking=False):
                holder = _holder(self.fd)
                self.release()
                raise LockBusy(holder)
            if _is_at(self.fd, self.path):
                os.ftruncate(self.fd, 0)
                os.write(self.fd, str(os.getpid()).encode())
                return
            self.release()  # its holder removed it between our open and our lock: lock the path's new file

    def release(self) -> None:
        """Remove the lock file if this run holds its lock, or no run does (one this run made an instant ago),
        then close it (which unlocks it). Removing it first, while locked, is what makes the retry in
        ``acquire`` sound. Does nothing when nothing is open."""
        with interrupts.held():
            self._release()

    def _release(self) -> None:
        if self.fd is None:
            return
        try:
            if filelock.lock_descriptor(self.fd, blocking=False) and _is_at(self.fd, self.path):
                self.path.unlink()
        except OSError:  # already gone, or Windows, which removes no open file: the next run locks it as it is
            pass
        finally:
            fd, self.fd = self.fd, None
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
