"""`bnb quantize` as a library call: open the source, plan, execute into a temporary folder, rename."""

from __future__ import annotations

import importlib.util
import shutil
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from bnbcli import timeline
from bnbcli.backends import resolve_backend
from bnbcli.checkpoint.atomic import AtomicOutputDir
from bnbcli.checkpoint.manifest import build_manifest, write_manifest
from bnbcli.checkpoint.source import Checkpoint, open_checkpoint
from bnbcli.devices import cuda_devices
from bnbcli.errors import BnbError, UsageError
from bnbcli.output_plan import (
    DEFAULT_MAX_SHARD_SIZE,
    ComponentPlan,
    QuantizePlan,
    plan_quantize,
    tensor_shapes,
    weights_layout,
)
from bnbcli.pipeline import Cancellation, ComponentResult, Progress, write_other_files, write_weights
from bnbcli.plan import PlannerName, QuantPlan, plan_is_cached
from bnbcli.planning import isolated
from bnbcli.planning.isolated import ChildFailed, plan_in_child
from bnbcli.scheme import QuantScheme


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
    """Headers only: what --dry-run prints and what execution obeys. Planned in this process, so a
    planner child started early (``isolated.start_early``) and not yet asked has nothing to do: it is
    stopped."""
    isolated.stop_unused()
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
        return _complete(plan, results, output, started, {"draft": None})


def can_start_before_planning(request: QuantizeRequest, checkpoint: Checkpoint) -> bool:
    """Whether ``quantize_while_planning`` pays: the default planner needs transformers (or diffusers),
    not imported yet (seconds to tens of seconds), and a config.json to build from; the checkpoint is
    large enough for the overlap to matter; nothing asks for the plan first; the plan cache does not
    hold the answer already."""
    modules = ("transformers", "diffusers")
    speculate = (
        request.planner is None
        and not request.resume
        and checkpoint.tensor_bytes >= isolated.SPECULATE_MIN_BYTES
        and any(source.config is not None for source in checkpoint.components.values())  # else name rules
        and not any(m in sys.modules for m in modules)
        and any(importlib.util.find_spec(m) is not None for m in modules)
    )
    return speculate and not all(  # the plan cache answers at once
        plan_is_cached(source.config, tensor_shapes(source), request.scheme)
        for source in checkpoint.components.values()
    )


def quantize_while_planning(request: QuantizeRequest, checkpoint: Checkpoint, progress: Progress) -> QuantizeOutcome:
    """Write the weights on a draft plan from the name rules (instant) while a child process makes the
    real plan (importing transformers, building the model on the meta device); keep them when the two
    plans lay out the same weight files — which decides every byte, see ``weights_layout`` — else
    discard them and write again on the real plan. Either way the files are the real plan's; only the
    time differs."""
    backend, devices = _backend(request)
    started = time.monotonic()
    try:
        draft = plan_quantize(checkpoint, request.scheme, request.max_shard_size, "name-rules")
        timeline.mark("draft planned")
    except BnbError:  # whether the input is at fault is the real planner's to say
        return quantize(request, plan_request(request, checkpoint), progress)
    deciding = {
        name: plan_in_child(source.config, tensor_shapes(source), request.scheme)
        for name, source in checkpoint.components.items()
    }
    output = AtomicOutputDir(request.out, overwrite=request.overwrite)
    with output as tmp:
        cancellation = Cancellation()
        reported = _Counted(progress)
        drafted = _Background(
            lambda: write_weights(
                draft, tmp, backend, request.allow_nonfinite, reported, devices, cancellation=cancellation
            )
        )
        try:
            drafted.start()  # inside the try: a Ctrl-C right after it still stops the draft before tmp goes
            plan, planned_in = _real_plan(request, checkpoint, deciding)
            timeline.mark("planned")
            planning = {"draft": None, "planned_in": planned_in, "plan_seconds": round(time.monotonic() - started, 3)}
            same = [weights_layout(c) for c in plan.components] == [weights_layout(c) for c in draft.components]
            if same:
                drafts = drafted.result()  # the draft's own error, if any, is the real plan's too
                results = [_replanned(r, c) for r, c in zip(drafts, plan.components, strict=True)]
        except BaseException:  # Ctrl-C included: the draft stops before the folder goes
            cancellation.cancel()
            drafted.wait()
            raise
        if not same:
            cancellation.cancel()
            drafted.wait()
            _empty(tmp)
            again = _Resumed(progress, reported)
            results = write_weights(plan, tmp, backend, request.allow_nonfinite, again, devices)
        planning["draft"] = "kept" if same else "discarded"
        return _complete(plan, results, output, started, planning)


