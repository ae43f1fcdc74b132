"""`--report FILE.html`: one self-contained page — inline CSS and SVG, no script, no network.

Sections: the summary per scheme; per-layer error bars (mean relative error of each layer's weights,
one bar per scheme); an outlier-dimension × layer heatmap (how many of a layer's tensors have that
dimension as an outlier); the activation outliers when measured; the tensor table, worst first.
"""

from __future__ import annotations

import math
from collections import Counter
from html import escape
from pathlib import Path
from typing import Any

from bnbcli.checkpoint.atomic import check_output_file, write_file
from bnbcli.inspect.outliers import AXIS_WORDS, layer_of
from bnbcli.inspect.report import InspectReport, TensorReport

COLORS = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#b07aa1", "#76b7b2")
CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
th:first-child, td:first-child { text-align: left; font-family: monospace; }
.fail { background: #fdd; }
svg text { font: 11px sans-serif; }
"""


def _pct(x: float | None) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{100 * x:.3g}%"


def _num(x: float | int | None) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def _error_bars(report: InspectReport) -> str:
    by_layer = report.per_layer_errors()
    if not by_layer:
        return "<p>No per-layer errors (no weights in numbered layers were measured).</p>"
    schemes = list(report.schemes)
    top = max(v for by in by_layer.values() for v in by.values()) or 1.0
    bar, gap, height, left = 10, 8, 180, 60
    group = bar * len(schemes) + gap
    width = left + group * len(by_layer) + 20
    parts = [f'<svg width="{width}" height="{height + 90}">']
    parts.append(f'<line x1="{left}" y1="10" x2="{left}" y2="{height + 10}" stroke="#888"/>')
    parts.append(f'<text x="{left - 4}" y="16" text-anchor="end">{_pct(top)}</text>')
    parts.append(f'<text x="{left - 4}" y="{height + 10}" text-anchor="end">0</text>')
    for i, (layer, by) in enumerate(by_layer.items()):
        x0 = left + 4 + i * group
        for j, scheme in enumerate(schemes):
            value = by.get(scheme)
            if value is None:
                continue
            h = height * value / top
            color = COLORS[j % len(COLORS)]
            title = f"{escape(layer)} {escape(scheme)}: {_pct(value)}"
            parts.append(
                f'<rect x="{x0 + j * bar}" y="{10 + height - h:.1f}" width="{bar - 1}" height="{h:.1f}" '
                f'fill="{color}"><title>{title}</title></rect>'
            )
        label = escape(layer.rsplit(".", 1)[-1] if "." in layer else layer)
        parts.append(f'<text x="{x0}" y="{height + 24}">{label}</text>')
    for j, scheme in enumerate(schemes):
        y = height + 44 + 14 * (j % 3)
        x = left + 120 * (j // 3)
        parts.append(f'<rect x="{x}" y="{y - 9}" width="10" height="10" fill="{COLORS[j % len(COLORS)]}"/>')
        parts.append(f'<text x="{x + 14}" y="{y}">{escape(scheme)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _heatmap(report: InspectReport) -> str:
    if not report.recurring or not report.layers:
        return "<p>No outlier dimension recurs across layers.</p>"
    layers = list(report.layers)
    cell, left, top = 16, 150, 80
    width = left + cell * len(layers) + 20
    height = top + cell * len(report.recurring) + 10
    counts = [Counter(layer_of(tensor) for tensor in r.tensors) for r in report.recurring]
    peak = max((max(p.values()) for p in counts), default=1) or 1
    parts = [f'<svg width="{width}" height="{height}">']
    for k, layer in enumerate(layers):
        x = left + k * cell + cell / 2
        parts.append(f'<text transform="translate({x},{top - 4}) rotate(-60)">{escape(layer)}</text>')
    for i, (r, per) in enumerate(zip(report.recurring, counts, strict=True)):
        y = top + i * cell
        parts.append(f'<text x="{left - 4}" y="{y + 12}" text-anchor="end">dim {r.dim} ({r.axis})</text>')
        for k, layer in enumerate(layers):
            n = per[layer]
            shade = 255 - int(200 * n / peak)
            parts.append(
                f'<rect x="{left + k * cell}" y="{y}" width="{cell - 1}" height="{cell - 1}" '
                f'fill="rgb(255,{shade},{shade})"><title>dim {r.dim} ({AXIS_WORDS[r.axis]}), '
                f"{escape(layer)}: {n} tensors</title></rect>"
            )
    parts.append("</svg>")
    return "".join(parts)


def _tensor_rows(report: InspectReport) -> str:
    failed = {f.tensor for f in report.failures}
    rows = []
    ordered: list[TensorReport] = sorted(report.tensors, key=lambda t: -t.worst_rel_error())
    for t in ordered:
        s = t.stats
        outliers = ""
        if t.outliers is not None:
            dims = [f"in {d.dim}" for d in t.outliers.in_dims] + [f"out {d.dim}" for d in t.outliers.out_dims]
            outliers = ", ".join(dims) + (f"; {t.outliers.large_values} large" if t.outliers.large_values else "")
        elif t.norm_dims:
            outliers = "gain " + ", ".join(str(d.dim) for d in t.norm_dims)
        errors = "".join(
            f"<td>{_pct(e.rel_fro if e else None)}</td>" for e in (t.errors.get(k) for k in report.schemes)
        )
        cls = ' class="fail"' if t.label in failed else ""
        rows.append(
            f"<tr{cls}><td>{escape(t.label)}</td><td>{'×'.join(map(str, t.shape))}</td><td>{escape(t.format)}</td>"
            f"<td>{_num(s.absmax if s else None)}</td><td>{_num(s.std if s else None)}</td>"
            f"<td>{_num(s.kurtosis if s else None)}</td><td>{_pct(s.beyond_6sigma if s else None)}</td>"
            f"<td>{_num(s.nonfinite if s else None)}</td><td>{escape(outliers)}</td>{errors}</tr>"
        )
    heads = "".join(f"<th>rel. error {escape(k)}</th>" for k in report.schemes)
    return (
        "<table><tr><th>tensor</th><th>shape</th><th>format</th><th>absmax</th><th>std</th><th>kurtosis</th>"
        f"<th>&gt;6σ</th><th>NaN/Inf</th><th>outliers</th>{heads}</tr>{''.join(rows)}</table>"
    )


def _summary(report: InspectReport) -> str:
    rows = "".join(
        f"<tr><td>{escape(k)}</td><td>{v['tensors']}</td><td>{_pct(v['mean_rel_error'])}</td>"
        f"<td>{_pct(v['max_rel_error'])}</td><td>{_num(v['min_sqnr_db'])}</td><td>{escape(v['worst'] or '—')}</td></tr>"
        for k, v in report.summary().items()
    )
    unmeasured = "".join(f"<li>{escape(t.label)}: {escape(t.note or '')}</li>" for t in report.unmeasured())
    return (
        "<table><tr><th>scheme</th><th>weights</th><th>mean rel. error</th><th>max rel. error</th>"
        f"<th>min SQNR dB</th><th>worst</th></tr>{rows}</table>"
        + (f"<p>Not measured:</p><ul>{unmeasured}</ul>" if unmeasured else "")
    )


def _activations(activations: dict[str, Any] | None) -> str:
    if activations is None:
        return ""
    dims = activations.get("outlier_dims") or []
    rows = "".join(
        f"<tr><td>{escape(str(d.get('dim')))}</td><td>{escape(str(d.get('layer_count')))}</td>"
        f"<td>{_pct(d.get('layer_share'))}</td><td>{_pct(d.get('position_share'))}</td>"
        f"<td>{_num(d.get('max_magnitude'))}</td></tr>"
        for d in dims
    )
    skip = ", ".join(map(str, activations.get("suggested_skip_modules") or [])) or "none"
    return (
        f"<h2>Activations</h2><p>{escape(str(activations.get('model_class')))}, "
        f"{escape(str(activations.get('tokens')))} tokens; suggested threshold "
        f"{escape(_num(activations.get('suggested_threshold')))}; suggested skip modules: {escape(skip)}</p>"
        "<table><tr><th>dim</th><th>layers</th><th>layer share</th><th>position share</th><th>max |x|</th></tr>"
        f"{rows}</table>"
    )


# How every report begins: what tells a report bnb wrote, which --report may replace, from any other file.
HEAD = '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>bnb inspect'


def check_report_path(path: Path) -> None:
    """Fail now, before the inspection, if the report could not be written to ``path``."""
    check_output_file(path, HEAD.encode(), "--report")


def write_report(report: InspectReport, path: Path) -> None:
    write_file(path, render_html(report).encode(), HEAD.encode(), "--report")


def render_html(report: InspectReport) -> str:
    source = report.source.get("repo_id") or report.source.get("path")
    failures = "".join(f"<li>{escape(f.line())}</li>" for f in report.failures)
    gates = f"<h2>Gates</h2><ul>{failures}</ul>" if report.failures else ""
    recurring = "".join(
        f"<li>dim {r.dim} in {AXIS_WORDS[r.axis]}: {len(r.layers)} of {len(report.layers)} layers, "
        f"{len(r.tensors)} tensors</li>"
        for r in report.recurring
    )
    return (
        f"{HEAD} — {escape(str(source))}</title><style>{CSS}</style></head><body>"
        f"<h1>bnb inspect — {escape(str(source))}</h1>"
        f"<p>{escape(report.kind)} checkpoint; {len(report.tensors)} tensors, {len(report.weights())} weights; "
        f"backend {escape(report.backend)}</p>{gates}"
        f"<h2>Round-trip error</h2>{_summary(report)}"
        f"<h2>Per-layer error</h2>{_error_bars(report)}"
        f"<h2>Outlier dimensions × layers</h2><ul>{recurring}</ul>{_heatmap(report)}"
        f"{_activations(report.activations)}"
        f"<h2>Tensors (worst first)</h2>{_tensor_rows(report)}"
        "</body></html>\n"
    )
