"""`bnb inspect` as a library call: open the checkpoint, decide which tensors are weights, stream every
tensor once (read, measure, drop), and build one frozen report.

An unquantized checkpoint's weights are the tensors `bnb quantize` would quantize (the same planners:
transformers' or diffusers' own rules, else name rules); each is measured under every scheme. A
bitsandbytes checkpoint is recognised from its keys and quant_state JSONs (``bnbcli.plan.dequantize_layout``),
every weight is restored with the bit-exact dequantization (``bnbcli.pipeline.dequantize.restore``), and with
``against`` it is compared with the original. Memory holds one tensor (and its float64 chunks).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

import torch

from bnbcli.backends import resolve_backend
from bnbcli.checkpoint.safetensors_file import TensorInfo
from bnbcli.checkpoint.source import Checkpoint, ModelSource, open_checkpoint
from bnbcli.checkpoint.tensor_reads import read_tensor, read_tensors
from bnbcli.errors import InputError, UsageError
from bnbcli.formats.dtypes import dtype_name
from bnbcli.formats.metrics import RoundTripError, error_from_sums, roundtrip_sums
from bnbcli.inspect.criteria import OutlierCriteria
from bnbcli.inspect.gates import Gates, check
from bnbcli.inspect.measure import Context, Progress, Read, Waiting, measure
from bnbcli.inspect.outliers import Recurrence
from bnbcli.inspect.report import AGAINST, InspectReport, TensorReport
from bnbcli.inspect.roundtrip import (
    parse_schemes,
)
from bnbcli.pipeline.dequantize import restore
from bnbcli.pipeline.request import source_label
from bnbcli.plan.decisions import PlannerName, QuantPlan, fallback_warning, plan_quantization
from bnbcli.plan.dequantize_layout import DequantComponent, OutputTensor, plan_component
from bnbcli.plan.quantize_layout import tensor_shapes
from bnbcli.plan.scheme import QuantScheme
from bnbcli.plan.scheme_names import DEFAULT_ROUNDTRIPS


@dataclass(frozen=True)
class InspectRequest:
    src: str
    schemes: tuple[str, ...] = DEFAULT_ROUNDTRIPS
    blocksize: int = 64
    against: str | None = None
    revision: str | None = None
    components: tuple[str, ...] | None = None
    backend: str = "auto"
    planner: PlannerName | None = None
    criteria: OutlierCriteria = field(default_factory=OutlierCriteria)
    gates: Gates = field(default_factory=Gates)


def _check_criteria(criteria: OutlierCriteria) -> None:
    if not criteria.factor > 1:
        raise UsageError(f"--outlier-factor must be above 1, not {criteria.factor}", hint="5 is the default")
    if not criteria.value_sigma > 0:
        raise UsageError(f"--value-sigma must be positive, not {criteria.value_sigma}", hint="10 is the default")
    if not 0 < criteria.min_layer_share <= 1:
        raise UsageError(
            f"--min-layer-share must be in (0, 1], not {criteria.min_layer_share}", hint="0.25 is the default"
        )


def open_source(request: InspectRequest) -> Checkpoint:
    """Headers only: checks the request and opens the checkpoint (the progress bar's total comes from it)."""
    resolve_backend(request.backend)
    parse_schemes(request.schemes, request.blocksize)
    _check_criteria(request.criteria)
    return open_checkpoint(request.src, revision=request.revision, components=request.components)


def inspect(request: InspectRequest, checkpoint: Checkpoint, progress: Progress = lambda n: None) -> InspectReport:
    backend = resolve_backend(request.backend)
    schemes = parse_schemes(request.schemes, request.blocksize)
    plans = {name: plan_component(source, None, None) for name, source in sorted(checkpoint.components.items())}
    quantized = any(not p.copy_as_is for p in plans.values())
    if request.against is not None and not quantized:
        raise UsageError(
            f"--against compares a bitsandbytes checkpoint with its original, and {request.src} is not quantized",
            hint="leave out --against: an unquantized checkpoint is measured under --schemes",
        )
    error_keys = ((AGAINST,) if request.against else ()) if quantized else tuple(s.name for s in schemes)
    request.gates.check_scheme(error_keys)
    originals = open_checkpoint(request.against).components if request.against else {}
    ctx = Context(backend, schemes, request.criteria, Recurrence(request.criteria), progress)
    rows: list[TensorReport] = []
    planners: dict[str, str] = {}
    warnings = checkpoint.warnings
    for name, source in sorted(checkpoint.components.items()):
        if plans[name].copy_as_is:
            # an unquantized model's weights are measured under --schemes; a component that a bnb
            # pipeline left unquantized is only described
            plan = None if quantized else _weights_of(source, request.planner)
            planners[name] = plan.reason if plan is not None else ""
            if plan is not None and plan.fallback:
                warnings.append(fallback_warning(name, plan.fallback))
            _plain(source, plan, ctx, rows)
        else:
            planners[name] = "bitsandbytes checkpoint: quant_state and SCB keys"
            # the weights are measured against the original, not re-quantized under --schemes
            _bnb(plans[name], _original(originals, name, request.against), replace(ctx, schemes=()), rows)
    tensors = tuple(rows)
    return InspectReport(
        source=source_label(checkpoint),
        kind="bitsandbytes" if quantized else "unquantized",
        schemes=error_keys,
        backend=backend,
        criteria=request.criteria,
        planners={k: v for k, v in planners.items() if v},
        against=request.against,
        tensors=tensors,
        recurring=ctx.recurrence.result(),
        layers=tuple(ctx.recurrence.layers),
        gates=request.gates.as_dict(),
        failures=check(request.gates, tensors),
        root=checkpoint.root,
        warnings=tuple(warnings),
    )


def _original(originals: dict[str, ModelSource], name: str, against: str | None) -> ModelSource | None:
    if against is None:
        return None
    if name not in originals:
        raise InputError(f"{against} has no component {name!r} to compare with", hint="give the original checkpoint")
    return originals[name]


def _weights_of(source: ModelSource, planner: PlannerName | None) -> QuantPlan:
    """The tensors `bnb quantize` would quantize; those it would refuse (an int64 weight) are measured as far
    as they can be, and say why not further (``_measure``)."""
    return plan_quantization(source.config, tensor_shapes(source), QuantScheme(), planner, strict=False)


def _plain(source: ModelSource, plan: QuantPlan | None, ctx: Context, rows: list[TensorReport]) -> None:
    """Every tensor of an unquantized model, its weights as ``plan`` decides them (or of a component left
    unquantized in a bnb pipeline: ``plan`` None, nothing is a weight)."""
    decisions = dict(plan.decisions) if plan is not None else {}
    waiting = Waiting(source.name, ctx, rows)
    infos = list(source.in_file_order())
    for info, values in zip(infos, read_tensors(infos), strict=True):  # small neighbours with one read
        decision = decisions.get(info.name)
        quantize = decision is not None and decision.action == "quantize"
        transpose = decision is not None and decision.transpose
        waiting.add(Read(info.name, values, dtype_name(info.dtype), quantize, transpose, info.nbytes))
    waiting.flush()


def _bnb(component: DequantComponent, original: ModelSource | None, ctx: Context, rows: list[TensorReport]) -> None:
    ctx = replace(ctx, schemes=())  # a bnb weight's errors are --against's alone: no round trip under --schemes
    for t in component.tensors:
        # in the plain layout (Conv1D weights back in [in, out]), before any cast to the model dtype
        values = restore(t, ctx.backend, cast=False)
        errors: dict[str, RoundTripError | None] = {}
        if original is not None and t.kind != "copy":
            errors[AGAINST] = _against(original, t, values)
        read = Read(t.name, values, dtype_name(t.dtype), t.kind != "copy", t.transpose, t.bytes_in)
        (row,) = measure(component.name, [read], ctx)
        rows.append(replace(row, format=_format(t), errors=errors))
        del values, read


def _against(original: ModelSource, t: OutputTensor, values: torch.Tensor) -> RoundTripError:
    info: TensorInfo | None = original.tensors.get(t.name)
    if info is None:
        raise InputError(
            f"the original has no tensor {t.name!r}", hint="--against must be the checkpoint it was made from"
        )
    if info.shape != tuple(values.shape):
        raise InputError(
            f"{t.name}: the original is {list(info.shape)}, the quantized weight restores to {list(values.shape)}",
            hint="--against must be the checkpoint it was made from",
        )
    src = read_tensor(info)
    return error_from_sums(roundtrip_sums(src, values), src.numel())


def _format(t: OutputTensor) -> str:
    if t.kind == "int8":
        return "int8 rowwise"
    if t.kind == "4bit":
        assert t.state_json is not None
        state = json.loads(t.state_json)
        return f"{state['quant_type']} b{state['blocksize']}" + (" +dq" if "nested_offset" in state else "")
    return dtype_name(t.dtype)


__all__ = ["InspectRequest", "inspect", "open_source"]
