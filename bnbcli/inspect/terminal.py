"""The readable summary of `bnb inspect` on stdout (through ``bnbcli.output``): errors per scheme, the
tensors worst first, the outlier dimensions that recur across layers, isolated large values."""

from __future__ import annotations

import math

from rich.table import Table

from bnbcli import output
from bnbcli.inspect.outliers import AXIS_WORDS
from bnbcli.inspect.report import InspectReport, TensorReport

SHOWN_UNMEASURED = 5  # weights named under the summary as not measured; --json has them all


def _pct(x: float | None) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{100 * x:.2f}%"


def _num(x: float | None, digits: int = 4) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x:.{digits}g}"


def _outliers(t: TensorReport) -> str:
    if t.norm_dims:
        return "gain " + ", ".join(str(d.dim) for d in t.norm_dims)
    if t.outliers is None:
        return ""
    dims = [f"in {d.dim} ×{d.ratio:.0f}" for d in t.outliers.in_dims]
    dims += [f"out {d.dim} ×{d.ratio:.0f}" for d in t.outliers.out_dims]
    if t.outliers.large_values:
        dims.append(f"{t.outliers.large_values} large")
    return ", ".join(dims)


def _tensor_table(report: InspectReport, top: int) -> None:
    measured = list(report.tensors)
    ordered = sorted(measured, key=lambda t: (-t.worst_rel_error(), t.label))
    shown = ordered[:top] if top > 0 else ordered
    table = Table(title=f"tensors, worst first ({len(shown)} of {len(measured)})", title_justify="left")
    table.add_column("tensor", overflow="fold")
    for column in ("shape", "format", "absmax", "std", "kurt", ">6σ", "NaN/Inf", "outliers"):
        table.add_column(column, justify="left" if column in ("shape", "format", "outliers") else "right")
    for scheme in report.schemes:
        table.add_column(f"rel {scheme}", justify="right")
    for t in shown:
        s = t.stats
        errors = [_pct(e.rel_fro) if (e := t.errors.get(k)) is not None else "—" for k in report.schemes]
        table.add_row(
            t.label,
            "×".join(map(str, t.shape)) or "scalar",
            t.format,
            _num(s.absmax if s else None),
            _num(s.std if s else None),
            _num(s.kurtosis if s else None, 3),
            _pct(s.beyond_6sigma if s else None),
            str(s.nonfinite) if s else "—",
            _outliers(t),
            *errors,
        )
    output.stdout.print(table)


def _summary_table(report: InspectReport) -> None:
    table = Table(title="round-trip error of the weights", title_justify="left")
    for column in ("scheme", "weights", "mean rel", "max rel", "min SQNR dB", "worst"):
        table.add_column(column, justify="left" if column in ("scheme", "worst") else "right")
    for scheme, s in report.summary().items():
        table.add_row(
            scheme,
            str(s["tensors"]),
            _pct(s["mean_rel_error"]),
            _pct(s["max_rel_error"]),
            _num(s["min_sqnr_db"], 3),
            s["worst"] or "—",
        )
    output.stdout.print(table)
    unmeasured = report.unmeasured()
    for t in unmeasured[:SHOWN_UNMEASURED]:
        output.stdout.print(f"not measured: {t.label}: {t.note}")
    if len(unmeasured) > SHOWN_UNMEASURED:
        output.stdout.print(f"… and {len(unmeasured) - SHOWN_UNMEASURED} more weights not measured (--json lists them)")


def render(report: InspectReport, top: int) -> None:
    source = report.source.get("repo_id") or report.source.get("path")
    planners = "; ".join(report.planners.values())
    output.stdout.print(
        f"inspect {source}: {report.kind}, {len(report.tensors)} tensors, {len(report.weights())} weights"
        + (f" — {planners}" if planners else "")
    )
    if report.schemes:
        _summary_table(report)
    _tensor_table(report, top)
    layers = len(report.layers)
    if report.recurring:
        output.stdout.print(f"outlier dimensions recurring across layers ({layers} layers):")
        for r in report.recurring:
            output.stdout.print(
                f"  dim {r.dim} in {AXIS_WORDS[r.axis]}: {len(r.layers)} of {layers} layers, {len(r.tensors)} tensors"
            )
    else:
        output.stdout.print(f"no outlier dimension recurs across layers ({layers} layers)")
    with_large = [t for t in report.weights() if t.outliers is not None and t.outliers.large_values]
    if with_large:
        worst = max(with_large, key=lambda t: t.outliers.top_values[0].sigmas if t.outliers else 0.0)
        assert worst.outliers is not None
        v = worst.outliers.top_values[0]
        output.stdout.print(
            f"isolated large values (≥ {report.criteria.value_sigma:g}σ, outside outlier dims) in {len(with_large)} "
            f"of {len(report.weights())} weights; largest {worst.label} [{v.row}, {v.col}] = {v.value:.4g} "
            f"({v.sigmas:.0f}σ)"
        )
    if report.activations is not None:
        dims = report.activations.get("outlier_dims") or []
        found = ", ".join(str(d.get("dim")) for d in dims) or "none"
        output.stdout.print(
            f"activations ({report.activations.get('model_class')}, {report.activations.get('tokens')} tokens): "
            f"outlier dims {found}; suggested threshold {report.activations.get('suggested_threshold')}"
        )
