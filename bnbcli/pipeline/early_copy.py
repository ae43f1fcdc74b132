"""The pass-through tensors written while torch imports.

A kept tensor whose output is its source as it is (same dtype: no cast, no transpose) needs no torch:
its bytes go from the source file to their planned place in OUT's temporary shard, with their sha256
on the way. On the GPU machine `import torch` took 3.1-4.0 s of an 8B model's 7.4-8.2 s run, before a
byte was read, and the run after it was bound by writing 5.7 GB; the embeddings and the output head
are 2.1 GB of those. So when the plan came without torch (the planner table, the plan cache or the name
rules), `bnb quantize` enters the output folder and starts ``EarlyCopy``'s thread, then imports torch.
The executor writes everything else into the same files (``ShardWriter(prewritten=…)``) and takes these
tensors' sha256 from here, waiting for the thread, before it finishes, syncs or journals a shard.

No torch here: this module is imported before it.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from types import TracebackType

from bnbcli import interrupts, timeline
from bnbcli.checkpoint.atomic import AtomicOutputDir
from bnbcli.checkpoint.safetensors_file import open_tensor_file, read_range
from bnbcli.checkpoint.writer import WritebackSpans, start_writeback
from bnbcli.plan.quantize_layout import ComponentPlan, QuantizePlan, TensorJob

# Read, hashed and written a piece at a time; a stop request waits for one piece at most. Each piece takes
# the GIL back three times from a torch import that holds it for up to 5 ms each time: 4 MiB pieces kept
# the copy of an 8B model's 2.1 GB of kept tensors running to the end of the run on an H100 (6.4-6.6 s),
# 64 MiB pieces finish it at 4.4 s (BENCHMARKS.md, 2026-12-07).
CHUNK_BYTES = 64 << 20


def passes_through(job: TensorJob) -> bool:
    """Whether the output entry of ``job`` is its source bytes as they are."""
    return not job.quantized and job.dtype == job.source.dtype


def worthwhile(plan: QuantizePlan) -> bool:
    """An early copy pays when torch is still to be imported (the plan needed none) and there is
    something to copy; with torch loaded already (a library caller) the run is as before."""
    return "torch" not in sys.modules and any(passes_through(j) for c in plan.components for j in c.jobs)


@dataclass
class EarlyShards:
    """What the executor sees of one component's early copy: the jobs it copies, by shard, and their
    sha256 once it is done."""

    jobs: dict[str, list[TensorJob]] = field(default_factory=dict)
    copy: EarlyCopy | None = None
    component: str = ""

    def keys(self, shard: str) -> frozenset[str]:
        return frozenset(j.source.name for j in self.jobs.get(shard, []))

    def sha256(self) -> dict[str, str]:
        """Entry key → sha256 of every tensor copied, after waiting for the copy (its error raised here)."""
        if self.copy is None:
            return {}
        self.copy.wait()
        return self.copy.digests.get(self.component, {})


class _Stopped(Exception):
    """The run ended before the copy did: leave the rest."""


class EarlyCopy:
    """``with EarlyCopy(plan, output): …`` enters ``output`` (the same lock and temporary-folder rules as
    ever) and copies the plan's pass-through tensors into it from a thread, unless the output folder is
    an interrupted run's that ``--resume`` continues (its shards are the journal's business). Leaving
    stops the thread and waits for it before the output folder is left (and removed, if not committed)."""

    def __init__(self, plan: QuantizePlan, output: AtomicOutputDir) -> None:
        self.plan = plan
        self.output = output
        self.jobs: dict[str, dict[str, list[TensorJob]]] = {}  # component → shard → jobs
        self.digests: dict[str, dict[str, str]] = {}  # component → key → sha256
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bnb-early-copy", daemon=True)
        self._buffer = memoryview(b"")  # the thread's one buffer, as large as the largest piece it copies

    def __enter__(self) -> EarlyCopy:
        self.output.__enter__()
        try:  # a Ctrl-C from here on (Thread.start waits for the thread) leaves through __exit__
            if self.output.adopted is None:
                largest = 0
                for component in self.plan.components:
                    shards = self.jobs.setdefault(component.name, {})
                    for job in filter(passes_through, component.jobs):
                        shards.setdefault(job.shard, []).append(job)
                        largest = max(largest, job.source.nbytes)
                self._buffer = memoryview(bytearray(min(CHUNK_BYTES, largest)))
                # A signal inside Thread.start could leave a running thread that is_alive() does not yet
                # report, which __exit__ would then not wait for: it is raised once start() has returned.
                with interrupts.held():
                    self._thread.start()
        except BaseException as exc:
            self.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    def shards(self, component: str) -> EarlyShards:
        return EarlyShards(self.jobs.get(component, {}), self, component)

    def check(self) -> None:
        """Raise the copy's error now if it already failed (a full disk stops the run before the work)."""
        if self.error is not None:
            raise self.error

    def wait(self) -> None:
        if self._thread.is_alive():
            self._thread.join()
        self.check()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            with interrupts.held():  # the thread stopped before its folder goes, even on a second Ctrl-C
                self._stop.set()
                if self._thread.is_alive():
                    self._thread.join()
        finally:
            self.output.__exit__(exc_type, exc, tb)

    def _run(self) -> None:
        sources: dict[str, int] = {}  # source file → its descriptor: one open per file, not per tensor
        try:
            for component in self.plan.components:
                for shard, jobs in self.jobs[component.name].items():
                    self._copy_shard(component, shard, jobs, sources)
            timeline.mark("kept tensors written")
        except _Stopped:
            pass
        except BaseException as exc:  # raised by the executor (or the CLI) on the main thread
            self.error = exc
        finally:
            for fd in sources.values():
                os.close(fd)

    def _copy_shard(self, component: ComponentPlan, shard: str, jobs: list[TensorJob], sources: dict[str, int]) -> None:
        layout = component.shard_layout(shard)
        folder = self.output.tmp
        if component.name:  # never the temporary folder itself: gone, it stays gone
            folder = folder / component.name
            folder.mkdir(exist_ok=True)
        # Not emptied (O_TRUNC): the executor may have opened it first and written its own tensors.
        fd = os.open(folder / shard, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            digests = self.digests.setdefault(component.name, {})
            spans = WritebackSpans()  # the disk at work during the import too, tiny tensors asked for together
            for job in jobs:
                begin, _ = layout.offsets[job.source.name]
                path = str(job.source.path)
                if path not in sources:
                    sources[path] = open_tensor_file(job.source)
                digests[job.source.name] = self._copy(job, sources[path], fd, layout.data_start + begin, spans)
            if (span := spans.rest()) is not None:
                start_writeback(fd, *span)
        finally:
            os.close(fd)

    def _copy(self, job: TensorJob, src: int, out: int, offset: int, spans: WritebackSpans) -> str:
        """Source bytes (from ``src``, their file) → ``out`` at ``offset``; their sha256 (hashlib and the
        system calls let the GIL go)."""
        info = job.source
        digest = hashlib.sha256()
        for begin in range(0, info.nbytes, CHUNK_BYTES):
            if self._stop.is_set():
                raise _Stopped
            end = min(begin + CHUNK_BYTES, info.nbytes)
            piece = self._buffer[: end - begin]
            read_range(src, info, piece, begin, end, view_start=begin)
            digest.update(piece)
            at = offset + begin
            while piece:
                done = os.pwrite(out, piece, at)
                piece, at = piece[done:], at + done
            if (span := spans.add(offset + begin, end - begin)) is not None:
                start_writeback(out, *span)
        return digest.hexdigest()


def started(plan: QuantizePlan, output: AtomicOutputDir, plain: bool) -> AbstractContextManager[EarlyCopy | None]:
    """The early copy for a plain run (no --keep-budget/--target-size) worth it; else nothing (the
    executor enters the output folder itself, as before)."""
    if plain and worthwhile(plan):
        return EarlyCopy(plan, output)
    return nullcontext()
