"""Whether a Ctrl-C came during this run, for the places that must honor it even when Python lost the
KeyboardInterrupt: raised inside a callback (importlib's module-lock cleanup during a lazy import, a
``__del__``), it is reported as "Exception ignored" and dropped, and the run went on to write OUT.
The `bnb` command's SIGINT handler notes it here; committing an output and the pipeline's per-tensor
loop check the note."""

from __future__ import annotations

_requested = False


def note() -> None:
    global _requested
    _requested = True


def requested() -> bool:
    return _requested


def check() -> None:
    """Raise KeyboardInterrupt if a Ctrl-C came, whether or not its own exception got through."""
    if _requested:
        raise KeyboardInterrupt
