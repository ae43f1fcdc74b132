"""CI gates over a report: each limit is checked per tensor, and every tensor that misses one is named.

``--max-rel-error X``   a weight's relative error ‖w − ŵ‖/‖w‖ above X, for each scheme (or ``--gate-scheme``)
``--min-sqnr DB``       a weight's SQNR below DB dB, likewise
``--max-outlier-dims N`` a weight matrix with more than N outlier dimensions (input columns + output rows)
``--max-nonfinite N``   a tensor with more than N NaN/Inf values
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from bnbcli.errors import UsageError
from bnbcli.inspect.report import GateFailure, TensorReport


@dataclass(frozen=True)
class Gates:
    max_rel_error: float | None = None
    min_sqnr: float | None = None
    max_outlier_dims: int | None = None
    max_nonfinite: int | None = None
    scheme: str | None = None  # the scheme the error gates look at; None: every scheme

    def __post_init__(self) -> None:
        for option, value, example in (
            ("--max-rel-error", self.max_rel_error, 0.15),  # NF4's error on most weights is 9-10%
            ("--max-outlier-dims", self.max_outlier_dims, 8),
            ("--max-nonfinite", self.max_nonfinite, 0),
        ):
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise UsageError(f"{option} must be a number >= 0, not {value}", hint=f"for example {option} {example}")
        if self.min_sqnr is not None and not math.isfinite(self.min_sqnr):
            raise UsageError(
                f"--min-sqnr must be a finite number of dB, not {self.min_sqnr}", hint="for example --min-sqnr 20"
            )

    def check_scheme(self, schemes: tuple[str, ...]) -> None:
        if self.scheme is not None and self.scheme not in schemes:
            raise UsageError(
                f"--gate-scheme {self.scheme} is not among the schemes measured ({', '.join(schemes) or 'none'})",
                hint="add it to --schemes, or leave --gate-scheme out to gate every scheme",
            )

    def as_dict(self) -> dict[str, float | str | None]:
        return {
            "max_rel_error": self.max_rel_error,
            "min_sqnr": self.min_sqnr,
            "max_outlier_dims": self.max_outlier_dims,
            "max_nonfinite": self.max_nonfinite,
            "scheme": self.scheme,
        }


def check(gates: Gates, tensors: tuple[TensorReport, ...]) -> tuple[GateFailure, ...]:
    """Every (tensor, gate, scheme) that misses its limit, in report order."""
    failures: list[GateFailure] = []
    for t in tensors:
        for scheme, e in t.errors.items():
            if e is None or (gates.scheme is not None and scheme != gates.scheme):
                continue
            if gates.max_rel_error is not None and not e.rel_fro <= gates.max_rel_error:
                failures.append(GateFailure(t.label, "--max-rel-error", e.rel_fro, gates.max_rel_error, scheme))
            if gates.min_sqnr is not None and not e.sqnr_db >= gates.min_sqnr:
                failures.append(GateFailure(t.label, "--min-sqnr", e.sqnr_db, gates.min_sqnr, scheme))
        if gates.max_outlier_dims is not None and t.outliers is not None and t.outliers.count > gates.max_outlier_dims:
            failures.append(GateFailure(t.label, "--max-outlier-dims", t.outliers.count, gates.max_outlier_dims))
        if gates.max_nonfinite is not None and t.stats is not None and t.stats.nonfinite > gates.max_nonfinite:
            failures.append(GateFailure(t.label, "--max-nonfinite", t.stats.nonfinite, gates.max_nonfinite))
    return tuple(failures)
