"""The readable summary of `bnb eval` on stdout (through ``bnbcli.output``): what ran, the statistics
llama-perplexity prints (or an encoder's cosines), the layers, and the verdict."""

from __future__ import annotations

import math

from rich.table import Table

from bnbcli import output
from bnbcli.eval.report import CausalSummary, EncoderSummary, EvalReport
from bnbcli.eval.stats import Estimate


def _num(x: float | None, digits: int = 4) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x:.{digits}g}"


def _est(e: Estimate, digits: int = 6, scale: float = 1.0, unit: str = "") -> str:
    if not math.isfinite(e.value):
        return "—"
    return f"{scale * e.value:.{digits}f} ± {scale * e.uncertainty:.{digits}f}{unit}"


def causal_rows(c: CausalSummary) -> list[tuple[str, str]]:
    p = c.perplexity
    rows = [
        ("PPL(Q)", _est(p.ppl_q, 4)),
        ("PPL(base)", _est(p.ppl_base, 4)),
        ("PPL(Q)/PPL(base)", _est(p.ratio, 4)),
        ("ln(PPL(Q)/PPL(base))", _est(p.ln_ratio)),
        ("mean KLD", _est(c.kld)),
    ]
    rows += [(f"{name} KLD", _num(c.kld_percentiles[name], 6)) for name in ("max", "99.9%", "99%", "95%", "90%")]
    rows.append(("median KLD", _num(c.kld_percentiles["median"], 6)))
    if c.kld_bound_max > 0:
        rows.append(("top-k error of mean KLD", f"≤ +{c.kld_bound_mean:.6f} (the exact mean is not below the figure)"))
    rows.append(("same top-1", _est(c.same_top1, 3, 100, " %")))
    rows.append(("RMS Δp", _est(c.rms_dp, 3, 100, " %")))
    return rows


def encoder_rows(e: EncoderSummary) -> list[tuple[str, str]]:
    return [
        ("token cosine, mean", _est(e.token_cosine)),
        ("token cosine, min", _num(e.token_cosine_percentiles["min"], 6)),
        ("embedding cosine, mean", _num(e.embedding_cosine_mean, 6)),
        ("embedding cosine, min", _num(e.embedding_cosine_min, 6)),
        ("same nearest neighbour", _est(e.same_neighbour, 1, 100, " %")),
    ]


def _layer_table(report: EvalReport) -> None:
    table = Table(title="hidden state after each layer, QUANT against ORIG", title_justify="left")
    for column in ("layer", "rel L2", "cosine", "min cosine", "tokens"):
        table.add_column(column, justify="left" if column == "layer" else "right")
    for layer in report.layers:
        table.add_row(
            layer.name,
            f"{100 * layer.rel_l2:.3f}%",
            _num(layer.cosine, 6),
            _num(layer.min_cosine, 6),
            str(layer.tokens),
        )
    output.stdout.print(table)


def render(report: EvalReport, verbose: bool) -> None:
    texts = report.texts
    windows = f" in windows of {texts['context']}" if texts["context"] else ""
    output.stdout.print(
        f"eval {report.quant} against {report.orig} — {report.model_class} on {report.device} "
        f"(ORIG {report.dtypes['orig']}, QUANT {report.dtypes['quant']}); {texts['source']} texts: "
        f"{texts['texts']} texts, {texts['tokens']} tokens{windows}; {report.memory.describe()}"
    )
    rows = causal_rows(report.causal) if report.causal else encoder_rows(report.encoder) if report.encoder else []
    scored = report.causal.tokens if report.causal else report.encoder.tokens if report.encoder else 0
    output.emit_table(f"QUANT against ORIG over {scored} tokens", rows)
    if verbose:
        _layer_table(report)
    worst = report.worst_layer()
    if worst is not None:
        last = report.layers[-1]
        output.stdout.print(
            f"layers: the largest hidden-state error is after {worst.name} (rel L2 {100 * worst.rel_l2:.2f}%, "
            f"cosine {worst.cosine:.4f}); after the last, {last.name}: {100 * last.rel_l2:.2f}%, {last.cosine:.4f}"
            + ("" if verbose else " (-v: every layer)")
        )
    s = report.seconds
    forwards = s["orig_forward"] + s["quant_forward"]
    rate = f" ({texts['tokens'] / forwards:.0f} tokens/s through both)" if forwards > 0 else ""
    output.stdout.print(
        f"time: {s['total']:.1f} s — loading ORIG {s['orig_load']:.1f} s, QUANT {s['quant_load']:.1f} s; forwards "
        f"ORIG {s['orig_forward']:.1f} s, QUANT {s['quant_forward']:.1f} s{rate}"
    )
    output.stdout.print(f"verdict: {report.verdict()}")
