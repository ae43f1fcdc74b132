"""`bnb quantize` as a library call: open the source, plan, execute into a temporary folder, rename."""

from __future__ import annotations

import functools
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from bnbcli import timeline
from bnbcli.backends import resolve_backend
from bnbcli.backends.devices import cuda_devices
from bnbcli.checkpoint.atomic import AtomicOutputDir
from bnbcli.checkpoint.manifest import manifest_document, write_manifest
from bnbcli.errors import BnbError, UsageError
from bnbcli.formats.dtypes import dtype_name
from bnbcli.pipeline.early_copy import EarlyCopy
from bnbcli.pipeline.executor import ComponentResult, Progress, StageSeconds, write_other_files, write_weights
from bnbcli.pipeline.request import QuantizeRequest, output_folder, source_label
from bnbcli.plan.quantize_layout import QuantizePlan


@dataclass(frozen=True)
class QuantizeOutcome:
    plan: QuantizePlan
    out: Path
    manifest: dict[str, Any]


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


def quantize(
    request: QuantizeRequest, plan: QuantizePlan, progress: Progress, early: EarlyCopy | None = None
) -> QuantizeOutcome:
    """Execute ``plan``: OUT appears only once it is whole. ``early``: the output folder entered already,
    its pass-through tensors being copied (pipeline/early_copy.py); else it is entered here."""
    backend, devices = _backend(request)
    started = time.monotonic()
    timeline.mark("planned")
    run = functools.partial(write_weights, plan, backend=backend, allow_nonfinite=request.allow_nonfinite,
                            progress=progress, devices=devices, early=early)  # fmt: skip
    if early is not None:
        return _complete(plan, run(out_dir=early.output.tmp), early.output, started)
    output = output_folder(request)
    with output as tmp:
        return _complete(plan, run(out_dir=tmp, resume=output.adopted is not None), output, started)


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
    # Field by field: asdict would turn each DType into a dict of its own fields.
    settings = {f.name: getattr(plan.scheme, f.name) for f in fields(plan.scheme)}
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
    if plan.keep_budget is not None:  # --keep-budget / --target-size: the budget, the method, the scores
        document["keep_budget"] = plan.keep_budget.as_dict()
    return document
