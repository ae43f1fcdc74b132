"""The streaming executor: read → convert → write, as three overlapping stages, obeying a QuantizePlan.

A reader thread reads the next tensors while the calling thread converts the current ones (on the CPU,
or queued on a GPU) and a writer thread waits for the previous ones and puts their entries at their
planned offsets. Tensors travel between the stages in batches (a large tensor alone, small ones
together up to BATCH_BYTES), through one-slot handoffs (pipeline/stages.py), so a few MB stay in memory
whatever the model size and a checkpoint of 200,000 tiny tensors does not pay a thread handoff for each.
The sha256 of each source file is computed beside all this (checkpoint/hashing.py). It decides nothing:
every size, offset and action comes from the plan.
"""

from __future__ import annotations

import math
import os
import shutil
import threading
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bnbcli import interrupts, timeline
from bnbcli.checkpoint.durable import write_atomically
from bnbcli.checkpoint.hashing import FileHashes
from bnbcli.checkpoint.journal import FinishedShard, Journal, fingerprint
from bnbcli.checkpoint.tensor_reads import read_tensor, read_tensors
from bnbcli.errors import InputError
from bnbcli.formats.metrics import RoundTripError
from bnbcli.pipeline.convert import Converter, CpuConverter, make_converters
from bnbcli.pipeline.early_copy import EarlyCopy, EarlyShards
from bnbcli.pipeline.shard_writers import Progress, ShardWriters, TensorRecord
from bnbcli.pipeline.stages import END, Cancellation, Cancelled, Handoff, Stage, StageSeconds, Stopped
from bnbcli.plan.quantize_layout import ComponentPlan, QuantizePlan, TensorJob, index_document, weights_layout

__all__ = ["Cancellation", "Cancelled", "ComponentResult", "StageSeconds", "write_other_files", "write_weights"]

# A batch closes once it holds this many source bytes or tensors: a tensor of 1 MiB or more travels
# alone (as before batching; a GPU overlaps its copy with the previous kernels), tiny ones share the
# handoffs, hashing tasks and progress updates that cost ~1 ms each on a busy 2-core machine.
BATCH_BYTES = 1 << 20
BATCH_TENSORS = 512


@dataclass
class ComponentResult:
    plan: ComponentPlan
    records: list[TensorRecord]
    shard_sizes: dict[str, int]
    source_sha256: dict[str, str]
    stage_seconds: StageSeconds
    resumed_shards: int = 0  # shards kept from an interrupted run (--resume)


def batches(jobs: Iterable[TensorJob]) -> Iterator[list[TensorJob]]:
    """``jobs`` in order, grouped: see BATCH_BYTES."""
    batch: list[TensorJob] = []
    size = 0
    for job in jobs:
        if batch and (size + job.source.nbytes > BATCH_BYTES or len(batch) >= BATCH_TENSORS):
            yield batch
            batch, size = [], 0
        batch.append(job)
        size += job.source.nbytes
    if batch:
        yield batch


def _resumed_record(job: TensorJob, shard: FinishedShard) -> TensorRecord:
    saved = shard.records[job.source.name]
    error = saved["error"]
    if error is not None:  # JSON keeps an exact round trip's infinite SQNR as null
        error = RoundTripError(**{k: math.inf if v is None else v for k, v in error.items()})
    return TensorRecord(job, dict(saved["outputs"]), error)