def _real_plan(
    request: QuantizeRequest, checkpoint: Checkpoint, deciding: dict[str, Future[QuantPlan]]
) -> tuple[QuantizePlan, str]:
    """The plan from the child's decisions, and where it was made: here when the child could not run."""
    try:
        decided = {name: future.result() for name, future in deciding.items()}
    except ChildFailed:  # it could not start, or died: the same planner, here
        return plan_request(request, checkpoint), "this process (the child failed)"
    return plan_quantize(checkpoint, request.scheme, request.max_shard_size, None, decided), "a child process"


def _backend(request: QuantizeRequest) -> tuple[str, tuple[torch.device, ...]]:
    backend = resolve_backend(request.backend)
    if request.devices and backend != "cuda":
        raise UsageError("--device/--devices choose GPUs for the cuda backend", hint="add --backend cuda")
    return backend, cuda_devices(request.devices) if backend == "cuda" else ()


def _complete(
    plan: QuantizePlan, results: list[ComponentResult], output: AtomicOutputDir, started: float, planning: dict
) -> QuantizeOutcome:
    """``planning``: whether weights were written on a draft plan ("kept" or "discarded"; None when the
    plan came first), where the real plan was made and when it was there (for ``-v``)."""
    write_other_files(plan, output.tmp)
    manifest = build_manifest(plan, results, source_label(plan.checkpoint), time.monotonic() - started)
    manifest["run"]["planning"] = planning  # like the rest of "run": how this run went, not what it wrote
    timeline.mark("manifest")
    manifest["run"]["timeline"] = timeline.marks()
    write_manifest(output.tmp, manifest)
    output.commit()  # only now does OUT appear, whole
    return QuantizeOutcome(plan=plan, out=output.out, manifest=manifest)


def _replanned(result: ComponentResult, component: ComponentPlan) -> ComponentResult:
    """A component written on the draft plan, told by the real plan: the same files, the real planner's
    name, reasons and skip list in the manifest."""
    jobs = {job.source.name: job for job in component.jobs}
    records = [replace(record, job=jobs[record.job.source.name]) for record in result.records]
    return replace(result, plan=component, records=records)


def _empty(folder: Path) -> None:
    for child in folder.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


class _Counted:
    """Progress that also counts what it reported: bytes, and tensors (one call each)."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.total = 0
        self.tensors = 0

    def __call__(self, nbytes: int) -> None:
        self.total += nbytes
        self.tensors += 1
        self.progress(nbytes)


class _Resumed:
    """Progress for a run that starts again: it reports nothing until it has done more tensors than the
    first run reported, then what goes past the first run's bytes, so that neither the bar nor the
    count of tensors runs past where the first run left it and the bytes still add up to the total."""

    def __init__(self, progress: Progress, first: _Counted) -> None:
        self.progress = progress
        self.done = 0
        self.tensors = 0
        self.high = first.total  # bytes the first run reported
        self.high_tensors = first.tensors

    def __call__(self, nbytes: int) -> None:
        self.done += nbytes
        self.tensors += 1
        if self.tensors > self.high_tensors:
            self.progress(max(0, self.done - self.high))
            self.high = max(self.high, self.done)


class _Background(threading.Thread):
    """A call on another thread; ``result()`` returns its value or raises its exception."""

    def __init__(self, call: Callable[[], Any]) -> None:
        super().__init__(name="bnb-draft", daemon=True)
        self._call = call
        self._value: Any = None
        self._error: BaseException | None = None

    def run(self) -> None:
        try:
            self._value = self._call()
        except BaseException as exc:  # handed to the caller
            self._error = exc

    def wait(self) -> None:
        """Join, if it was started; an error of a cancelled run is of no interest."""
        if self.ident is not None:
            self.join()

    def result(self) -> Any:
        self.join()
        if self._error is not None:
            raise self._error
        return self._value
