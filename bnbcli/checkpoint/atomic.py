"""An output folder that appears whole or not at all.

Everything is written into a temporary folder beside OUT (same filesystem, so the final rename is
atomic); a lock file keeps a second run off the same OUT; an interrupted run leaves no OUT, and its
temporary folder is swept away by the next run.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from types import TracebackType

from bnbcli import interrupts
from bnbcli.checkpoint.journal import JOURNAL_NAME
from bnbcli.errors import BnbError, InputError, OutputError

TMP_MARK = ".bnb-tmp-"
LOCK_MARK = ".bnb-lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class AtomicOutputDir:
    """``with AtomicOutputDir(out, overwrite) as tmp: …write into tmp…; commit()`` renames tmp to out."""

    def __init__(self, out: Path, overwrite: bool = False, resume: bool = False) -> None:
        self.out = out.absolute()
        self.overwrite = overwrite
        self.resume = resume
        self.adopted: Path | None = None  # the interrupted run's folder that this one continues
        self.parent = self.out.parent
        self.lock = self.parent / f".{self.out.name}{LOCK_MARK}"
        self.tmp = self.parent / f".{self.out.name}{TMP_MARK}{os.getpid()}"
        self.committed = False
        self.locked = False

    def __enter__(self) -> Path:
        if not self.parent.is_dir():
            raise InputError(f"the folder for {self.out} does not exist", hint=f"create {self.parent} first")
        if self.out.exists() and not self.overwrite:
            raise InputError(f"{self.out} already exists", hint="pass --overwrite to replace it, or choose another OUT")
        self._take_lock()
        try:
            self._sweep_stale()
            if self.adopted is not None:
                os.rename(self.adopted, self.tmp)
            else:
                self.tmp.mkdir()
        except OSError as exc:
            self._release_lock()
            raise InputError(
                f"cannot write in {self.parent}: {exc.strerror}", hint="check permissions and free space"
            ) from exc
        return self.tmp

    def _take_lock(self) -> None:
        for _ in range(2):
            try:
                fd = os.open(self.lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                try:
                    holder = int(self.lock.read_text().strip() or "0")
                except (OSError, ValueError):
                    holder = 0
                if holder and _pid_alive(holder):
                    raise InputError(
                        f"another bnb (pid {holder}) is writing {self.out}",
                        hint="wait for it to finish, or choose another OUT",
                    ) from None
                self.lock.unlink(missing_ok=True)  # a stale lock from a killed run
                continue
            except OSError as exc:
                raise InputError(f"cannot write in {self.parent}: {exc.strerror}", hint="check permissions") from exc
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            self.locked = True
            return
        raise InputError(f"cannot lock {self.out}", hint=f"remove {self.lock} if no bnb is running")

    def _release_lock(self) -> None:
        if self.locked:
            self.lock.unlink(missing_ok=True)
            self.locked = False

    def _sweep_stale(self) -> None:
        """Temporary folders of earlier runs on this OUT that died without cleaning up. With ``resume``
        the newest one that kept a journal is adopted instead (see checkpoint/journal.py)."""
        stale = []
        for folder in self.parent.glob(f".{self.out.name}{TMP_MARK}*"):
            pid = folder.name.rsplit("-", 1)[-1]
            if not pid.isdigit() or not _pid_alive(int(pid)) or int(pid) == os.getpid():
                stale.append(folder)
        if self.resume:
            resumable = [f for f in stale if "-old-" not in f.name and any(f.rglob(JOURNAL_NAME))]
            if resumable:
                self.adopted = max(resumable, key=lambda f: f.stat().st_mtime_ns)
        for folder in stale:
            if folder != self.adopted:
                shutil.rmtree(folder, ignore_errors=True)

    def commit(self) -> None:
        """Make the finished folder visible at OUT in one rename, unless a Ctrl-C came (even one whose
        KeyboardInterrupt Python dropped): then the caller's cleanup runs instead."""
        interrupts.check()
        for root, _, files in os.walk(self.tmp):
            for name in files:
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        if self.out.exists():
            trash = self.parent / f".{self.out.name}{TMP_MARK}old-{os.getpid()}"
            os.rename(self.out, trash)
            os.rename(self.tmp, self.out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(self.tmp, self.out)
        _fsync_dir(self.parent)
        self.committed = True

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self.committed:
            shutil.rmtree(self.tmp, ignore_errors=True)
        self._release_lock()
        if isinstance(exc, OSError) and not isinstance(exc, BnbError):
            # Reads raise InputError themselves, so an OSError here came from writing the output.
            raise OutputError(
                f"cannot write {self.out}: {_why(exc)}", hint=_WRITE_HINTS.get(exc.errno or 0, _HINT)
            ) from exc


_HINT = "check free space, file size limits (ulimit -f) and permissions where OUT goes"
_WRITE_HINTS = {
    errno.ENOSPC: "free some space where OUT goes, or write OUT on another disk",
    errno.EDQUOT: "your disk quota is full: free some space, or write OUT elsewhere",
    errno.EFBIG: "a file size limit stopped it (ulimit -f, or the filesystem's largest file): raise it, or "
    "use a smaller --max-shard-size",
    errno.EACCES: "you may not write where OUT goes: choose another OUT or fix the permissions",
    errno.EPERM: "you may not write where OUT goes: choose another OUT or fix the permissions",
    errno.EROFS: "OUT is on a read-only filesystem: choose another OUT",
}


def _why(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__
