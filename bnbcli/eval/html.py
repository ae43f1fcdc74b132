"""`bnb eval --report FILE.html`: one self-contained page beside `bnb inspect`'s — inline CSS and SVG, no
script, no network: the statistics, the per-layer error plot and the histogram of per-token KLD (or, for
an encoder, of 1 − cosine), on a log scale since both span orders of magnitude."""

from __future__ import annotations

import math
from html import escape
from pathlib import Path

import numpy as np

from bnbcli.checkpoint.atomic import check_output_file, write_file
from bnbcli.eval.report import EvalReport
from bnbcli.eval.terminal import causal_rows, encoder_rows
from bnbcli.inspect.html import COLORS, CSS

DECADES = (-6, 1)  # histogram bins: 10^-6 … 10^1, four per decade, plus one below
BINS_PER_DECADE = 4

# How every report begins: an existing file that begins so is bnb's to replace (checkpoint/atomic.py).
HEAD = '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>bnb eval'


def check_report_path(path: Path) -> None:
    """Fail now, before the models run, if the report could not be written to ``path``."""
    check_output_file(path, HEAD.encode(), "--report")


def write_report(report: EvalReport, path: Path) -> None:
    write_file(path, render_html(report).encode(), HEAD.encode(), "--report")


def _layer_plot(report: EvalReport) -> str:
    layers = [layer for layer in report.layers if math.isfinite(layer.rel_l2)]
    if not layers:
        return "<p>No layer was compared.</p>"
    top = max(layer.rel_l2 for layer in layers) or 1.0
    bar, height, left = 14, 180, 60
    width = left + bar * len(layers) + 20
    parts = [f'<svg width="{width}" height="{height + 60}">']
    parts.append(f'<line x1="{left}" y1="10" x2="{left}" y2="{height + 10}" stroke="#888"/>')
    parts.append(f'<text x="{left - 4}" y="16" text-anchor="end">{100 * top:.3g}%</text>')
    parts.append(f'<text x="{left - 4}" y="{height + 10}" text-anchor="end">0</text>')
    for i, layer in enumerate(layers):
        h = height * layer.rel_l2 / top
        x = left + 4 + i * bar
        title = f"{escape(layer.name)}: rel L2 {100 * layer.rel_l2:.3g}%, cosine {layer.cosine:.5f}"
        parts.append(
            f'<rect x="{x}" y="{10 + height - h:.1f}" width="{bar - 2}" height="{h:.1f}" fill="{COLORS[0]}">'
            f"<title>{title}</title></rect>"
        )
        if i % max(1, len(layers) // 12) == 0:
            label = escape(layer.name.rsplit(".", 1)[-1])
            parts.append(f'<text x="{x}" y="{height + 26}">{label}</text>')
    parts.append(f'<text x="{left}" y="{height + 48}">relative L2 error of the hidden state after each layer</text>')
    parts.append("</svg>")
    return "".join(parts)


def _histogram(values: np.ndarray, what: str) -> str:
    """Counts per quarter decade of ``values`` (those ≤ 10^-6, zeros and negatives included, in the first bar)."""
    if values.size == 0:
        return "<p>No tokens.</p>"
    edges = [
        10.0 ** (d / BINS_PER_DECADE) for d in range(DECADES[0] * BINS_PER_DECADE, DECADES[1] * BINS_PER_DECADE + 1)
    ]
    counts = np.histogram(np.clip(values, edges[0] / 2, edges[-1]), bins=[-math.inf, *edges[1:-1], math.inf])[0]
    bar, height, left = 12, 160, 50
    peak = int(counts.max()) or 1
    parts = [f'<svg width="{left + bar * len(counts) + 20}" height="{height + 60}">']
    parts.append(f'<text x="{left - 4}" y="16" text-anchor="end">{peak}</text>')
    for i, n in enumerate(counts.tolist()):
        h = height * n / peak
        low = "≤ 1e-6" if i == 0 else f"{edges[i]:.2g}"
        parts.append(
            f'<rect x="{left + i * bar}" y="{10 + height - h:.1f}" width="{bar - 1}" height="{h:.1f}" '
            f'fill="{COLORS[1]}"><title>{escape(what)} from {low}: {n} tokens</title></rect>'
        )
    for d in range(DECADES[0], DECADES[1] + 1):
        x = left + (d - DECADES[0]) * BINS_PER_DECADE * bar
        parts.append(f'<text x="{x}" y="{height + 26}">1e{d}</text>')
    parts.append(f'<text x="{left}" y="{height + 48}">tokens per {escape(what)}, log scale</text></svg>')
    return "".join(parts)


def render_html(report: EvalReport) -> str:
    rows = causal_rows(report.causal) if report.causal else encoder_rows(report.encoder) if report.encoder else []
    table = "".join(f"<tr><td>{escape(k)}</td><td>{escape(v)}</td></tr>" for k, v in rows)
    if report.causal is not None:
        histogram = "<h2>KL divergence per token</h2>" + _histogram(report.causal.kld_values, "KLD")
    else:
        assert report.encoder is not None
        histogram = "<h2>1 − cosine per token</h2>" + _histogram(1 - report.encoder.token_cosines, "1 − cosine")
    layer_rows = "".join(
        f"<tr><td>{escape(layer.name)}</td><td>{100 * layer.rel_l2:.4g}%</td><td>{layer.cosine:.6f}</td>"
        f"<td>{layer.min_cosine:.6f}</td></tr>"
        for layer in report.layers
    )
    failures = "".join(f"<li>{escape(f.line())}</li>" for f in report.failures)
    title = f"bnb eval — {escape(report.quant)}"
    return (
        f"{HEAD} — {escape(report.quant)}</title><style>{CSS}</style>"
        f"</head><body><h1>{title}</h1>"
        f"<p>against {escape(report.orig)}; {escape(report.model_class)} on {escape(report.device)}; "
        f"{report.texts['tokens']} tokens; {escape(report.memory.describe())}</p>"
        f"<p><b>{escape(report.verdict())}</b></p>"
        + (f"<h2>Gates</h2><ul>{failures}</ul>" if failures else "")
        + f"<h2>Statistics</h2><table>{table}</table>{histogram}"
        f"<h2>Per-layer error</h2>{_layer_plot(report)}"
        f"<table><tr><th>layer</th><th>rel L2</th><th>cosine</th><th>min cosine</th></tr>{layer_rows}</table>"
        "</body></html>\n"
    )
