"""`bnb ARGS` run in this process through the CLI's main(), its one error boundary included: milliseconds
a run, where a new interpreter spends seconds importing torch. What huggingface_hub reads from the
environment at import (HF_HUB_OFFLINE, HF_ENDPOINT) needs a real process: tests/helpers/bnb_process.py."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
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


# Run in a new interpreter by bnb_in_one_process: each command through main(), with the process's own stdout
# and stderr (file descriptors 1 and 2) sent to files of its own, so that whatever reaches them (a library's
# logging or warnings, output below Python) counts as that command's output, as it would in a process of its own.
_CHILD = """
import json, os, sys
from bnbcli.cli.app import main
results, runs = sys.argv[1], json.loads(sys.argv[2])
ran = []
for i, args in enumerate(runs):
    out, err, saved = f"{results}.{i}.out", f"{results}.{i}.err", (os.dup(1), os.dup(2))
    with open(out, "w") as o, open(err, "w") as e:
        os.dup2(o.fileno(), 1), os.dup2(e.fileno(), 2)
        sys.argv, code = ["bnb", *args], 0
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
    ran.append({"args": args, "code": code, "stdout": open(out).read(), "stderr": open(err).read()})
with open(results, "w") as f:
    json.dump(ran, f)
"""


def bnb_in_one_process(runs: list[tuple[str, ...]], env: dict[str, str], results: Path) -> list[Ran]:
    """Several `bnb` commands, one after the other through main() in one new interpreter with ``env``: what
    huggingface_hub reads from the environment at import (HF_HUB_OFFLINE, HF_ENDPOINT, HF_HUB_CACHE) is read
    there as a user's `bnb` reads it, and torch and transformers are imported once for them all. An exception
    that escapes main() ends that interpreter, and the test with it. ``results``: a file name to use."""
    from helpers.bnb_process import HANG_SECONDS, bnb_env

    command = [sys.executable, "-c", _CHILD, str(results), json.dumps(runs)]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=HANG_SECONDS, env=bnb_env() | env, stdin=subprocess.DEVNULL
    )
    assert done.returncode == 0 and done.stdout == done.stderr == "", done.stderr
    return [Ran(tuple(ran.pop("args")), **ran) for ran in json.loads(results.read_text())]
