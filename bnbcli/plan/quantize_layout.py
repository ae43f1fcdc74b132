"""Where every output tensor goes: the jobs of each component, their entries, shards and exact sizes.

Built from headers only. ``bnb quantize --dry-run`` renders it, the pipeline executes it, and nothing
is re-decided during execution.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from bnbcli.checkpoint.safetensors_file import TensorInfo
from bnbcli.checkpoint.source import Checkpoint, ModelSource
from bnbcli.checkpoint.writer import PlannedTensor, ShardLayout, shard_layout
from bnbcli.formats.dtypes import DType, dtype_name
from bnbcli.formats.layout import entry_layouts, format_label
from bnbcli.plan.decisions import PlannerName, TensorDecision, fallback_warning, plan_quantization, quantization_config
from bnbcli.plan.dtype import config_dtype
from bnbcli.plan.scheme import QuantScheme
from bnbcli.units import positive_size

SHARD_METADATA = {"format": "pt"}
DEFAULT_MAX_SHARD_SIZE = 50 * 10**9  # transformers v5's save_pretrained default, "50GB"


class ComponentTotals:
    """bytes_in and bytes_out of a plan, quantize's or dequantize's: the sums over its components."""

    components: tuple[Any, ...]

    @property
    def bytes_in(self) -> int:
        return sum(c.bytes_in for c in self.components)

    @property
    def bytes_out(self) -> int:
        return sum(c.bytes_out for c in self.components)


@dataclass(frozen=True, slots=True)
class TensorJob:
    """One source tensor and what becomes of it."""

    source: TensorInfo
    decision: TensorDecision
    dtype: DType  # the dtype it is quantized or kept in
    entries: tuple[PlannedTensor, ...]
    shard: str

    @property
    def quantized(self) -> bool:
        return self.decision.action == "quantize"

    @property
    def bytes_out(self) -> int:
        return sum(e.nbytes for e in self.entries)


@dataclass(frozen=True)
class ComponentPlan:
    name: str  # "" for a plain model, else the diffusers component folder
    source: ModelSource
    planner: str
    planner_reason: str
    jobs: tuple[TensorJob, ...]
    shards: tuple[str, ...]
    skip_modules: tuple[str, ...]
    config: dict | None  # the output config.json
    weights_stem: str  # "model" or "diffusion_pytorch_model"
    unmatched_skip: tuple[str, ...] = ()  # --skip patterns that match no module of this component
    planner_fallback: str | None = None  # why config.json's library could not plan it (QuantPlan.fallback)
    # Each shard's layout, once asked for (by the plan's sizes, the early copy and the writer: ~10 µs a
    # tensor each time); a replace() starts afresh.
    _layouts: dict[str, ShardLayout] = field(default_factory=dict, init=False, repr=False, compare=False)
    # The jobs of each shard, grouped once (looking through every job per shard was shards × tensors).
    _by_shard: dict[str, list[TensorJob]] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def bytes_in(self) -> int:
        return sum(j.source.nbytes for j in self.jobs)

    @property
    def bytes_out(self) -> int:
        return sum(j.bytes_out for j in self.jobs)

    def shard_jobs(self, shard: str) -> list[TensorJob]:
        if not self._by_shard:
            for job in self.jobs:
                self._by_shard.setdefault(job.shard, []).append(job)
        return list(self._by_shard.get(shard, ()))

    def shard_entries(self, shard: str) -> list[PlannedTensor]:
        return [e for j in self.shard_jobs(shard) for e in j.entries]

    def shard_layout(self, shard: str) -> ShardLayout:
        """Where the writer puts each of the shard's entries."""
        if shard not in self._layouts:
            self._layouts[shard] = shard_layout(self.shard_entries(shard), SHARD_METADATA)
        return self._layouts[shard]

    def shard_bytes(self, shard: str) -> int:
        """The shard file's size: exact, and with variable tensors the largest it can be."""
        variable = sum(e.nbytes for e in self.shard_entries(shard) if e.variable)
        return self.shard_layout(shard).file_size(variable)


@dataclass(frozen=True)
class QuantizePlan(ComponentTotals):
    checkpoint: Checkpoint
    scheme: QuantScheme
    components: tuple[ComponentPlan, ...]
    keep_budget: Any = None  # a BudgetChoice (bnbcli/plan/budget) when --keep-budget or --target-size chose modules

    @property
    def file_bytes(self) -> int:
        """The weight files with their headers (the largest they can be)."""
        return sum(c.shard_bytes(s) for c in self.components for s in c.shards)


