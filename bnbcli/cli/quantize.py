"""`bnb quantize SRC OUT`: stream a safetensors checkpoint into a pre-quantized bitsandbytes one."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from bnbcli import output
from bnbcli.cli import heap
from bnbcli.cli.budget import budget_request
from bnbcli.cli.options import (
    Backend,
    CalibrateFlag,
    ComponentNames,
    ComputeDtype,
    Dtype,
    JsonFlag,
    KeepBudgetOption,
    MaxShardSize,
    NoProgressFlag,
    OutArgument,
    OverwriteFlag,
    Planner,
    QuantStorage,
    QuietFlag,
    Revision,
    Skip,
    TargetSizeOption,
    TextFileOption,
    VerboseFlag,
    choice,
    output_path,
)
from bnbcli.plan.scheme_names import Method
from bnbcli.units import human_bytes

if TYPE_CHECKING:  # the command line is imported without torch: the library comes in when the command runs
    from bnbcli.checkpoint.source import Checkpoint
    from bnbcli.pipeline.quantize import QuantizeOutcome
    from bnbcli.pipeline.request import QuantizeRequest
    from bnbcli.plan.budget.choice import BudgetRequest
    from bnbcli.plan.quantize_layout import QuantizePlan


def quantize(
    src: Annotated[
        str,
        typer.Argument(
            help="A folder, a .safetensors file, an index.json, a diffusers pipeline folder, or a Hub repo id.",
        ),
    ],
    out: OutArgument,
    scheme: Annotated[Method | None, choice("--scheme", Method, "The method (default: the preset's, nf4).")] = None,
    double_quant: Annotated[
        bool | None, typer.Option("--double-quant/--no-double-quant", help="4-bit: quantize the absmax too.")
    ] = None,
    blocksize: Annotated[int | None, typer.Option("--blocksize", help="4-bit block size (32…4096; 64).")] = None,
    compute_dtype: ComputeDtype = None,
    quant_storage: QuantStorage = None,
    dtype: Dtype = None,
    skip: Skip = None,
    config: Annotated[
        str | None,
        typer.Option(
            "--config",
            metavar="PRESET|FILE",
            help="A preset in configs/ (nf4-dq, nf4, fp4, fp4-dq, int8) or a TOML file.",
        ),
    ] = None,
    max_shard_size: MaxShardSize = None,
    components: ComponentNames = None,
    revision: Revision = None,
    backend: Backend = "auto",
    device: Annotated[
        str | None, typer.Option("--device", metavar="cuda:N", help="cuda: the GPU to use, e.g. cuda:1.")
    ] = None,
    devices: Annotated[
        str | None, typer.Option("--devices", metavar="N,M", help="cuda: spread tensors over these GPUs, e.g. 0,1.")
    ] = None,
    planner: Planner = "auto",
    keep_budget: KeepBudgetOption = None,
    target_size: TargetSizeOption = None,
    calibrate: CalibrateFlag = False,
    text_file: TextFileOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and write nothing.")] = False,
    overwrite: OverwriteFlag = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue a run on OUT that was interrupted: keep the shards it finished when the source and "
            "settings are unchanged (checked), convert the rest. Without one to continue, a normal run.",
        ),
    ] = False,
    allow_nonfinite: Annotated[
        bool,
        typer.Option("--allow-nonfinite", help="Quantize NaN/Inf weights as bitsandbytes would instead of refusing."),
    ] = False,
    json_output: JsonFlag = False,
    quiet: QuietFlag = False,
    verbose: VerboseFlag = False,
    no_progress: NoProgressFlag = False,
) -> None:
    """Write a pre-quantized bitsandbytes checkpoint that from_pretrained(OUT) loads as it is."""
    if not dry_run:  # the sha256 of the source shards, recorded in the manifest, start now (while torch imports)
        from bnbcli.checkpoint.hashing import hash_sources_early

        hash_sources_early(src)
    from bnbcli.backends.devices import parse_devices
    from bnbcli.pipeline.request import QuantizeRequest, open_source

    budget = budget_request(keep_budget, target_size, calibrate, text_file, backend)
    request = QuantizeRequest(
        src=src,
        out=output_path(out),
        scheme=_scheme(
            config,
            skip,
            method=scheme,
            double_quant=double_quant,
            blocksize=blocksize,
            compute_dtype=compute_dtype,
            quant_storage=quant_storage,
            dtype=dtype,
        ),
        revision=revision,
        components=components,
        backend=backend,
        devices=parse_devices(device, devices),
        allow_nonfinite=allow_nonfinite,
        overwrite=overwrite,
        resume=resume,
        planner=None if planner == "auto" else planner,
        **({} if max_shard_size is None else {"max_shard_size": max_shard_size}),
    )
    if dry_run:
        summary = _summary(_plan(request, budget))
        _check_backend(request)
        if json_output:
            output.emit_json({"dry_run": True, "out": str(out), **summary})
        else:
            _render_plan(summary, all_rows=True)
        return
    with heap.collections_paused():
        checkpoint = open_source(request)
        plan = _plan(request, budget, checkpoint)
        outcome = _execute(request, plan, plain=budget is None, bar=not json_output, progress=not no_progress)
    if json_output:
        summary = _summary(outcome.plan)
        output.emit_json({"dry_run": False, "out": str(outcome.out), **summary, "manifest": outcome.manifest})
    elif quiet:  # the warnings alone: the summary's row per tensor took ~1 s for 50,000 tensors
        from bnbcli.plan.quantize_layout import plan_warnings

        output.warnings(plan_warnings(outcome.plan))
    else:
        _render_outcome(_summary(outcome.plan), outcome.out, outcome.manifest["run"], verbose)


def _execute(request: QuantizeRequest, plan: QuantizePlan, plain: bool, bar: bool, progress: bool) -> QuantizeOutcome:
    """Import the library and run the plan; its pass-through tensors meanwhile copied into OUT's temporary
    folder when the plan needed no torch (pipeline/early_copy.py)."""
    from bnbcli.pipeline import early_copy
    from bnbcli.pipeline.request import output_folder

    with early_copy.started(plan, output_folder(request), plain) as early:
        with heap.library_import():
            from bnbcli.pipeline.quantize import quantize as quantize_on_plan
            from bnbcli.pipeline.quantize import warm_up_backend

        warm_up_backend(request)
        with output.ByteProgress(plan.checkpoint.tensor_bytes, "quantizing", enabled=progress, bar=bar) as shown:
            return quantize_on_plan(request, plan, shown.advance, early)


def _check_backend(request: QuantizeRequest) -> None:
    """--dry-run refuses a backend that cannot run, as the run would (it imports torch only to look for a GPU)."""
    from bnbcli.backends import resolve_backend

    resolve_backend(request.backend)


def _scheme(config: str | None, skip: list[str] | None, **given: Any) -> Any:
    """The scheme: the flags given over --config's preset over the defaults; --skip adds to the preset's."""
    from bnbcli.plan.scheme import load_preset, resolve_scheme

    preset: dict[str, Any] = dict(load_preset(config)) if config else {}
    flags: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    if skip:
        flags["skip"] = [*preset.get("skip", []), *skip]
    return resolve_scheme(preset, flags)


def _render_outcome(summary: dict[str, Any], out: Path, run: dict[str, Any], verbose: bool) -> None:
    if verbose:
        _render_plan(summary, all_rows=True)
    _render_result(summary, out)
    if verbose:
        _render_timing(run)


def _plan(request: QuantizeRequest, budget: BudgetRequest | None, checkpoint: Checkpoint | None = None) -> QuantizePlan:
    """The plan execution obeys: uniform, or with the modules --keep-budget/--target-size keep."""
    from bnbcli.pipeline.request import open_source, plan_request

    if budget is None:
        return plan_request(request, checkpoint)
    from bnbcli.budget.spend import budget_plan

    opened = checkpoint or open_source(request)
    return budget_plan(opened, request.scheme, budget, request.max_shard_size, request.planner)


def _summary(plan: QuantizePlan) -> dict[str, Any]:
    """The plan as data, after printing its warnings (a planner that fell back, a --skip typo, …)."""
    from bnbcli.plan.quantize_layout import plan_summary

    summary = plan_summary(plan)
    output.warnings(summary["warnings"])
    return summary


def _render_plan(summary: dict[str, Any], all_rows: bool) -> None:
    for component in summary["components"]:
        title = f"plan{' for ' + component['name'] if component['name'] else ''} — planner: {component['planner']}"
        output.emit_tensor_table(
            title,
            component["planner_reason"],
            component["tensors"] if all_rows else [],
            lambda t: t["description"],
            f"{component['quantized']} quantized, {component['kept']} kept",
            component["bytes_in"],
            component["bytes_out"],
        )
        if component["skip_modules"]:
            output.stdout.print(f"llm_int8_skip_modules: {', '.join(component['skip_modules'])}")
    if summary["keep_budget"] is not None:
        from bnbcli.cli.budget import render_choice

        render_choice(summary["keep_budget"])


def _render_timing(run: dict[str, Any]) -> None:
    stages = ", ".join(f"{name} {value:.1f} s" for name, value in run["stage_seconds"].items())
    output.stdout.print(f"{run['seconds']:.1f} s; busy per stage (they overlap): {stages}")
    if run.get("timeline"):
        marks = ", ".join(f"{name} {value:.1f}" for name, value in run["timeline"].items())
        output.stdout.print(f"timeline (s since start): {marks}")


def _render_result(summary: dict[str, Any], out: Path) -> None:
    quantized = sum(c["quantized"] for c in summary["components"])
    kept = sum(c["kept"] for c in summary["components"])
    ratio = summary["bytes_out"] / summary["bytes_in"] if summary["bytes_in"] else 0.0
    output.stdout.print(
        f"wrote {out}: {quantized} tensors quantized, {kept} kept; "
        f"{human_bytes(summary['bytes_in'])} → {human_bytes(summary['bytes_out'])} ({ratio:.0%})"
    )
    if summary["keep_budget"] is not None:
        from bnbcli.cli.budget import outcome_line

        output.stdout.print(f"keep budget: {outcome_line(summary['keep_budget'])}")
