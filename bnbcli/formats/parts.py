"""The CPU fast paths' threads: a tensor cut once into contiguous parts, one thread per part.

Why not torch's own intra-op threads: the fast paths walk a tensor in cache-sized chunks, about twenty
small torch ops per chunk, well over a thousand for a 4096x4096 weight. With torch's OpenMP threads
every one of those ops is a parallel region ending in a barrier, so every op waits until all of
torch's threads have been on a core at the same time. On a quiet machine that costs little. On a
shared one it is ruinous: libgomp's idle threads busy-wait between regions, so to the kernel's
scheduler they look like CPU hogs, and once other processes fill the cores the thread a barrier
waits for is off its core for a time slice (milliseconds) — per op. A 4096x4096 nf4 call took 3.1 s
instead of 40 ms with a CPU burner on each core (BENCHMARKS.md, issue 17).

Here every torch op of a part runs on the thread that calls it (torch's intra-op threads set to one
for the duration), and the parts run side by side on our own threads, which sleep when they wait:
the only synchronisation is the join at the end, and a thread the kernel preempts delays its own part,
not every op of the others. Each block (or row) is computed on its own, so the bytes do not depend on
how the tensor was cut or on how many threads there are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from itertools import pairwise

import torch


def split(count: int, unit: int, parts: int) -> list[tuple[int, int]]:
    """[start, stop) ranges covering [0, count), at most ``parts`` of them, each a whole number of
    ``unit``s (the last may end short), as even as whole units allow."""
    units = -(-count // unit)
    parts = max(1, min(parts, units))
    bounds = [min(count, units * i // parts * unit) for i in range(parts + 1)]
    return list(pairwise(bounds))


@contextmanager
def _torch_single_threaded() -> Iterator[int]:
    """torch ops run on the calling thread (and on threads that first use torch meanwhile); yields
    the thread count that was set, which is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield threads
    finally:
        torch.set_num_threads(threads)


def for_each_part(work: Callable[[int, int], None], count: int, unit: int) -> None:
    """``work(start, stop)`` over [0, count) cut into parts of whole ``unit``s, one part per torch
    thread (``torch.get_num_threads()``), all at once; the first part on the calling thread.

    ``work`` must write only its own part of the results: the parts run concurrently."""
    with _torch_single_threaded() as threads:
        first, *others = split(count, unit, threads)
        if not others:
            work(*first)
            return
        with ThreadPoolExecutor(len(others), thread_name_prefix="bnb-cpu-part") as pool:
            running = [pool.submit(work, *part) for part in others]
            work(*first)
            for part in running:
                part.result()
