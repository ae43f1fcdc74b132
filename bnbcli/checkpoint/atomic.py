"""An output folder that appears whole or not at all, and what an output may replace.

Everything is written into a temporary folder beside OUT (same filesystem, so the final rename is
atomic); a lock file keeps a second run off the same OUT; an interrupted run leaves no OUT, and its
temporary folder is swept away by the next run. An existing OUT is replaced (with --overwrite) only
when it is a folder bnb wrote, recognised by its manifest, or an empty folder: never a file, a link, a
device, someone's folder, the current folder or the home folder (``check_replaceable``). A single
output file (`bnb inspect --report`) follows the same rule through ``write_file``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from pathlib import Path
from types import TracebackType

from bnbcli import interrupts
from bnbcli.checkpoint.journal import JOURNAL_NAME
from bnbcli.checkpoint.manifest import MANIFEST_NAME
from bnbcli.errors import BnbError, InputError, OutputError

TMP_MARK = ".bnb-tmp-"
LOCK_MARK = ".bnb-lock"
OLD_MARK = "old-"  # the replaced OUT, renamed aside until it is removed: .OUT.bnb-tmp-old-PID
PID_DIGITS = 7  # Linux's largest pid (4194304) has 7 digits

_KINDS = {
    stat.S_IFDIR: "a folder",
    stat.S_IFLNK: "a link",
    stat.S_IFREG: "a file",
    stat.S_IFCHR: "a device",
    stat.S_IFBLK: "a device",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
}


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


def check_name_length(path: Path) -> None:
    """bnb writes beside ``path`` under a longer name (``.NAME.bnb-tmp-old-PID``): refuse a name that
    leaves no room for it, before anything looks at the path (the filesystem answers ENAMETOOLONG)."""
    try:
        name_max = os.pathconf(path.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    room = name_max - len(f".{TMP_MARK}{OLD_MARK}") - PID_DIGITS
    if len(os.fsencode(path.name)) > room:
        raise OutputError(
            f"cannot write {path}: name too long",
            hint=f"choose a name of at most {room} bytes (bnb writes beside it under the name plus "
            f"{name_max - room} bytes)",
        )


def _protected() -> dict[Path, str]:
    """Folders never replaced, whatever they hold, with the reason."""
    found = {Path("/"): "is the root folder"}
    with contextlib.suppress(RuntimeError, KeyError, OSError):  # no home folder to be found
        found[Path.home().resolve()] = "is the home folder"
    with contextlib.suppress(OSError):  # the current folder was removed
        cwd = Path.cwd().resolve()
        found[cwd] = "is the current folder"
        for parent in cwd.parents:
            found.setdefault(parent, "holds the current folder")
    return found


def check_replaceable(path: Path, signature: bytes | None = None) -> None:
    """Raise unless ``path``, which exists, is an output bnb may replace. A folder (``signature``
    None): one that holds bnb's manifest, or an empty one. A file: a regular file that is empty or
    begins with ``signature``. Never anything else: a link (it would be replaced, not followed), a
    device, a FIFO, a socket, the current folder, one that holds it, the home folder."""
    folder = signature is None
    try:
        why = _why_not_replaceable(path, signature)
    except OSError as e:
        why = f"cannot be read ({e.strerror or e})"
    if why is None:
        return
    hint = (
        f"choose another OUT: --overwrite replaces only a folder bnb wrote (with its {MANIFEST_NAME}) or an empty one"
        if folder
        else "choose another file name: bnb replaces only a file it wrote, or an empty one"
    )
    raise InputError(f"{path} already exists and {why}", hint=hint)


def _why_not_replaceable(path: Path, signature: bytes | None) -> str | None:
    mode = os.lstat(path).st_mode
    if signature is None:
        if not stat.S_ISDIR(mode):
            return f"is {_KINDS.get(stat.S_IFMT(mode), 'a special file')}, not a folder"
        if why := _protected().get(path.resolve()):
            return why
        manifest = path / MANIFEST_NAME
        if (manifest.is_file() and not manifest.is_symlink()) or not any(path.iterdir()):
            return None
        return f"bnb did not write it (no {MANIFEST_NAME} in it)"
    if not stat.S_ISREG(mode):
        return f"is {_KINDS.get(stat.S_IFMT(mode), 'a special file')}, not a file"
    with open(path, "rb") as f:
        head = f.read(len(signature))
    return None if head in (b"", signature) else "bnb did not write it"


def check_output_file(path: Path, signature: bytes, option: str) -> None:
    """Raise unless ``write_file(path, …, signature, option)`` may write there: before the work, to fail
    early. The only true test of the folder (read-only, permissions, missing) is to make the temporary
    file there."""
    check_name_length(path)
    if os.path.lexists(path):
        check_replaceable(path, signature)
    probe = _tmp_file(path)
    try:
        with open(probe, "xb"):
            pass
        probe.unlink()
    except OSError as exc:
        raise _cannot_write(path, option, exc) from exc


def write_file(path: Path, data: bytes, signature: bytes, option: str) -> None:
    """Write ``path`` (given as ``option``) whole or not at all: into a temporary file beside it, renamed
    onto it. An existing ``path`` is replaced only when bnb wrote it (it begins with ``signature``) or it
    is empty."""
    check_output_file(path, signature, option)
    tmp = _tmp_file(path)
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError):
            raise _cannot_write(path, option, exc) from exc
        raise


def _tmp_file(path: Path) -> Path:
    return path.parent / f".{path.name}{TMP_MARK}{os.getpid()}"


def _cannot_write(path: Path, option: str, exc: OSError) -> OutputError:
    return OutputError(
        f"{option} {path}: cannot write it: {_why(exc)}", hint=f"give {option} a file in a folder you can write"
    )


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
        self.trash = self.parent / f".{self.out.name}{TMP_MARK}{OLD_MARK}{os.getpid()}"
        self.committed = False
        self.locked = False

    def __enter__(self) -> Path:
        check_name_length(self.out)
        if not self.parent.is_dir():
            raise InputError(f"the folder for {self.out} does not exist", hint=f"create {self.parent} first")
        self._check_out()
        made = False
        try:  # nothing of ours stays if this is cut short (a signal comes back once an import ends)
            self._take_lock()
            self._sweep_stale()
            if self.adopted is not None:
                os.rename(self.adopted, self.tmp)
            else:
                self.tmp.mkdir()
                made = True
        except BaseException as exc:
            if made:
                shutil.rmtree(self.tmp, ignore_errors=True)
            self._release_lock()
            if isinstance(exc, OSError):
                raise InputError(
                    f"cannot write in {self.parent}: {exc.strerror}", hint="check permissions and free space"
                ) from exc
            raise
        return self.tmp

    def _check_out(self) -> None:
        """OUT must not exist, or with --overwrite be a folder bnb may replace."""
        if not os.path.lexists(self.out):
            return
        check_replaceable(self.out)
        if not self.overwrite:
            raise InputError(f"{self.out} already exists", hint="pass --overwrite to replace it, or choose another OUT")

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
            self.locked = True  # ours from here, even if a signal cuts the write short
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
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
        prefix = f".{self.out.name}{TMP_MARK}"
        for folder in (p for p in self.parent.iterdir() if p.name.startswith(prefix)):  # the name is no pattern
            pid = folder.name.rsplit("-", 1)[-1]
            if not pid.isdigit() or not _pid_alive(int(pid)) or int(pid) == os.getpid():
                stale.append(folder)
        if self.resume:
            runs = [f for f in stale if not f.name[len(prefix) :].startswith(OLD_MARK)]  # not a replaced OUT
            resumable = [f for f in runs if any(f.rglob(JOURNAL_NAME))]
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
        self._check_out()  # again: OUT may have appeared or changed while this run wrote
        if os.path.lexists(self.out):
            os.rename(self.out, self.trash)
            os.rename(self.tmp, self.out)
            shutil.rmtree(self.trash, ignore_errors=True)
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
