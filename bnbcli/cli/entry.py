"""The `bnb` console script, and how it stops on Ctrl-C (SIGINT) or SIGTERM: one line, exit 130 or 143,
nothing left behind, and never an abort from inside an import.

A KeyboardInterrupt raised while Python runs an import can land inside native code: while torch is
still initialising, its C++ (``_c10d_init``, ``_initExtension``, op registration) imports modules, and
Python runs importlib's module-lock code for it. Raised there, the exception goes back into C++ as
``python_error`` or ``pybind11::error_already_set``, which it cannot unwind: std::terminate, a stack dump,
SIGABRT (rare when Ctrl-C comes by chance: 1 of ~370 in the first 1.6 s of a run here, 2 of ~60 in the
report; tests/cli/test_signals.py makes it happen every time). So the handler never raises inside an import:

- until the command line is imported (torch included) nothing has been written: it exits at once;
- later, inside an import (transformers, when the planner runs in this process), it notes the signal,
  and a thread sends it again once the import is over, to be raised outside it;
- otherwise it raises KeyboardInterrupt, and the run cleans up on the way out (bnbcli.interrupts keeps
  a note for the places that must honor one Python lost).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading
import time
from types import FrameType
from typing import NoReturn

from bnbcli import interrupts, timeline  # timeline first: its clock starts at its import
from bnbcli.cli import heap

SIGNALS = (signal.SIGINT, signal.SIGTERM)
IMPORT_POLL_SECONDS = 0.02

_imported = False  # the command line is imported: from here on a run may have files to clean up
_deferred = threading.Event()  # a signal came inside an import and waits for its end
_deferred_signum = signal.SIGINT


def _importing(frame: FrameType | None) -> bool:
    """Whether ``frame`` runs inside an import (importlib's frames are below it)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def watch_deferred_signals() -> None:
    """Start the thread that sends a deferred signal again once the main thread has left every import.
    Started beforehand, so that the handler itself only sets an event (starting a thread from a signal
    handler could wait for a lock the interrupted code holds)."""

    def watch() -> None:
        main = threading.main_thread().ident or 0
        while True:
            _deferred.wait()
            while _importing(sys._current_frames().get(main)):
                time.sleep(IMPORT_POLL_SECONDS)
            _deferred.clear()
            os.kill(os.getpid(), _deferred_signum)

    threading.Thread(target=watch, name="bnb-signals", daemon=True).start()


def _on_signal(signum: int, frame: FrameType | None) -> None:
    global _deferred_signum
    interrupts.note(signum)
    if not _imported:
        interrupted_exit()
    if interrupts.hold_if_held():
        return
    if _importing(frame):
        _deferred_signum = signal.Signals(signum)
        _deferred.set()
        return
    raise KeyboardInterrupt


def _unraisable(unraisable: sys.UnraisableHookArgs) -> None:
    """A KeyboardInterrupt that Python could not raise (see bnbcli.interrupts) is honored later through
    the note; its "Exception ignored" report would only be noise."""
    if not isinstance(unraisable.exc_value, KeyboardInterrupt):
        sys.__unraisablehook__(unraisable)


def main() -> None:
    global _imported
    # torch's CUDA allocator grows segments in place instead of caching one block per size: weights of
    # many sizes stream through the GPU, and fixed blocks left hundreds of MB reserved and unused.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    # torch's OpenMP threads busy-wait for the next parallel region by default (libgomp spins for
    # milliseconds). On a machine shared with other processes that spinning takes the cores' time, and
    # each region then waits for a thread the scheduler has put aside: 8 bf16 4096x4096 weights to
    # nf4-dq took 92-106 s on a loaded 2-core machine, and 15-19 s with threads that sleep when they
    # wait (BENCHMARKS.md, issue 17). It must be set before torch loads libgomp; a user's setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    heap.reuse_freed_memory()
    # A signal that was ignored when we started stays ignored (a shell's background job ignores SIGINT).
    for signum in SIGNALS:
        if signal.getsignal(signum) in (signal.default_int_handler, signal.SIG_DFL):
            signal.signal(signum, _on_signal)
    sys.unraisablehook = _unraisable
    from bnbcli.cli.app import main as run  # imported once the handlers are in place

    timeline.mark("imported")
    watch_deferred_signals()
    _imported = True
    try:
        run()
    except KeyboardInterrupt:  # a signal while the outcome was being reported (an error line, say)
        interrupted_exit()
    finally:
        # The run is over, its outcome reported: a signal now, while Python exits, changes nothing.
        for signum in SIGNALS:
            signal.signal(signum, signal.SIG_IGN)


def console() -> NoReturn:
    """The `bnb` script (and `python -m bnbcli`): ``main()``, then exit as ``sys.exit`` would but without
    the interpreter's teardown. Once a run is over, freeing its objects one by one (a plan and a record
    per tensor) only delays the exit: 200,000 tiny tensors took 6 s more (BENCHMARKS.md, "many tiny
    tensors"). The exit handlers (``atexit``) still run and the output is flushed; every file the run
    wrote is closed (and synced) by then."""
    code: object = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # sys.exit("message"): printed, status 1
        print(code, file=sys.stderr)
        status = 1
    atexit._run_exitfuncs()  # what Python's own exit runs (torch's and others' handlers)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that went away: nothing left to say, as ever
            status = status or 1
    os._exit(status)


def interrupted_exit(printed: bool = False) -> NoReturn:
    """Exit 130 (143 for SIGTERM) at once, once the run has cleaned up after itself: an import that a
    signal cut short can leave native threads behind that abort a normal interpreter exit. Also called
    from the signal handler, so the line is written straight to the file descriptor: the handler may
    have stopped the main thread in the middle of a write to sys.stderr."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, RuntimeError):  # closed, or that reentrant write
            stream.flush()
    if not printed:
        with contextlib.suppress(OSError):  # a closed pipe: nothing left to say
            os.write(2, f"error: {interrupts.message()}\n".encode())
    os._exit(interrupts.exit_code())
