"""The streaming executor: read → convert → write, as three overlapping stages, obeying a QuantizePlan.

A reader thread reads the next tensor while the calling thread converts the current one (on the CPU,
or queued on a GPU) and a writer thread waits for the previous one and puts its entries at their
planned offsets. One-slot queues between the stages keep a few tensors in memory, whatever the model
size. The sha256 of each source file is computed beside all this (checkpoint/hashing.py). It decides
nothing: every size, offset and action comes from the plan.
"""

from __future__ import annotations

import hashlib
import math
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from bnbcli import interrupts, timeline
from bnbcli.checkpoint.hashing import FileHashes
from bnbcli.checkpoint.journal import FinishedShard, Journal, fingerprint
from bnbcli.checkpoint.safetensors_file import read_tensor
from bnbcli.checkpoint.writer import ShardWriter
from bnbcli.errors import InputError
from bnbcli.formats.metrics import RoundTripError
from bnbcli.pipeline.convert import Converted, Converter, make_converters
from bnbcli.plan.quantize_layout import (
    SHARD_METADATA,
    ComponentPlan,
    QuantizePlan,
    TensorJob,
    index_document,
    weights_layout,
)

Progress = Callable[[int], None]
POLL_SECONDS = 0.1  # how often a blocked stage looks whether another one failed
OUTPUT_WORKERS = 3  # threads hashing outputs and syncing finished shards


@dataclass
class TensorRecord:
    job: TensorJob
    outputs: dict[str, str] = field(default_factory=dict)  # key -> sha256
    error: RoundTripError | None = None


@dataclass
class StageSeconds:
    """Seconds each stage spent working rather than waiting for another: the largest one bounds the
    run. ``results`` is the writer waiting for a GPU's results (kernels and device→host copies);
    ``hashing`` is the wait at the end for the source sha256s that ran beside everything."""

    read: float = 0.0
    convert: float = 0.0
    results: float = 0.0
    write: float = 0.0
    hashing: float = 0.0

    @contextmanager
    def timing(self, stage: str) -> Iterator[None]:
        # Each stage's field is only ever written by its own thread.
        started = time.perf_counter()
        try:
            yield
        finally:
            setattr(self, stage, getattr(self, stage) + time.perf_counter() - started)

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in asdict(self).items()}


@dataclass
class ComponentResult:
    plan: ComponentPlan
    records: list[TensorRecord]
    shard_sizes: dict[str, int]
    source_sha256: dict[str, str]
    stage_seconds: StageSeconds
    resumed_shards: int = 0  # shards kept from an interrupted run (--resume)


class _Stopped(Exception):
    """Another stage failed; this one leaves quietly."""


class Cancelled(Exception):
    """The caller cancelled the run (``Cancellation.cancel()``); what it wrote is to be discarded."""


