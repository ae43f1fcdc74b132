"""The process's memory: what a command does once it has imported the library, before its work, and how
freed memory is kept for reuse.

The objects alive then (the modules, functions and tables of torch and the other libraries, some 170,000
the collector tracks) live as long as the process. ``gc.freeze`` moves them out of the collector's
generations: otherwise every full collection walks them all again, and a checkpoint of many tiny tensors,
whose plan, records and reports allocate millions of small objects, triggers many. On 10,000 tiny
tensors those walks took about a third of `bnb quantize`'s CPU time (BENCHMARKS.md, "many tiny tensors").
"""

from __future__ import annotations

import ctypes
import gc
import sys
from collections.abc import Iterator
from contextlib import contextmanager

_frozen = False


@contextmanager
def library_import() -> Iterator[None]:
    """Import the library (torch, …) inside: without garbage collection, then the objects alive are left
    out of every later one, once per process (a process that runs several commands, a test's, freezes
    only the first time).

    Collections during the import find almost nothing (~7,000 objects of the 176,000 it makes) and took
    0.2-0.3 s of it on the 2-core machine, a collection after it another 0.14 s (BENCHMARKS.md, "the
    library's import without garbage collection"); what little garbage the import leaves is kept."""
    global _frozen
    with collections_paused():
        yield
        if not _frozen:
            gc.freeze()
            _frozen = True


@contextmanager
def collections_paused() -> Iterator[None]:
    """No automatic garbage collection inside (a run: open, plan, convert, manifest); as it was after.

    A run keeps what it makes until its end (the plan, a record per tensor, the manifest), and frees its
    transient objects by reference counting: on 50,000 and 200,000 tiny tensors no full collection found
    any garbage, yet each walked every record and plan object again, one more every ~25 % growth, and
    batches in flight promoted enough to trigger them every ~0.4 s: 4 s of `bnb quantize`'s 16 s of CPU
    at 50k, 19 s of 64 s at 200k (BENCHMARKS.md, "Issue 17 item 3, round 4"). A cycle made meanwhile
    (an error's traceback) waits for the next collection after the run, which the process's end
    usually makes unnecessary."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for its adaptive threshold
TRIM_THRESHOLD = 1 << 30


def reuse_freed_memory() -> None:
    """Blocks under 32 MiB come from the heap and stay there once freed, to be reused, instead of being
    mapped fresh and given back each time (glibc's defaults, as its adaptive thresholds settle, still
    return the top of the heap once 2 such blocks are free). Every weight's round trip allocates float64
    buffers of ~20 MB; touching new pages for them took a third of the sums' time, and most of
    `bnb quantize`'s system time (8-layer Llama nf4-dq, in-process: 1.1 s -> 0.4 s, BENCHMARKS.md). The peak
    resident memory stays what it was; larger blocks (whole tensors) are still mapped and returned.
    Linux with glibc only; elsewhere nothing changes."""
    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
