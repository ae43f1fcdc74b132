"""What a command does once it has imported the library, before its work.

The objects alive then (the modules, functions and tables of torch and the other libraries, some 170,000
the collector tracks) live as long as the process. ``gc.freeze`` moves them out of the collector's
generations: otherwise every full collection walks them all again, and a checkpoint of many tiny tensors,
whose plan, records and reports allocate millions of small objects, triggers many. On 10,000 tiny
tensors those walks took about a third of `bnb quantize`'s CPU time (BENCHMARKS.md, "many tiny tensors").
"""

from __future__ import annotations

import gc

_frozen = False


def library_imported() -> None:
    """Leave the objects alive now out of every later garbage collection, once per process (a process
    that runs several commands, a test's, freezes only the first time). Garbage is collected first, so
    that none is kept for good."""
    global _frozen
    if not _frozen:
        gc.collect()
        gc.freeze()
        _frozen = True
