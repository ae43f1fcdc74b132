"""Whether a Ctrl-C (SIGINT) or a SIGTERM (a CI job cancelled, `docker stop`) came during this run, for
the places that must honor it even when Python lost the KeyboardInterrupt: raised inside a callback
(importlib's module-lock cleanup during a lazy import, a ``__del__``), it is reported as "Exception
ignored" and dropped, and the run went on to write OUT. The `bnb` command's signal handler notes it
here; committing an output and the pipeline's per-tensor loop check the note.

Both signals stop a run the same way (a KeyboardInterrupt, the temporary output removed, one line on
stderr); the exit code tells them apart, as a shell would: 130 for SIGINT, 143 for SIGTERM."""

from __future__ import annotations

import signal

from bnbcli.errors import EXIT_INTERRUPTED, EXIT_TERMINATED

_requested = False
_signum = signal.SIGINT  # the first signal that came decides the message and the exit code


def note(signum: int = signal.SIGINT) -> None:
    global _requested, _signum
    if not _requested:
        _signum = signal.Signals(signum)
    _requested = True


def requested() -> bool:
    return _requested


def check() -> None:
    """Raise KeyboardInterrupt if a Ctrl-C or SIGTERM came, whether or not its own exception got through."""
    if _requested:
        raise KeyboardInterrupt


def message() -> str:
    return "terminated (SIGTERM)" if _signum == signal.SIGTERM else "interrupted"


def exit_code() -> int:
    return EXIT_TERMINATED if _signum == signal.SIGTERM else EXIT_INTERRUPTED