class _ComponentRun:
    """One component's weight files written by the three stages: ``run()`` returns its result."""

    def __init__(
        self,
        component: ComponentPlan,
        out_dir: Path,
        converters: list[Converter],
        progress: Progress,
        journal: Journal,
        cancellation: Cancellation,
        early: EarlyShards,
    ) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.component, self.out_dir, self.converters = component, out_dir, converters
        self.progress, self.journal = progress, journal
        self.hashes = FileHashes(list(component.source.weight_files))
        self.stop = threading.Event()
        cancellation.watch(self.stop)
        self.to_convert, self.to_write = Handoff(self.stop), Handoff(self.stop)
        self.records: list[TensorRecord] = []
        self.shards = ShardWriters(component, out_dir, journal, self.hashes.finished, early, progress)
        self.seconds = StageSeconds()
        self.resumed = {
            j.source.name: _resumed_record(j, journal.finished[j.shard])
            for j in component.jobs
            if j.shard in journal.finished
        }
        self.copied_early = {name for shard in early.jobs for name in early.keys(shard)}

    def read(self) -> None:
        """The reader thread: each batch of tensors still to convert, from the source files."""
        pin = self.converters[0].pin_memory
        done = self.resumed.keys() | self.copied_early
        for batch in batches(j for j in self.component.jobs if j.source.name not in done):
            with self.seconds.timing("read"):
                if pin:
                    tensors = [read_tensor(job.source, pin_memory=job.quantized) for job in batch]
                else:  # small neighbours with one read
                    tensors = list(read_tensors([job.source for job in batch]))
            timeline.mark("first tensor read")
            timeline.mark_again("last tensor read")
            self.to_convert.put(list(zip(batch, tensors, strict=True)))
        self.to_convert.put(END)

    def convert(self) -> None:
        """The calling thread: each batch through the converters (round-robin over the GPUs)."""
        count = 0
        for batch in self.to_convert.items():
            interrupts.check()  # a Ctrl-C whose KeyboardInterrupt got lost stops the run here
            converted = []
            with self.seconds.timing("convert"):
                if isinstance(self.converters[0], CpuConverter):  # the one CPU converter joins small weights
                    converted = self.converters[0].convert_many(batch)
                else:
                    for job, tensor in batch:
                        converted.append(self.converters[count % len(self.converters)](job, tensor))
                        count += 1
            timeline.mark("first tensor queued")
            self.to_write.put(converted)
        self.to_write.put(END)

    def write(self) -> None:
        """The writer thread: each batch's results into their shards, then the shards it did not finish."""
        for batch in self.to_write.items():
            done = []
            for converted in batch:
                record = TensorRecord(converted.job)
                with self.seconds.timing("results"):
                    record.error = converted.finish()
                done.append((converted, record))
            timeline.mark("first results on the host")
            with self.seconds.timing("write"):
                self.shards.write(done)
            timeline.mark("first tensor written")
            timeline.mark_again("last tensor written")
            self.records.extend(record for _, record in done)
            for converted in batch:  # a tensor at a time: the count in a CI log's lines (about 1 µs each)
                self.progress(converted.job.source.nbytes)
        with self.seconds.timing("write"):
            self.shards.close_rest()

    def run(self) -> ComponentResult:
        for record in self.resumed.values():
            self.progress(record.job.source.nbytes)
        self._stream()
        with self.seconds.timing("write"):
            self.shards.wait()
        timeline.mark_again("outputs on disk")
        if len(self.component.shards) > 1:
            index = self.out_dir / f"{self.component.weights_stem}.safetensors.index.json"
            write_atomically(index, index_document(self.component, self.shards.data_bytes))
        with self.seconds.timing("hashing"):
            source_sha256 = self.hashes.result()
        timeline.mark_again("sources hashed")
        self._check_sources(source_sha256)
        self.journal.remove()
        early = [r for records in self.shards.early_records.values() for r in records]
        by_name = {r.job.source.name: r for r in [*self.records, *early]} | self.resumed
        return ComponentResult(
            plan=self.component,
            records=[by_name[job.source.name] for job in self.component.jobs],
            resumed_shards=len(self.journal.finished),
            shard_sizes=self.shards.sizes,
            source_sha256=source_sha256,
            stage_seconds=self.seconds,
        )

    def _stream(self) -> None:
        """The three stages to their end; a stage's error (or a cancellation) is raised here, after
        every stage stopped and what they wrote was abandoned."""
        stages = [Stage("bnb-read", self.read, self.stop), Stage("bnb-write", self.write, self.stop)]
        for stage in stages:
            stage.start()
        finished = False
        try:
            self.convert()
            stages[1].join()
            finished = True
        except Stopped:
            pass
        finally:
            self.stop.set()  # after success a no-op; after a failure here (Ctrl-C included) it releases the stages
            for stage in stages:
                stage.join()
            if not finished or any(stage.error for stage in stages):
                self.shards.abort()
                self.hashes.cancel()
        for stage in stages:
            if stage.error is not None:
                raise stage.error
        if not finished:  # stopped from outside, not by a failed stage
            raise Cancelled

    def _check_sources(self, source_sha256: dict[str, str]) -> None:
        """A resumed run's kept shards came from the same source bytes as the rest."""
        changed = [p for p, h in self.journal.source_sha256.items() if source_sha256.get(p, h) != h]
        if self.resumed and changed:
            raise InputError(
                f"{changed[0]} changed since the interrupted run (same size and time, other bytes)",
                hint="run again without --resume",
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
    early: EarlyCopy | None = None,
) -> list[ComponentResult]:
    """Write every component's weight files into ``out_dir`` (a temporary folder the caller renames into
    place; with ``resume``, one an interrupted run left, whose journaled shards are kept when they still
    match; with ``early``, one whose pass-through tensors that copy writes). ``write_other_files``
    completes the checkpoint."""
    if early is not None:
        early.check()
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
        shards = early.shards(component.name) if early is not None else EarlyShards()
        run = _ComponentRun(component, target, converters, progress, journal, cancellation or Cancellation(), shards)
        results.append(run.run())
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
            write_atomically(target / "config.json", json_dumps_config(component.config))


def json_dumps_config(config: dict) -> str:
    """config.json the way transformers writes it: indent 2, sorted keys, trailing newline."""
    import json

    return json.dumps(config, indent=2, sort_keys=True) + "\n"
