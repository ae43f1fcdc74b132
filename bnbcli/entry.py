"""The `bnb` console script. Importing the command line takes seconds (torch); a Ctrl-C meanwhile is an
interruption like any other: one line and exit 130, not a traceback from inside an import."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from typing import NoReturn

from bnbcli import interrupts, timeline  # timeline first: its clock starts at its import
from bnbcli.checkpoint.hashing import hash_sources_early
from bnbcli.errors import EXIT_INTERRUPTED
from bnbcli.planning.isolated import start_early


def _on_sigint(signum: int, frame: object) -> None:
    interrupts.note()
    raise KeyboardInterrupt


def _unraisable(unraisable: sys.UnraisableHookArgs) -> None:
    """A KeyboardInterrupt that Python could not raise (see bnbcli.interrupts) is honored later through
    the note; its "Exception ignored" report would only be noise."""
    if not isinstance(unraisable.exc_value, KeyboardInterrupt):
        sys.__unraisablehook__(unraisable)


def main() -> None:
    # torch's CUDA allocator grows segments in place instead of caching one block per size: weights of
    # many sizes stream through the GPU, and fixed blocks left hundreds of MB reserved and unused.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    # torch's OpenMP threads busy-wait for the next parallel region by default (libgomp spins for
    # milliseconds). On a machine shared with other processes that spinning takes the cores' time, and
    # each region then waits for a thread the scheduler has put aside: 8 bf16 4096x4096 weights to
    # nf4-dq took 92-106 s on a loaded 2-core machine, and 15-19 s with threads that sleep when they
    # wait (BENCHMARKS.md, issue 17). It must be set before torch loads libgomp; a user's setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Python's own handler only raises KeyboardInterrupt, which native code running an import (torch's
    # initialisation) can swallow: the run then carried on as if no Ctrl-C had come. Ours also keeps a
    # note. A shell's background job, which ignores SIGINT, keeps ignoring it.
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)
        sys.unraisablehook = _unraisable
    try:
        start_early(sys.argv[1:])  # the planner's child imports transformers while we import torch
        hash_sources_early(sys.argv[1:])  # and the source shards' sha256 run meanwhile too
        from bnbcli.cli.main import main as run

        timeline.mark("imported")
    except KeyboardInterrupt:
        interrupted_exit()
    except BaseException:
        # A Ctrl-C that cut an extension module's import short (its KeyboardInterrupt lost, see
        # bnbcli.interrupts) leaves that module half-made, and the next import of it fails instead.
        if interrupts.requested():
            interrupted_exit()
        raise
    if interrupts.requested():
        interrupted_exit()
    try:
        run()
    finally:
        # The run is over, its outcome reported: a Ctrl-C now, while Python exits, changes nothing.
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def interrupted_exit(printed: bool = False) -> NoReturn:
    """Exit 130 at once, once the run has cleaned up after itself: an import that a Ctrl-C cut short can
    leave native threads behind that abort a normal interpreter exit ("terminate called ...")."""
    if not printed:
        sys.stderr.write("error: interrupted\n")
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing left to say
            stream.flush()
    os._exit(EXIT_INTERRUPTED)
