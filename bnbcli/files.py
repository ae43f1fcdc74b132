"""Single files that bnb writes on request (`bnb inspect --report FILE`): checked before any work, and
written whole or not at all."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from bnbcli.errors import OutputError


def _cannot(path: Path, option: str, why: object) -> OutputError:
    return OutputError(
        f"{option} {path}: cannot write it: {why}", hint=f"give {option} a file in a folder you can write"
    )


def check_writable(path: Path, option: str) -> None:
    """Fail now, not after minutes of work, when ``path`` cannot be written: the only true test is to
    make a file beside it (a read-only filesystem, permissions, a missing folder), which is removed."""
    if path.is_dir():
        raise _cannot(path, option, "it is a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".bnb-check"):
            pass
    except OSError as e:
        raise _cannot(path, option, e.strerror or e) from None


def write_text_file(path: Path, text: str, option: str) -> None:
    """Write ``text`` to ``path`` through a temporary file beside it: a full disk leaves the old file, or none."""
    tmp = None
    try:
        with tempfile.NamedTemporaryFile(
            "w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.", suffix=".bnb-tmp", delete=False
        ) as f:
            tmp = f.name
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise _cannot(path, option, e.strerror or e) from None
