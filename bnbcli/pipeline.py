"""The streaming executor: one tensor in flight, read → (cast, transpose) → quantize → write.

It obeys a QuantizePlan and decides nothing itself. Source shards are read in file order, so their
sha256 is computed from the bytes as they stream past, without a second read.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bnbcli import api
from bnbcli.checkpoint.safetensors_file import read_tensor
from bnbcli.checkpoint.writer import ShardWriter
from bnbcli.errors import InputError
from bnbcli.metrics import RoundTripError, roundtrip_error
from bnbcli.output_plan import SHARD_METADATA, ComponentPlan, QuantizePlan, TensorJob, index_document

Progress = Callable[[int], None]


@dataclass
class TensorRecord:
    job: TensorJob
    outputs: dict[str, str] = field(default_factory=dict)  # key -> sha256
    error: RoundTripError | None = None


@dataclass
class ComponentResult:
    plan: ComponentPlan
    records: list[TensorRecord]
    shard_sizes: dict[str, int]
    source_sha256: dict[str, str]


class _StreamHasher:
    """sha256 of a source file fed in file order: the header first, then each tensor's bytes."""

    def __init__(self, path: Path, data_start: int) -> None:
        self.path = path
        self.digest = hashlib.sha256()
        with path.open("rb") as f:
            self.digest.update(f.read(data_start))
        self.position = data_start

    def feed(self, start: int, data: memoryview) -> None:
        if start != self.position:  # not contiguous after all: fall back to reading the file
            self.position = -1
        elif self.position >= 0:
            self.digest.update(data)
            self.position += len(data)

    def hexdigest(self) -> str:
        if self.position != self.path.stat().st_size:
            digest = hashlib.sha256()
            with self.path.open("rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
            return digest.hexdigest()
        return self.digest.hexdigest()


def _raw_bytes(t: torch.Tensor) -> memoryview:
    # numpy arrays are buffers at run time; numpy's stubs do not say so to mypy
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")  # type: ignore[arg-type]


def _quantized_entries(job: TensorJob, weight: torch.Tensor, plan: QuantizePlan, backend: str):
    scheme = plan.scheme
    name = job.source.name
    if scheme.method == "int8":
        q = api.quantize_int8_rowwise(weight, backend=backend)
        restored = api.dequantize_int8_rowwise(q.CB, q.SCB, backend=backend)
        values = [q.CB, q.SCB, torch.tensor(0, dtype=torch.uint8)]  # weight_format 0 = "row"
        entries = dict(zip((e.key for e in job.entries), values, strict=True))
    else:
        q4 = api.quantize_4bit(
            weight, scheme.method, scheme.blocksize, scheme.double_quant, scheme.quant_storage, backend=backend
        )
        restored = api.dequantize_4bit(q4, backend=backend)
        entries = q4.state_dict(name)
    return entries, roundtrip_error(weight, restored)


def _run_job(
    job: TensorJob, plan: QuantizePlan, backend: str, allow_nonfinite: bool, writer: ShardWriter, hasher: _StreamHasher
) -> TensorRecord:
    tensor = read_tensor(job.source)
    hasher.feed(job.source.start, _raw_bytes(tensor))
    if tensor.dtype != job.dtype:
        tensor = tensor.to(job.dtype)
    record = TensorRecord(job)
    if not job.quantized:
        record.outputs[job.source.name] = writer.write(job.source.name, tensor)
        return record
    if job.decision.transpose:
        tensor = tensor.t().contiguous()  # Conv1D stores [in, out]; bitsandbytes wants [out, in]
    if not allow_nonfinite and not bool(torch.isfinite(tensor).all()):
        nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())  # the error path only
        found = " and ".join(f"{n} {kind}" for n, kind in ((nan, "NaN"), (inf, "Inf")) if n)
        raise InputError(
            f"{job.source.path}: tensor {job.source.name!r} has non-finite values: {found}",
            hint="fix the checkpoint, or pass --allow-nonfinite to quantize them as bitsandbytes would",
        )
    entries, record.error = _quantized_entries(job, tensor, plan, backend)
    planned = [e.key for e in job.entries]
    if list(entries) != planned:
        raise InputError(f"internal error: {job.source.name} produced {list(entries)}, planned {planned}")
    for key, value in entries.items():
        record.outputs[key] = writer.write(key, value)
    return record


def _run_component(
    component: ComponentPlan, plan: QuantizePlan, out_dir: Path, backend: str, allow_nonfinite: bool, progress: Progress
) -> ComponentResult:
    out_dir.mkdir(parents=True, exist_ok=True)
    hashers = {}
    for path in component.source.weight_files:
        first = min((t.start for t in component.source.tensors.values() if t.path == path), default=None)
        hashers[path] = _StreamHasher(path, first if first is not None else path.stat().st_size)
    records: list[TensorRecord] = []
    sizes: dict[str, int] = {}
    data_bytes: dict[str, int] = {}
    for shard in component.shards:
        jobs = component.shard_jobs(shard)
        writer = ShardWriter(out_dir / shard, [e for j in jobs for e in j.entries], SHARD_METADATA)
        try:
            for job in jobs:
                records.append(_run_job(job, plan, backend, allow_nonfinite, writer, hashers[job.source.path]))
                progress(job.source.nbytes)
            data_bytes[shard] = writer.close()
        finally:
            writer.abort()
        sizes[shard] = (out_dir / shard).stat().st_size
    if len(component.shards) > 1:
        (out_dir / f"{component.weights_stem}.safetensors.index.json").write_text(index_document(component, data_bytes))
    return ComponentResult(
        plan=component,
        records=records,
        shard_sizes=sizes,
        source_sha256={str(p): h.hexdigest() for p, h in hashers.items()},
    )


def _copy_tree_item(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dst, dirs_exist_ok=True)
    else:
        shutil.copyfile(src, dst)  # contents only: a read-only source should not make a read-only output


def run_quantize(
    plan: QuantizePlan, out_dir: Path, backend: str, allow_nonfinite: bool, progress: Progress
) -> tuple[list[ComponentResult], float]:
    """Write every component into ``out_dir`` (a temporary folder the caller renames into place)."""
    started = time.monotonic()
    results = []
    root = plan.checkpoint.root
    for item in plan.checkpoint.pipeline_files:
        _copy_tree_item(item, out_dir / item.relative_to(root))
    for component in plan.components:
        target = out_dir / component.name if component.name else out_dir
        results.append(_run_component(component, plan, target, backend, allow_nonfinite, progress))
        for item in component.source.other_files:
            _copy_tree_item(item, target / item.relative_to(component.source.root))
        if component.config is not None:
            (target / "config.json").write_text(json_dumps_config(component.config))
    return results, time.monotonic() - started


def json_dumps_config(config: dict) -> str:
    """config.json the way transformers writes it: indent 2, sorted keys, trailing newline."""
    import json

    return json.dumps(config, indent=2, sort_keys=True) + "\n"
