"""The writer stage's bookkeeping: each output shard opened when its first tensor arrives and finished
after its last, its outputs' sha256, its sync, and its record in the journal."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bnbcli.checkpoint.journal import Journal
from bnbcli.checkpoint.writer import ShardWriter
from bnbcli.formats.metrics import RoundTripError
from bnbcli.pipeline.convert import Converted
from bnbcli.pipeline.early_copy import EarlyShards
from bnbcli.plan.quantize_layout import SHARD_METADATA, ComponentPlan, TensorJob

OUTPUT_WORKERS = 3  # threads hashing outputs and syncing finished shards
Progress = Callable[[int], None]


@dataclass(slots=True)
class TensorRecord:
    job: TensorJob
    outputs: dict[str, str] = field(default_factory=dict)  # key -> sha256
    error: RoundTripError | None = None


ShardItems = list[tuple[TensorRecord, str, torch.Tensor]]  # a shard's entries of one batch: record, key, value


def _by_shard(done: list[tuple[Converted, TensorRecord]]) -> dict[str, tuple[int, ShardItems]]:
    """A batch grouped by shard, in the order the shards come: how many of its tensors, and their entries."""
    shards: dict[str, tuple[int, ShardItems]] = {}
    for converted, record in done:
        count, items = shards.get(converted.job.shard, (0, []))
        items.extend((record, key, value) for key, value in converted.entries.items())
        shards[converted.job.shard] = (count + 1, items)
    return shards


def _sha256_all(views: list[memoryview]) -> list[str]:
    return [hashlib.sha256(data).hexdigest() for data in views]


Written = list[tuple[TensorRecord, str, memoryview]]  # what one hashing task hashes: record, key, bytes
Hashing = tuple[list[tuple[TensorRecord, str]], Future[list[str]]]  # whose digests a task computes, and the task


class ShardWriters:
    """Opens each output shard when its first tensor arrives and finishes it after its last.

    The writer thread only places bytes: the sha256 of the outputs (one task per batch and shard) and
    the final fsync of each shard run on a small pool beside it (hashlib and fsync release the GIL), so
    hashing 2 GB/s per core and waiting for the disk never hold up the next tensor. Once a shard is on
    disk it goes into the journal (what ``--resume`` keeps). Shards the journal already had are not
    written again. The tensors of ``early`` are in the files already, or on their way: a shard that holds
    some waits for that copy before it is finished, and counts their bytes as progress then.
    ``wait()`` collects hashes and syncs.
    """

    def __init__(
        self,
        component: ComponentPlan,
        out_dir: Path,
        journal: Journal,
        sources: Callable[[], dict],
        early: EarlyShards,
        progress: Progress,
    ) -> None:
        self.component = component
        self.out_dir = out_dir
        self.journal = journal
        self.sources = sources
        self.early, self.progress = early, progress
        self.early_records: dict[str, list[TensorRecord]] = {}  # shard -> the early copy's tensors, once done
        counts = {s: 0 for s in component.shards}
        for job in component.jobs:
            counts[job.shard] += 1
        self.remaining = {s: 0 if s in journal.finished else n - len(early.keys(s)) for s, n in counts.items()}
        self.open: dict[str, ShardWriter] = {}
        self.data_bytes = {s: done.data_bytes for s, done in journal.finished.items()}
        self.sizes = {s: done.size for s, done in journal.finished.items()}
        self._pool = ThreadPoolExecutor(max_workers=OUTPUT_WORKERS, thread_name_prefix="bnb-out")
        self._hashes: dict[str, list[Hashing]] = {}
        self._syncs: list[Future[None]] = []

    def _writer(self, shard: str) -> ShardWriter:
        entries, layout = self.component.shard_entries(shard), self.component.shard_layout(shard)
        return ShardWriter(self.out_dir / shard, entries, SHARD_METADATA, self.early.keys(shard), layout)

    def write(self, done: list[tuple[Converted, TensorRecord]]) -> None:
        """Place a batch's entries, a shard's with one ``write_many`` (runs adjacent in its layout go out
        as one write); their hashes are queued per shard, before a finished shard's sync."""
        for shard, (tensors, items) in _by_shard(done).items():
            if shard not in self.open:
                self.open[shard] = self._writer(shard)
            # views of the values' memory, which they keep alive until hashed
            views = self.open[shard].write_many([(key, value) for _, key, value in items])
            self._hash(shard, [(record, key, data) for (record, key, _), data in zip(items, views, strict=True)])
            self.remaining[shard] -= tensors
            if self.remaining[shard] == 0:
                self._finish(shard, self.open.pop(shard))

    def _hash(self, shard: str, items: Written) -> None:
        task = self._pool.submit(_sha256_all, [data for _, _, data in items])
        # Only the task holds the bytes: once hashed they are freed, not kept until the shard is synced.
        self._hashes.setdefault(shard, []).append(([(record, key) for record, key, _ in items], task))

    def _digests(self, shard: str) -> Iterator[tuple[TensorRecord, str, str]]:
        for names, task in self._hashes.get(shard, []):
            for (record, key), digest in zip(names, task.result(), strict=True):
                yield record, key, digest

    def _settle_early(self, shard: str) -> None:
        """The early copy's tensors of ``shard`` written (its error raised here), with their sha256."""
        jobs = self.early.jobs.get(shard, [])
        if not jobs:
            return
        sha256 = self.early.sha256()
        self.early_records[shard] = [TensorRecord(j, {j.source.name: sha256[j.source.name]}) for j in jobs]
        for job in jobs:
            self.progress(job.source.nbytes)

    def _finish(self, shard: str, writer: ShardWriter) -> None:
        self._settle_early(shard)
        self.data_bytes[shard] = writer.finish()
        self.sizes[shard] = (self.out_dir / shard).stat().st_size
        self._syncs.append(self._pool.submit(self._sync_and_record, shard, writer))

    def _sync_and_record(self, shard: str, writer: ShardWriter) -> None:
        writer.sync()
        # The shard's hashes were queued before this task on the same pool: they are done or running.
        records: dict[str, dict[str, Any]] = {}
        early = [(r, k, d) for r in self.early_records.get(shard, []) for k, d in r.outputs.items()]
        for record, key, digest in [*early, *self._digests(shard)]:
            error = record.error.as_dict() if record.error else None
            records.setdefault(record.job.source.name, {"outputs": {}, "error": error})["outputs"][key] = digest
        self.journal.record_shard(shard, self.data_bytes[shard], self.sizes[shard], records, self.sources())

    def close_rest(self) -> None:
        """The shards no tensor of the stream finished: those the early copy alone filled, and a shard
        with no tensors (a model without weights), which is still written, as save_pretrained does."""
        for shard, count in self.remaining.items():
            if count == 0 and shard not in self.sizes:
                self._finish(shard, self._writer(shard))

    def wait(self) -> None:
        """Every output hashed into its record and every shard on disk."""
        for sync in self._syncs:
            sync.result()
        for shard in self._hashes:
            for record, key, digest in self._digests(shard):
                record.outputs[key] = digest
        self._pool.shutdown()

    def abort(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        for writer in self.open.values():
            writer.abort()
