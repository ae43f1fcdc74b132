"""The rows of `bnb inspect`: statistics of every tensor, outliers of every weight matrix and the round-trip
errors of every weight under each scheme, a batch of tensors at a time.

A checkpoint of tens of thousands of tiny tensors (MoE experts) would pay dozens of small numpy and torch
calls per tensor, so small tensors wait (``Waiting``) and are measured together: statistics and outlier
screens of same-shaped tensors in one numpy pass (``tensor_stats_many``, ``matrix_outliers_many``), round
trips in one kernel call per scheme (``roundtrip_errors_many``). Every figure is the one-by-one figure
(``tests/unit/test_inspect_batch.py``). A large tensor is measured alone, after those waiting, so rows and
the recurrence of outlier dimensions keep the file's order, and memory holds about one tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

import torch

from bnbcli.formats.batch import SMALL_ELEMENTS
from bnbcli.formats.dtypes import is_float
from bnbcli.formats.metrics import RoundTripError
from bnbcli.inspect.criteria import OutlierCriteria
from bnbcli.inspect.outliers import (
    MatrixOutliers,
    Recurrence,
    is_norm_gain,
    layer_of,
    matrix_outliers_many,
    norm_outliers,
)
from bnbcli.inspect.report import Role, TensorReport
from bnbcli.inspect.roundtrip import NamedScheme, joinable_everywhere, roundtrip_errors, roundtrip_errors_many
from bnbcli.inspect.stats import TensorStats, tensor_stats_many

Progress = Callable[[int], None]
Errors = dict[str, RoundTripError | None]
T = TypeVar("T")

# Small tensors wait for one batch, up to so many of them or elements (each at most SMALL_ELEMENTS).
JOIN_TENSORS = 512
JOIN_ELEMENTS = 1 << 20


@dataclass
class Context:
    backend: str
    schemes: tuple[NamedScheme, ...]
    criteria: OutlierCriteria
    recurrence: Recurrence
    progress: Progress


class Read(NamedTuple):
    """A tensor read and waiting to be measured."""

    name: str
    values: torch.Tensor  # as stored (a bnb weight: restored, in the plain layout)
    dtype: str  # the dtype's name, as stored
    weight: bool  # bnb quantizes it (or quantized it)
    transpose: bool  # stored [in, out] (Conv1D): measured as the model holds it, [out, in]
    nbytes: int  # for the progress


class Waiting:
    """Small tensors waiting to be measured together, their rows then appended to ``rows`` in order."""

    def __init__(self, component: str, ctx: Context, rows: list[TensorReport]) -> None:
        self.component, self.ctx, self.rows = component, ctx, rows
        self.tensors: list[Read] = []
        self.elements = 0

    def add(self, tensor: Read) -> None:
        n = tensor.values.numel()
        if n > SMALL_ELEMENTS:  # its own work dwarfs a call's fixed cost: alone, after those waiting
            self.flush()
            self.rows.extend(measure(self.component, [tensor], self.ctx))
            return
        self.tensors.append(tensor)
        self.elements += n
        if len(self.tensors) >= JOIN_TENSORS or self.elements >= JOIN_ELEMENTS:
            self.flush()

    def flush(self) -> None:
        self.rows.extend(measure(self.component, self.tensors, self.ctx))
        self.tensors, self.elements = [], 0


def measure(component: str, tensors: list[Read], ctx: Context) -> list[TensorReport]:
    """One row per tensor, in order: statistics of any numeric tensor; for a weight also its outliers and
    round-trip errors; for a norm gain the dimensions that stand out."""
    numeric = [i for i, t in enumerate(tensors) if t.values.dtype != torch.bool and not t.values.dtype.is_complex]
    stats = _placed(numeric, tensor_stats_many([tensors[i].values for i in numeric]), len(tensors))
    roles = [_role(t) for t in tensors]
    # what bnb quantize would quantize: a float matrix with elements
    matrices = [i for i, t in enumerate(tensors) if roles[i] == "weight" and _quantizable(t.values)]
    outliers = _placed(
        matrices, matrix_outliers_many([_held(tensors[i]) for i in matrices], ctx.criteria), len(tensors)
    )
    finite = [i for i in matrices if (s := stats[i]) is not None and not s.nonfinite]
    errors = _placed(finite, _roundtrips([_held(tensors[i]).contiguous() for i in finite], ctx), len(tensors))
    rows = [_row(component, t, roles[i], stats[i], outliers[i], errors[i] or {}, ctx) for i, t in enumerate(tensors)]
    for t in tensors:
        ctx.progress(t.nbytes)
    return rows


def _placed(indices: list[int], found: list[T], count: int) -> list[T | None]:
    """``found[k]`` at ``indices[k]`` of a list of ``count``, None elsewhere."""
    placed: list[T | None] = [None] * count
    for i, value in zip(indices, found, strict=True):
        placed[i] = value
    return placed


def _role(t: Read) -> Role:
    shape = t.values.shape
    return "weight" if t.weight and len(shape) == 2 else ("norm" if is_norm_gain(t.name, tuple(shape)) else "other")


def _quantizable(values: torch.Tensor) -> bool:
    return is_float(values.dtype) and values.numel() > 0


def _held(t: Read) -> torch.Tensor:
    """The weight as the model holds it, [out, in]."""
    return t.values.t() if t.transpose else t.values


def _roundtrips(weights: list[torch.Tensor], ctx: Context) -> list[Errors]:
    """The errors of each weight under every scheme: small ones joined, the others one by one."""
    if not ctx.schemes:
        return [{} for _ in weights]
    joined = [i for i, w in enumerate(weights) if joinable_everywhere(w, ctx.schemes, ctx.backend)]
    errors: list[Errors] = [{} for _ in weights]
    for i, found in zip(joined, roundtrip_errors_many([weights[i] for i in joined], ctx.schemes), strict=True):
        errors[i] = dict(found)
    for i in sorted(set(range(len(weights))) - set(joined)):
        errors[i] = dict(roundtrip_errors(weights[i], ctx.schemes, ctx.backend))
    return errors


def _row(
    component: str,
    t: Read,
    role: Role,
    stats: TensorStats | None,
    outliers: MatrixOutliers | None,
    errors: Errors,
    ctx: Context,
) -> TensorReport:
    """The tensor's row; its outlier dimensions into the recurrence, in file order."""
    label = f"{component}/{t.name}" if component else t.name
    row = (t.name, component, t.dtype, tuple(t.values.shape), t.dtype, role, layer_of(t.name), stats)
    if role == "norm" and t.values.dtype.is_floating_point:
        dims = norm_outliers(t.values, ctx.criteria)
        ctx.recurrence.add(label, "norm", dims)
        return TensorReport(*row, norm_dims=dims)
    if role != "weight":
        return TensorReport(*row)
    not_measured: Errors = dict.fromkeys((s.name for s in ctx.schemes), None)
    if outliers is None:  # what bnb quantize refuses to quantize
        what = "empty" if t.values.numel() == 0 else f"{t.dtype}: bitsandbytes quantizes float16, bfloat16 or float32"
        return TensorReport(*row, errors=not_measured, note=f"{what}; round trip not measured")
    ctx.recurrence.add(label, "in", outliers.in_dims)
    ctx.recurrence.add(label, "out", outliers.out_dims)
    if stats is not None and stats.nonfinite:
        note = f"{stats.nan} NaN and {stats.inf} Inf values: round trip not measured"
        return TensorReport(*row, outliers=outliers, errors=not_measured, note=note)
    return TensorReport(*row, outliers=outliers, errors=errors)
