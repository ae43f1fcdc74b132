"""`bnb ARGS` run in this process through the CLI's main(), its one error boundary included: milliseconds
a run, where a new interpreter spends seconds importing torch. What huggingface_hub reads from the
environment at import (HF_HUB_OFFLINE, HF_ENDPOINT) needs a real process: tests/helpers/bnb_process.py."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bnbcli.cli.app import main


@dataclass(frozen=True)
class Ran:
    args: tuple[str, ...]
    code: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return f"bnb {' '.join(self.args)}\nexit {self.code}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"

    def error_and_hint(self) -> tuple[str, str]:
        """The two lines every failure prints on stderr, without their `error: `/`hint: ` labels."""
        lines = [line for line in self.stderr.splitlines() if not line.startswith(("warning: ", "fail: "))]
        assert len(lines) == 2, self
        assert lines[0].startswith("error: ") and lines[1].startswith("hint: "), self
        return lines[0].removeprefix("error: "), lines[1].removeprefix("hint: ")

    def document(self) -> dict[str, Any]:
        """The one JSON document on stdout (json.loads refuses anything after it)."""
        return json.loads(self.stdout)


def bnb_here(*args: str) -> Ran:
    out, err = io.StringIO(), io.StringIO()
    saved = sys.argv
    sys.argv = ["bnb", *args]
    code: Any = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as exc:
        code = exc.code
    finally:
        sys.argv = saved
    return Ran(args, code if isinstance(code, int) else (0 if code is None else 1), out.getvalue(), err.getvalue())


def quantize(src: Path, out: Path, *flags: str) -> Ran:
    """`bnb quantize SRC OUT -q FLAGS` here, which must succeed."""
    ran = bnb_here("quantize", str(src), str(out), "-q", *flags)
    assert ran.code == 0, ran
    return ran
