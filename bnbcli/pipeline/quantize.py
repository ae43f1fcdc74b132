"""`bnb quantize` as a library call: open the source, plan, execute into a temporary folder, rename."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bnbcli import timeline
from bnbcli.backends import resolve_backend
from bnbcli.backends.devices import cuda_devices
from bnbcli.checkpoint.atomic import AtomicOutputDir
from bnbcli.checkpoint.manifest import manifest_document, write_manifest
from bnbcli.checkpoint.source import Checkpoint, open_checkpoint
from bnbcli.errors import BnbError, UsageError
from bnbcli.pipeline.executor import ComponentResult, Progress, StageSeconds, write_other_files, write_weights
from bnbcli.plan.decisions import PlannerName
from bnbcli.plan.quantize_layout import DEFAULT_MAX_SHARD_SIZE, QuantizePlan, plan_quantize
from bnbcli.plan.scheme import QuantScheme, dtype_name


@dataclass(frozen=True)
class QuantizeRequest:
    src: str
    out: Path
    scheme: QuantScheme
    revision: str | None = None
    components: tuple[str, ...] | None = None
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE
    backend: str = "auto"
    devices: tuple[int, ...] = ()  # GPU indices for the cuda backend; () is the current GPU
    allow_nonfinite: bool = False
    overwrite: bool = False
    resume: bool = False  # continue an interrupted run on OUT (checkpoint/journal.py)
    planner: PlannerName | None = None  # None: the best available; "name-rules" forces the fallback


@dataclass(frozen=True)
class QuantizeOutcome:
    plan: QuantizePlan
    out: Path
    manifest: dict[str, Any]


def source_label(checkpoint: Checkpoint) -> dict[str, Any]:
    if checkpoint.repo_id:
        return {"repo_id": checkpoint.repo_id, "revision": checkpoint.revision, "kind": checkpoint.kind}
    return {"path": str(checkpoint.root), "kind": checkpoint.kind}


def check_paths(checkpoint: Checkpoint, out: Path) -> None:
    """OUT must be neither the source, nor inside it, nor around it."""
    out = out.absolute().resolve()
    root = checkpoint.root.resolve()
    if out == root or root in out.parents or out in root.parents:
        raise UsageError(f"OUT {out} overlaps the source {root}", hint="write OUT elsewhere")


def warm_up_backend(request: QuantizeRequest) -> None:
    """Start compiling the GPU kernels now, when the cuda backend will run, so that the compile overlaps
    planning; a no-op for the CPU. Errors are left for the real run to report."""
    try:
        if resolve_backend(request.backend) != "cuda":
            return
        devices = cuda_devices(request.devices)
    except BnbError:
        return
    from bnbcli.backends.cuda_runtime import warm_up

    for device in devices:
        warm_up(device.index if device.index is not None else 0)


def open_source(request: QuantizeRequest) -> Checkpoint:
    timeline.new_run()
    resolve_backend(request.backend)
    checkpoint = open_checkpoint(request.src, revision=request.revision, components=request.components)
    check_paths(checkpoint, request.out)
    timeline.mark("source opened")
    return checkpoint


def plan_request(request: QuantizeRequest, checkpoint: Checkpoint | None = None) -> QuantizePlan:
    """Headers only: what --dry-run prints and what execution obeys."""
    checkpoint = checkpoint or open_source(request)
    return plan_quantize(checkpoint, request.scheme, request.max_shard_size, request.planner)


def quantize(request: QuantizeRequest, plan: QuantizePlan, progress: Progress) -> QuantizeOutcome:
    """Execute ``plan``: OUT appears only once it is whole."""
    backend, devices = _backend(request)
    started = time.monotonic()
    timeline.mark("planned")
    output = AtomicOutputDir(request.out, overwrite=request.overwrite, resume=request.resume)
    with output as tmp:
        resume = output.adopted is not None
        results = write_weights(plan, tmp, backend, request.allow_nonfinite, progress, devices, resume)
        return _complete(plan, results, output, started)


def _backend(request: QuantizeRequest) -> tuple[str, tuple[torch.device, ...]]:
    backend = resolve_backend(request.backend)
    if request.devices and backend != "cuda":
        raise UsageError("--device/--devices choose GPUs for the cuda backend", hint="add --backend cuda")
    return backend, cuda_devices(request.devices) if backend == "cuda" else ()


def _complete(
    plan: QuantizePlan, results: list[ComponentResult], output: AtomicOutputDir, started: float
) -> QuantizeOutcome:
    write_other_files(plan, output.tmp)
    manifest = build_manifest(plan, results, source_label(plan.checkpoint), time.monotonic() - started)
    timeline.mark("manifest")
    manifest["run"]["timeline"] = timeline.marks()
    write_manifest(output.tmp, manifest)
    output.commit()  # only now does OUT appear, whole
    return QuantizeOutcome(plan=plan, out=output.out, manifest=manifest)


# --- the manifest's records ---------------------------------------------------------------------------------


def scheme_settings(plan: QuantizePlan) -> dict[str, Any]:
    settings = asdict(plan.scheme)
    # None stays null ("the checkpoint's own dtype"), never the string "None".
    return {
        k: (dtype_name(v) if v is not None and ("dtype" in k or k == "quant_storage") else v)
        for k, v in settings.items()
    }


def _tensor_entry(record: Any) -> dict[str, Any]:
    job = record.job
    entry: dict[str, Any] = {
        "name": job.source.name,
        "action": job.decision.action,
        "reason": job.decision.reason,
        "source": {"dtype": dtype_name(job.source.dtype), "shape": list(job.source.shape), "bytes": job.source.nbytes},
        "shard": job.shard,
        "outputs": [
            {"key": e.key, "dtype": dtype_name(e.dtype), "shape": list(e.shape), "sha256": record.outputs[e.key]}
            for e in job.entries
        ],
    }
    if job.quantized:
        entry["transposed"] = job.decision.transpose
        entry["error"] = record.error.as_dict() if record.error else None
    return entry


def build_manifest(
    plan: QuantizePlan, results: list[ComponentResult], source_label: dict[str, Any], seconds: float
) -> dict[str, Any]:
    components = []
    for result in results:
        c = result.plan
        components.append(
            {
                "name": c.name,
                "planner": c.planner,
                "planner_reason": c.planner_reason,
                "skip_modules": list(c.skip_modules),
                "source_files": [
                    {"path": str(Path(p).relative_to(plan.checkpoint.root)), "sha256": h}
                    for p, h in result.source_sha256.items()
                ],
                "shards": [{"file": s, "bytes": result.shard_sizes[s]} for s in c.shards],
                "tensors": [_tensor_entry(r) for r in result.records],
            }
        )
    stages = StageSeconds()
    for result in results:
        for name, value in asdict(result.stage_seconds).items():
            setattr(stages, name, getattr(stages, name) + value)
    document = manifest_document(source_label, scheme_settings(plan), components, seconds, stages.as_dict())
    document["run"]["resumed_shards"] = sum(result.resumed_shards for result in results)
    return document