class Cancellation:
    """Lets another thread stop a run: it stops the stages of the component being written, as a
    failed stage would, and the run raises ``Cancelled``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requested = False
        self._stops: list[threading.Event] = []

    def watch(self, stop: threading.Event) -> None:
        with self._lock:
            self._stops.append(stop)
            if self._requested:
                stop.set()

    def cancel(self) -> None:
        with self._lock:
            self._requested = True
            for stop in self._stops:
                stop.set()


_END = object()


class _Handoff:
    """A one-slot queue between two stages that gives up when ``stop`` is set, so a failed stage
    never leaves the others blocked forever."""

    def __init__(self, stop: threading.Event) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=1)
        self._stop = stop

    def put(self, item: Any) -> None:
        while True:
            if self._stop.is_set():
                raise _Stopped
            try:
                self._queue.put(item, timeout=POLL_SECONDS)
                return
            except queue.Full:
                continue

    def get(self) -> Any:
        while True:
            if self._stop.is_set():
                raise _Stopped
            try:
                return self._queue.get(timeout=POLL_SECONDS)
            except queue.Empty:
                continue

    def items(self) -> Iterator[Any]:
        while (item := self.get()) is not _END:
            yield item


class _Stage(threading.Thread):
    """A daemon thread whose exception is kept for the caller, and which stops the others on failure."""

    def __init__(self, name: str, target: Callable[[], None], stop: threading.Event) -> None:
        super().__init__(name=name, daemon=True)
        self._target_fn = target
        self._stop_all = stop
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._target_fn()
        except _Stopped:
            pass
        except BaseException as exc:  # handed to the calling thread, which raises it
            self.error = exc
            self._stop_all.set()


def _sha256(data: memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


class _ShardWriters:
    """Opens each output shard when its first tensor arrives and finishes it after its last.

    The writer thread only places bytes: the sha256 of each output and the final fsync of each shard
    run on a small pool beside it (hashlib and fsync release the GIL), so hashing 2 GB/s per core and
    waiting for the disk never hold up the next tensor. Once a shard is on disk it goes into the
    journal (what ``--resume`` keeps). Shards the journal already had are not written again.
    ``wait()`` collects hashes and syncs.
    """

    def __init__(self, component: ComponentPlan, out_dir: Path, journal: Journal, sources: Callable[[], dict]) -> None:
        self.component = component
        self.out_dir = out_dir
        self.journal = journal
        self.sources = sources
        self.remaining = {s: 0 if s in journal.finished else len(component.shard_jobs(s)) for s in component.shards}
        self.open: dict[str, ShardWriter] = {}
        self.data_bytes = {s: done.data_bytes for s, done in journal.finished.items()}
        self.sizes = {s: done.size for s, done in journal.finished.items()}
        self._pool = ThreadPoolExecutor(max_workers=OUTPUT_WORKERS, thread_name_prefix="bnb-out")
        self._hashes: dict[str, list[tuple[TensorRecord, str, Future[str]]]] = {}
        self._syncs: list[Future[None]] = []

    def write(self, converted: Converted, record: TensorRecord) -> None:
        shard = converted.job.shard
        if shard not in self.open:
            jobs = self.component.shard_jobs(shard)
            self.open[shard] = ShardWriter(self.out_dir / shard, [e for j in jobs for e in j.entries], SHARD_METADATA)
        writer = self.open[shard]
        for key, value in converted.entries.items():
            data = writer.write(key, value)  # a view of ``value``'s memory, which it keeps alive
            self._hashes.setdefault(shard, []).append((record, key, self._pool.submit(_sha256, data)))
        self.remaining[shard] -= 1
        if self.remaining[shard] == 0:
            self._finish(shard, self.open.pop(shard))

    def _finish(self, shard: str, writer: ShardWriter) -> None:
        self.data_bytes[shard] = writer.finish()
        self.sizes[shard] = (self.out_dir / shard).stat().st_size
        self._syncs.append(self._pool.submit(self._sync_and_record, shard, writer))

    def _sync_and_record(self, shard: str, writer: ShardWriter) -> None:
        writer.sync()
        # The shard's hashes were queued before this task on the same pool: they are done or running.
        records: dict[str, dict[str, Any]] = {}
        for record, key, digest in self._hashes.get(shard, []):
            error = record.error.as_dict() if record.error else None
            records.setdefault(record.job.source.name, {"outputs": {}, "error": error})["outputs"][key] = (
                digest.result()
            )
        self.journal.record_shard(shard, self.data_bytes[shard], self.sizes[shard], records)
        self.journal.record_sources(self.sources())

    def close_empty(self) -> None:
        """A shard with no tensors (a model without weights) is still written, as save_pretrained does."""
        for shard, count in self.remaining.items():
            if count == 0 and shard not in self.sizes:
                self._finish(shard, ShardWriter(self.out_dir / shard, [], SHARD_METADATA))

    def wait(self) -> None:
        """Every output hashed into its record and every shard on disk."""
        for sync in self._syncs:
            sync.result()
        for entries in self._hashes.values():
            for record, key, digest in entries:
                record.outputs[key] = digest.result()
        self._pool.shutdown()

    def abort(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        for writer in self.open.values():
            writer.abort()


def _resumed_record(job: TensorJob, shard: FinishedShard) -> TensorRecord:
    saved = shard.records[job.source.name]
    error = saved["error"]
    if error is not None:  # JSON keeps an exact round trip's infinite SQNR as null
        error = RoundTripError(**{k: math.inf if v is None else v for k, v in error.items()})
    return TensorRecord(job, dict(saved["outputs"]), error)


def _run_component(
    component: ComponentPlan,
    out_dir: Path,
    converters: list[Converter],
    progress: Progress,
    journal: Journal,
    cancellation: Cancellation,
) -> ComponentResult:
    out_dir.mkdir(parents=True, exist_ok=True)
    hashes = FileHashes(list(component.source.weight_files))
    stop = threading.Event()
    cancellation.watch(stop)
    to_convert, to_write = _Handoff(stop), _Handoff(stop)
    records: list[TensorRecord] = []
    shards = _ShardWriters(component, out_dir, journal, hashes.finished)
    pin = converters[0].pin_memory
    seconds = StageSeconds()
    resumed = {
        j.source.name: _resumed_record(j, journal.finished[j.shard])
        for j in component.jobs
        if j.shard in journal.finished
    }
    for record in resumed.values():
        progress(record.job.source.nbytes)

    def read() -> None:
        for job in component.jobs:
            if job.source.name in resumed:
                continue
            with seconds.timing("read"):
                tensor = read_tensor(job.source, pin_memory=pin and job.quantized)
            timeline.mark("first tensor read")
            timeline.mark_again("last tensor read")
            to_convert.put((job, tensor))
        to_convert.put(_END)

    def write() -> None:
        for converted in to_write.items():
            record = TensorRecord(converted.job)
            with seconds.timing("results"):
                record.error = converted.finish()
            timeline.mark("first results on the host")
            with seconds.timing("write"):
                shards.write(converted, record)
            timeline.mark("first tensor written")
            timeline.mark_again("last tensor written")
            records.append(record)
            progress(converted.job.source.nbytes)
        with seconds.timing("write"):
            shards.close_empty()

    stages = [_Stage("bnb-read", read, stop), _Stage("bnb-write", write, stop)]
    for stage in stages:
        stage.start()
    finished = False
    try:
        for i, (job, tensor) in enumerate(to_convert.items()):
            interrupts.check()  # a Ctrl-C whose KeyboardInterrupt got lost stops the run here
            with seconds.timing("convert"):
                converted = converters[i % len(converters)](job, tensor)
            timeline.mark("first tensor queued")
            to_write.put(converted)
        to_write.put(_END)
        stages[1].join()
        finished = True
    except _Stopped:
        pass
    finally:
        stop.set()  # after success a no-op; after a failure here (Ctrl-C included) it releases the stages
        for stage in stages:
            stage.join()
        if not finished or any(stage.error for stage in stages):
            shards.abort()
            hashes.cancel()
    for stage in stages:
        if stage.error is not None:
            raise stage.error
    if not finished:  # stopped from outside, not by a failed stage
        raise Cancelled
    with seconds.timing("write"):
        shards.wait()
    timeline.mark_again("outputs on disk")
    if len(component.shards) > 1:
        index = out_dir / f"{component.weights_stem}.safetensors.index.json"
        index.write_text(index_document(component, shards.data_bytes))
    with seconds.timing("hashing"):
        source_sha256 = hashes.result()
    timeline.mark_again("sources hashed")
    changed = [p for p, h in journal.source_sha256.items() if source_sha256.get(p, h) != h]
    if resumed and changed:
        raise InputError(
            f"{changed[0]} changed since the interrupted run (same size and time, other bytes)",
            hint="run again without --resume",
        )
    journal.remove()
    by_name = {r.job.source.name: r for r in records} | resumed
    return ComponentResult(
        plan=component,
        records=[by_name[job.source.name] for job in component.jobs],
        resumed_shards=len(journal.finished),
        shard_sizes=shards.sizes,
        source_sha256=source_sha256,
        stage_seconds=seconds,
    )


def copy_file(src: Path, dst: Path) -> None:
    """Copy the bytes of ``src`` into ``dst``, which is made no more readable than ``src`` (a 0640 file
    must not come out 0644) yet writable by its owner (a read-only source should not make a read-only
    output). ``dst`` is created with that mode before a byte is in it; copyfile keeps the mode."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.unlink(missing_ok=True)  # a resumed run's folder may hold it from the interrupted run
    os.close(os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 & (src.stat().st_mode | 0o200)))
    shutil.copyfile(src, dst)


