"""What `bnb quantize` is asked for, and the steps before execution that need no torch: opening the source,
planning it (when the planner table, the plan cache or the name rules decide) and the output folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bnbcli import timeline
from bnbcli.checkpoint.atomic import AtomicOutputDir
from bnbcli.checkpoint.source import Checkpoint, open_checkpoint
from bnbcli.errors import UsageError
from bnbcli.plan.decisions import PlannerName
from bnbcli.plan.quantize_layout import DEFAULT_MAX_SHARD_SIZE, QuantizePlan, plan_quantize
from bnbcli.plan.scheme import QuantScheme


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


def open_source(request: QuantizeRequest) -> Checkpoint:
    timeline.new_run()
    checkpoint = open_checkpoint(request.src, revision=request.revision, components=request.components)
    check_paths(checkpoint, request.out)
    timeline.mark("source opened")
    return checkpoint


def plan_request(request: QuantizeRequest, checkpoint: Checkpoint | None = None) -> QuantizePlan:
    """Headers only: what --dry-run prints and what execution obeys (--keep-budget: bnbcli.budget.spend)."""
    checkpoint = checkpoint or open_source(request)
    return plan_quantize(checkpoint, request.scheme, request.max_shard_size, request.planner)


def output_folder(request: QuantizeRequest) -> AtomicOutputDir:
    return AtomicOutputDir(request.out, overwrite=request.overwrite, resume=request.resume)