def _target_dtype(info: TensorInfo, scheme: QuantScheme) -> DType:
    """--dtype casts floating-point tensors (as transformers loads them with dtype=...); others keep theirs."""
    if scheme.dtype is not None and info.dtype.is_floating_point:
        return scheme.dtype
    return info.dtype


def _job_entries(info: TensorInfo, decision: TensorDecision, dtype: DType, scheme: QuantScheme):
    if decision.action != "quantize":
        return (PlannedTensor(info.name, dtype, info.shape),)
    shape = tuple(reversed(info.shape)) if decision.transpose else info.shape
    return tuple(
        PlannedTensor(e.key(info.name), e.dtype, e.shape, e.variable) for e in entry_layouts(shape, dtype, scheme)
    )


def _weights_stem(source: ModelSource) -> str:
    names = [p.name for p in source.weight_files]
    return "diffusion_pytorch_model" if any(n.startswith("diffusion_pytorch_model") for n in names) else "model"


def assign_shards(sizes: list[int], max_shard_size: int, stem: str) -> tuple[list[str], list[int]]:
    """save_pretrained's rule over items of ``sizes`` bytes, in order: fill a shard until the next item
    would overflow it (an item is never split: all pieces of one weight stay in one shard, which
    transformers v4 needs to load them). Returns the shard names and each item's shard index."""
    groups: list[int] = []
    size = 0
    for nbytes in sizes:
        if not groups or (size + nbytes > max_shard_size and size > 0):
            groups.append(0)
            size = 0
        groups[-1] += 1
        size += nbytes
    total = len(groups)
    if total <= 1:
        names = [f"{stem}.safetensors"]
    else:
        names = [f"{stem}-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]
    assignment: list[int] = []
    for index, count in enumerate(groups):
        assignment.extend([index] * count)
    return names, assignment


def set_config_dtype(config: dict, dtype: DType) -> None:
    """Record the dtype the weights now have: the keys the config already has (`dtype` in v5,
    `torch_dtype` in v4), and `dtype` for transformers configs (diffusers configs have none)."""
    for key in ("dtype", "torch_dtype"):
        if key in config or (key == "dtype" and "_class_name" not in config):
            config[key] = dtype_name(dtype)


def _output_config(
    source: ModelSource, scheme: QuantScheme, skip_modules: tuple[str, ...], model_dtype: DType
) -> dict | None:
    config = dict(source.config) if source.config is not None else {}
    if source.config is not None and config_dtype(config) != model_dtype:
        # from_pretrained(OUT) loads in the dtype the config names (or guesses one from the first file's
        # tensors): name the model's dtype, as transformers' save_pretrained writes the loaded model's
        set_config_dtype(config, model_dtype)
    config["quantization_config"] = quantization_config(scheme, skip_modules, model_dtype)
    return config


def tensor_shapes(source: ModelSource) -> dict[str, tuple[tuple[int, ...], DType]]:
    """What the planners see of a component's tensors: name → (shape, dtype)."""
    return {name: (info.shape, info.dtype) for name, info in source.tensors.items()}


def plan_component(
    source: ModelSource,
    scheme: QuantScheme,
    max_shard_size: int,
    planner: PlannerName | None = None,
) -> ComponentPlan:
    """The component's output plan: its tensors' decisions, and where each output goes."""
    decided = plan_quantization(source.config, tensor_shapes(source), scheme, planner=planner)
    stem = _weights_stem(source)
    rows = []
    for info in source.in_file_order():
        decision = decided.decisions[info.name]
        dtype = _target_dtype(info, scheme)
        rows.append((info, decision, dtype, _job_entries(info, decision, dtype, scheme)))
    shards, assignment = assign_shards([sum(e.nbytes for e in row[3]) for row in rows], max_shard_size, stem)
    jobs = tuple(
        TensorJob(source=info, decision=decision, dtype=dtype, entries=entries, shard=shards[assignment[i]])
        for i, (info, decision, dtype, entries) in enumerate(rows)
    )
    model_dtype = decided.model_dtype
    return ComponentPlan(
        name=source.name,
        source=source,
        planner=decided.planner,
        planner_reason=decided.reason,
        jobs=jobs,
        shards=tuple(shards),
        skip_modules=decided.skip_modules,
        config=_output_config(source, scheme, decided.skip_modules, model_dtype),
        weights_stem=stem,
        unmatched_skip=decided.unmatched_skip,
        planner_fallback=decided.fallback,
    )


def plan_quantize(
    checkpoint: Checkpoint,
    scheme: QuantScheme,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    planner: PlannerName | None = None,
) -> QuantizePlan:
    positive_size(max_shard_size, "--max-shard-size")
    components = tuple(
        plan_component(source, scheme, max_shard_size, planner) for _, source in sorted(checkpoint.components.items())
    )
    return QuantizePlan(checkpoint=checkpoint, scheme=scheme, components=components)


def index_document(component: ComponentPlan, actual_sizes: dict[str, int]) -> str:
    """model.safetensors.index.json of a component. ``actual_sizes``: tensor bytes written per shard."""
    weight_map = {e.key: j.shard for j in component.jobs for e in j.entries}
    total_parameters = sum(j.source.numel for j in component.jobs)
    return index_json(weight_map, total_parameters, sum(actual_sizes.values()))


def index_json(weight_map: dict[str, str], total_parameters: int, total_size: int) -> str:
    """An index as transformers writes it (sorted keys, indent 2, newline); total_size counts tensor
    data, not headers."""
    document = {
        "metadata": {"total_parameters": total_parameters, "total_size": total_size},
        "weight_map": weight_map,
    }
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


def describe_action(plan: QuantizePlan, job: TensorJob) -> str:
    scheme = plan.scheme
    if not job.quantized:
        return f"keep ({job.decision.reason})"
    fmt = format_label(scheme)
    return f"quantize as {fmt}" + (" (Conv1D, transposed)" if job.decision.transpose else "")


def weights_layout(component: ComponentPlan) -> list:
    """What decides the bytes of a component's weight files, as plain data: each tensor's action, dtype,
    orientation, shard and entries, in order. Not which planner decided, nor its reasons: two plans with
    the same layout write the same files (--resume and the speculative start rely on it)."""
    jobs = [
        [
            j.source.name,
            j.decision.action,
            j.decision.transpose,
            j.dtype.name,
            j.shard,
            [(e.key, e.dtype.name, e.shape, e.variable) for e in j.entries],
        ]
        for j in component.jobs
    ]
    return [component.name, component.weights_stem, list(component.shards), jobs]


def plan_summary(plan: QuantizePlan) -> dict:
    """The plan as plain data: what `--dry-run --json` prints and the dry-run table shows."""
    components = []
    for c in plan.components:
        components.append(
            {
                "name": c.name,
                "planner": c.planner,
                "planner_reason": c.planner_reason,
                "skip_modules": list(c.skip_modules),
                "shards": [{"file": s, "bytes": c.shard_bytes(s)} for s in c.shards],
                "tensors": [
                    {
                        "name": j.source.name,
                        "shape": list(j.source.shape),
                        "dtype": dtype_name(j.source.dtype),
                        "action": j.decision.action,
                        "reason": j.decision.reason,
                        "description": describe_action(plan, j),
                        "transpose": j.decision.transpose,
                        "bytes_in": j.source.nbytes,
                        "bytes_out": j.bytes_out,
                        "shard": j.shard,
                    }
                    for j in c.jobs
                ],
                "quantized": sum(1 for j in c.jobs if j.quantized),
                "kept": sum(1 for j in c.jobs if not j.quantized),
                "bytes_in": c.bytes_in,
                "bytes_out": c.bytes_out,
            }
        )
    return {
        "components": components,
        "bytes_in": plan.bytes_in,
        "bytes_out": plan.bytes_out,
        "unmatched_skip": unmatched_skip(plan),  # likely typos: each matched no module in any component
        "warnings": plan_warnings(plan),  # also printed on stderr
        "keep_budget": plan.keep_budget.as_dict() if plan.keep_budget is not None else None,
    }


def unmatched_skip(plan: QuantizePlan) -> list[str]:
    """The --skip patterns that match no module in any component."""
    return [p for p in plan.scheme.skip if all(p in c.unmatched_skip for c in plan.components)]


def plan_warnings(plan: QuantizePlan) -> list[str]:
    """What the plan warns of: the checkpoint's oddities, a planner that fell back, a --skip typo."""
    return [
        *plan.checkpoint.warnings,
        *(fallback_warning(c.name, c.planner_fallback) for c in plan.components if c.planner_fallback),
        *(f"--skip {pattern!r} matches no module; it changes nothing" for pattern in unmatched_skip(plan)),
    ]