def write_weights(
    plan: QuantizePlan,
    out_dir: Path,
    backend: str,
    allow_nonfinite: bool,
    progress: Progress,
    devices: tuple[torch.device, ...] = (),
    resume: bool = False,
    cancellation: Cancellation | None = None,
) -> list[ComponentResult]:
    """Write every component's weight files into ``out_dir`` (a temporary folder the caller renames into
    place; with ``resume``, one an interrupted run left, whose journaled shards are kept when they still
    match). ``write_other_files`` completes the checkpoint."""
    converters = make_converters(backend, devices, plan.scheme, allow_nonfinite)
    timeline.mark("converters ready")
    settings = asdict(plan.scheme) | {"allow_nonfinite": allow_nonfinite}
    results = []
    for component in plan.components:
        target = out_dir / component.name if component.name else out_dir
        target.mkdir(parents=True, exist_ok=True)
        sources = list(component.source.weight_files)
        journal = Journal(target, fingerprint(weights_layout(component), settings, sources), resume)
        journal.require_sources(sources)
        results.append(_run_component(component, target, converters, progress, journal, cancellation or Cancellation()))
    return results


def write_other_files(plan: QuantizePlan, out_dir: Path) -> None:
    """What completes the weight files: the pipeline's and each component's other files, copied, and
    each component's config.json with its quantization_config."""
    root = plan.checkpoint.root
    for item in plan.checkpoint.pipeline_files:
        copy_file(item, out_dir / item.relative_to(root))
    for component in plan.components:
        target = out_dir / component.name if component.name else out_dir
        for item in component.source.other_files:
            copy_file(item, target / item.relative_to(component.source.root))
        if component.config is not None:
            (target / "config.json").write_text(json_dumps_config(component.config))


def json_dumps_config(config: dict) -> str:
    """config.json the way transformers writes it: indent 2, sorted keys, trailing newline."""
    import json

    return json.dumps(config, indent=2, sort_keys=True) + "\n"
