"""`bnb inspect SRC`: statistics, outlier dimensions and round-trip error of every weight; CI gates."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from bnbcli import output
from bnbcli.cli import heap
from bnbcli.cli.budget import budget_request
from bnbcli.cli.options import (
    Backend,
    CalibrateFlag,
    ComponentNames,
    JsonFlag,
    KeepBudgetOption,
    NoProgressFlag,
    Planner,
    QuietFlag,
    ReportOption,
    Revision,
    TargetSizeOption,
    VerboseFlag,
    choice,
    output_path,
)
from bnbcli.errors import GateFailed, UsageError
from bnbcli.inspect.criteria import DEFAULT_FACTOR, DEFAULT_MIN_LAYER_SHARE, DEFAULT_VALUE_SIGMA, OutlierCriteria
from bnbcli.plan.scheme_names import DEFAULT_ROUNDTRIPS, ROUNDTRIP_SCHEMES, Method

if TYPE_CHECKING:  # the command line is imported without torch: the library comes in when the command runs
    from bnbcli.inspect.activations import ActivationCriteria
    from bnbcli.inspect.report import InspectReport


def inspect(
    src: Annotated[
        str,
        typer.Argument(
            help="A checkpoint (folder, .safetensors file, index.json, diffusers pipeline folder or Hub repo id), "
            "unquantized or saved by bitsandbytes.",
        ),
    ],
    schemes: Annotated[
        str,
        typer.Option(
            "--schemes", metavar="A,B", help=f"Comma-separated, from {', '.join(ROUNDTRIP_SCHEMES)}: the round trips."
        ),
    ] = ",".join(DEFAULT_ROUNDTRIPS),
    blocksize: Annotated[int, typer.Option("--blocksize", help="4-bit block size of the schemes.")] = 64,
    against: Annotated[
        str | None,
        typer.Option("--against", metavar="ORIG", help="A bnb checkpoint's original: its weights' error against it."),
    ] = None,
    revision: Revision = None,
    components: ComponentNames = None,
    backend: Backend = "auto",
    planner: Planner = "auto",
    outlier_factor: Annotated[
        float,
        typer.Option("--outlier-factor", help="A column/row is an outlier at this many times the median mean |w|."),
    ] = DEFAULT_FACTOR,
    value_sigma: Annotated[
        float, typer.Option("--value-sigma", help="An isolated value is large at this many σ from the mean.")
    ] = DEFAULT_VALUE_SIGMA,
    min_layer_share: Annotated[
        float, typer.Option("--min-layer-share", help="A dimension recurs when an outlier in this share of layers.")
    ] = DEFAULT_MIN_LAYER_SHARE,
    max_rel_error: Annotated[
        float | None, typer.Option("--max-rel-error", help="Gate: fail a weight whose relative error is above X.")
    ] = None,
    min_sqnr: Annotated[
        float | None, typer.Option("--min-sqnr", help="Gate: fail a weight whose SQNR is below DB dB.")
    ] = None,
    max_outlier_dims: Annotated[
        int | None, typer.Option("--max-outlier-dims", help="Gate: fail a matrix with more outlier dimensions.")
    ] = None,
    max_nonfinite: Annotated[
        int | None, typer.Option("--max-nonfinite", help="Gate: fail a tensor with more NaN/Inf values.")
    ] = None,
    gate_scheme: Annotated[
        Method | None, choice("--gate-scheme", Method, "The scheme the error gates check (default: every scheme).")
    ] = None,
    report_file: ReportOption = None,
    top: Annotated[int, typer.Option("--top", min=0, help="Tensors in the terminal table, worst first (0: all).")] = 20,
    activations: Annotated[
        bool, typer.Option("--activations", help="Also run the model (transformers) and find activation outliers.")
    ] = False,
    text_file: Annotated[
        Path | None,
        typer.Option("--text-file", metavar="FILE", help="--activations: one text per line (default: built-in texts)."),
    ] = None,
    activation_threshold: Annotated[
        float | None,
        typer.Option("--activation-threshold", help="--activations: an activation outlier's magnitude (6.0)."),
    ] = None,
    keep_budget: KeepBudgetOption = None,
    target_size: TargetSizeOption = None,
    calibrate: CalibrateFlag = False,
    json_output: JsonFlag = False,
    quiet: QuietFlag = False,
    verbose: VerboseFlag = False,
    no_progress: NoProgressFlag = False,
) -> None:
    """Per tensor: dtype, shape, absmax, std, kurtosis, share beyond 6σ, zeros, NaN/Inf; per weight matrix: outlier
    input columns and output rows, isolated large values, and the round-trip error under each scheme; the outlier
    dimensions that recur across layers. Gates exit 1 and name every tensor that fails. -v: every tensor in the
    table (as --top 0)."""
    with heap.library_import():
        from bnbcli.eval.texts import read_text_file
        from bnbcli.inspect.gates import Gates
        from bnbcli.inspect.run import InspectRequest, open_source
        from bnbcli.inspect.run import inspect as inspect_checkpoint

    # Everything a bad option could fail is checked here, before the checkpoint is read (minutes, on a big one).
    if activation_threshold is not None and not activations:
        raise UsageError("--activation-threshold goes with --activations", hint="add --activations")
    if text_file is not None and not (activations or calibrate):
        raise UsageError("--text-file goes with --activations (or --calibrate)", hint="add --activations")
    budget = budget_request(keep_budget, target_size, calibrate, text_file if calibrate else None, backend)
    criteria = _activation_criteria(activation_threshold) if activations else None
    report_path = output_path(report_file, "--report", "file") if report_file is not None else None
    if report_path is not None:
        from bnbcli.inspect.html import check_report_path

        check_report_path(report_path)
    request = InspectRequest(
        src=src,
        schemes=tuple(s.strip() for s in schemes.split(",") if s.strip()),
        blocksize=blocksize,
        against=against,
        revision=revision,
        components=components,
        backend=backend,
        planner=None if planner == "auto" else planner,
        criteria=OutlierCriteria(outlier_factor, value_sigma, min_layer_share),
        gates=Gates(max_rel_error, min_sqnr, max_outlier_dims, max_nonfinite, gate_scheme),
    )
    texts = read_text_file(text_file) if text_file is not None else None
    with heap.collections_paused():  # as quantize's run: records of many tiny tensors are walked again and again
        checkpoint = open_source(request)
        with output.ByteProgress(
            checkpoint.tensor_bytes, "inspecting", enabled=not no_progress, bar=not json_output
        ) as bar:
            report = inspect_checkpoint(request, checkpoint, bar.advance)
    output.warnings(list(report.warnings))
    if criteria is not None:
        report = _with_activations(report, texts, criteria)
    if budget is not None:
        from bnbcli.budget.spend import inspect_choices

        report = replace(report, keep_budget=inspect_choices(checkpoint, request, budget))
    if report_path is not None:
        from bnbcli.inspect.html import write_report

        write_report(report, report_path)
    if json_output:
        output.emit_json(report.as_dict())
    elif not quiet:
        _render(report, 0 if verbose else top)
    _fail_on_gates(report)


def _render(report: InspectReport, top: int) -> None:
    from bnbcli.cli.budget import render_choice
    from bnbcli.inspect.terminal import render

    render(report, top)
    for name, kept in (report.keep_budget or {}).items():
        render_choice(kept, title=f"{name}: kept in 16-bit by the budget")


def _fail_on_gates(report: InspectReport) -> None:
    """A `fail:` line per tensor and gate missed, then exit 1."""
    for failure in report.failures:
        output.failure(failure.line())
    if report.failures:
        tensors = len({f.tensor for f in report.failures})
        raise GateFailed(
            f"{tensors} tensor{'s' if tensors != 1 else ''} failed the gates",
            hint="each `fail:` line above names a tensor and the gate it missed",
        )


def _activation_criteria(threshold: float | None) -> ActivationCriteria:
    """Checked when the command starts; the module is imported only when --activations asks for it."""
    from bnbcli.inspect.activations import ActivationCriteria

    return ActivationCriteria() if threshold is None else ActivationCriteria(threshold=threshold)


def _with_activations(report: InspectReport, texts: list[str] | None, criteria: ActivationCriteria) -> InspectReport:
    """Activation outliers through transformers (imported only when --activations asks for them)."""
    from bnbcli.inspect.activations import find_activation_outliers

    if report.root is None:
        raise UsageError("--activations needs a model folder", hint="give the model's folder as SRC")
    found = find_activation_outliers(report.root, texts, criteria, device="cuda" if report.backend == "cuda" else "cpu")
    return replace(report, activations=found.as_dict())
