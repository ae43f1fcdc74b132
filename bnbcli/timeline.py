"""Milestones of a run, in seconds since the process started `bnb` (since this module was first imported):
where the time of a run goes, between start-up, planning and the stages, which stage_seconds alone
cannot say since the stages overlap. Recorded in the manifest's "run" section and printed by ``-v``."""

from __future__ import annotations

import threading
import time

_started = time.monotonic()
_marks: dict[str, float] = {}
_lock = threading.Lock()


def mark(name: str) -> None:
    """Note that ``name`` happened now, unless it already did in this run (so "first ..." stays first)."""
    with _lock:
        _marks.setdefault(name, round(time.monotonic() - _started, 3))


def mark_again(name: str) -> None:
    """Note that ``name`` happened now, replacing an earlier note (so "last ..." ends up last)."""
    with _lock:
        _marks[name] = round(time.monotonic() - _started, 3)


def new_run() -> None:
    """Forget the marks of an earlier run in this process (a library caller's second run); start-up stays."""
    with _lock:
        for name in [n for n in _marks if n != "imported"]:
            del _marks[name]


def marks() -> dict[str, float]:
    with _lock:
        return dict(sorted(_marks.items(), key=lambda item: item[1]))
