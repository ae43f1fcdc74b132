"""The report of `bnb inspect`: frozen records, and ``as_dict()`` for --json (raw numbers, no NaN/inf)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from bnbcli.formats.metrics import RoundTripError
from bnbcli.inspect.criteria import OutlierCriteria
from bnbcli.inspect.outliers import MatrixOutliers, OutlierDim, RecurringDim
from bnbcli.inspect.stats import TensorStats

Role = Literal["weight", "norm", "other"]
AGAINST = "against"  # the error key of a bnb checkpoint's weight measured against --against SRC


@dataclass(frozen=True)
class TensorReport:
    name: str
    component: str  # diffusers component, "" for a plain model
    dtype: str  # as stored (for a bnb weight: the dtype it dequantizes to)
    shape: tuple[int, ...]  # as stored (for a bnb weight: the plain shape)
    format: str  # "bfloat16", "nf4 b64", "nf4 b64 +dq", "int8 rowwise", …
    role: Role  # weight: what bnb quantizes (or quantized); norm: a norm gain; other: the rest
    layer: str | None
    stats: TensorStats | None  # None for non-numeric tensors
    outliers: MatrixOutliers | None = None  # weights only
    norm_dims: tuple[OutlierDim, ...] = ()  # norm gains only
    errors: dict[str, RoundTripError | None] = field(default_factory=dict)  # scheme → error; None: not measured
    note: str | None = None  # why something was not measured

    @property
    def label(self) -> str:
        return f"{self.component}/{self.name}" if self.component else self.name

    @property
    def unmeasured(self) -> bool:
        """A weight whose round trip could not be measured (NaN/Inf values, a dtype bitsandbytes refuses)."""
        return self.role == "weight" and self.note is not None

    def worst_rel_error(self, schemes: tuple[str, ...] | None = None) -> float:
        """The largest relative error; inf for an unmeasured weight (worst first), -1 for no error at all."""
        if self.unmeasured:
            return math.inf
        values = [e.rel_fro for k, e in self.errors.items() if e is not None and (schemes is None or k in schemes)]
        return max(values, default=-1.0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "component": self.component,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "format": self.format,
            "role": self.role,
            "layer": self.layer,
            "stats": self.stats.as_dict() if self.stats else None,
            "outliers": self.outliers.as_dict() if self.outliers else None,
            "norm_dims": [{"dim": d.dim, "ratio": d.ratio} for d in self.norm_dims],
            "errors": {k: (e.as_dict() if e is not None else None) for k, e in self.errors.items()},
            "note": self.note,
        }


@dataclass(frozen=True)
class GateFailure:
    tensor: str
    gate: str  # the option: --max-rel-error, …
    value: float
    limit: float
    scheme: str | None = None

    def line(self) -> str:
        where = f" ({self.scheme})" if self.scheme else ""
        return f"{self.tensor}: {self.gate} {_num(self.limit)} failed{where}: {_num(self.value)}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "tensor": self.tensor,
            "gate": self.gate,
            "scheme": self.scheme,
            "value": finite(self.value),
            "limit": self.limit,
        }


def _num(x: float) -> str:
    return f"{x:.6g}"


def finite(x: float | None) -> float | None:
    """JSON has no NaN or inf: those become null."""
    return x if x is not None and math.isfinite(x) else None


@dataclass(frozen=True)
class InspectReport:
    source: dict[str, Any]
    kind: Literal["unquantized", "bitsandbytes"]
    schemes: tuple[str, ...]  # error keys, in order
    backend: str
    criteria: OutlierCriteria
    planners: dict[str, str]  # component → how its weights were chosen
    against: str | None
    tensors: tuple[TensorReport, ...]
    recurring: tuple[RecurringDim, ...]
    layers: tuple[str, ...]
    activations: dict[str, Any] | None = None
    gates: dict[str, float | str | None] = field(default_factory=dict)
    failures: tuple[GateFailure, ...] = ()
    root: Path | None = None  # the checkpoint's folder (a Hub snapshot's, too): where --activations loads from
    warnings: tuple[str, ...] = ()  # a planner that fell back, shards the index leaves out (also on stderr)

    def weights(self) -> list[TensorReport]:
        return [t for t in self.tensors if t.role == "weight"]

    def unmeasured(self) -> list[TensorReport]:
        return [t for t in self.tensors if t.unmeasured]

    def summary(self) -> dict[str, Any]:
        """Per scheme: tensors measured, mean and max relative error, the worst tensor, the lowest SQNR, and
        the weights that could not be measured (named: they are the ones to look at first)."""
        out: dict[str, Any] = {}
        unmeasured = [t.label for t in self.unmeasured()]
        for scheme in self.schemes:
            measured = [(t, e) for t in self.tensors if (e := t.errors.get(scheme)) is not None]
            if not measured:
                out[scheme] = {
                    "tensors": 0,
                    "mean_rel_error": None,
                    "max_rel_error": None,
                    "min_sqnr_db": None,
                    "worst": None,
                    "not_measured": unmeasured,
                }
                continue
            worst, error = max(measured, key=lambda te: te[1].rel_fro)
            sqnr = min(e.sqnr_db for _, e in measured)
            out[scheme] = {
                "tensors": len(measured),
                "mean_rel_error": finite(sum(e.rel_fro for _, e in measured) / len(measured)),
                "max_rel_error": finite(error.rel_fro),
                "min_sqnr_db": finite(sqnr),
                "worst": worst.label,
                "not_measured": unmeasured,
            }
        return out

    def per_layer_errors(self) -> dict[str, dict[str, float]]:
        """layer → scheme → mean relative error of its weights (for the report's bars)."""
        sums: dict[str, dict[str, list[float]]] = {}
        for t in self.weights():
            for scheme, e in t.errors.items():
                if e is not None and t.layer is not None and math.isfinite(e.rel_fro):
                    sums.setdefault(t.layer, {}).setdefault(scheme, []).append(e.rel_fro)
        return {layer: {s: sum(v) / len(v) for s, v in by.items()} for layer, by in sums.items()}

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "kind": self.kind,
            "settings": {
                "schemes": list(self.schemes),
                "backend": self.backend,
                "against": self.against,
                "outlier_criteria": self.criteria.as_dict(),
            },
            "planners": self.planners,
            "summary": self.summary(),
            "outlier_dims": {
                "layers": list(self.layers),
                "recurring": [r.as_dict() for r in self.recurring],
            },
            "tensors": [t.as_dict() for t in self.tensors],
            "activations": self.activations,
            "gates": {
                "limits": self.gates,
                "passed": not self.failures,
                "failures": [f.as_dict() for f in self.failures],
            },
            "warnings": list(self.warnings),
        }
