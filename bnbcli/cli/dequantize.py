"""`bnb dequantize SRC OUT`: a bitsandbytes checkpoint back to a plain fp16/bf16/fp32 one."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from bnbcli import output
from bnbcli.cli.options import (
    Backend,
    Dtype,
    JsonFlag,
    MaxShardSize,
    NoProgressFlag,
    OutArgument,
    OverwriteFlag,
    QuietFlag,
    Revision,
    VerboseFlag,
    output_path,
)
from bnbcli.units import human_bytes


def dequantize(
    src: Annotated[
        str,
        typer.Argument(
            help="A bitsandbytes checkpoint: a folder, a .safetensors file, an index.json, a diffusers pipeline "
            "folder, or a Hub repo id.",
        ),
    ],
    out: OutArgument,
    dtype: Dtype = None,
    max_shard_size: MaxShardSize = None,
    revision: Revision = None,
    backend: Backend = "auto",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and write nothing.")] = False,
    overwrite: OverwriteFlag = False,
    json_output: JsonFlag = False,
    quiet: QuietFlag = False,
    verbose: VerboseFlag = False,
    no_progress: NoProgressFlag = False,
) -> None:
    """Write a plain checkpoint (no quantization_config) that from_pretrained(OUT) loads as an ordinary model."""
    from bnbcli.pipeline.dequantize import DequantizeRequest, plan_request
    from bnbcli.pipeline.dequantize import dequantize as run_dequantize
    from bnbcli.plan.dequantize_layout import plan_summary
    from bnbcli.plan.scheme import FLOAT_DTYPES, parse_dtype

    request = DequantizeRequest(
        src=src,
        out=output_path(out),
        dtype=parse_dtype(dtype, "--dtype", FLOAT_DTYPES) if dtype is not None else None,
        max_shard_size=max_shard_size,
        revision=revision,
        backend=backend,
        overwrite=overwrite,
    )
    plan = plan_request(request)
    summary = plan_summary(plan)
    output.warnings(summary["warnings"])
    if dry_run:
        if json_output:
            output.emit_json({"dry_run": True, "out": str(out), **summary})
        else:
            _render_plan(summary)
        return
    with output.ByteProgress(plan.bytes_in, "dequantizing", enabled=not no_progress, bar=not json_output) as bar:
        outcome = run_dequantize(request, plan, bar.advance)
    if json_output:
        output.emit_json({"dry_run": False, "out": str(outcome.out), **summary, "manifest": outcome.manifest})
    elif not quiet:
        if verbose:
            _render_plan(summary)
        restored = sum(c["dequantized_4bit"] + c["dequantized_int8"] for c in summary["components"])
        kept = sum(c["kept"] for c in summary["components"])
        output.stdout.print(
            f"wrote {outcome.out}: {restored} weights dequantized, {kept} tensors kept; "
            f"{human_bytes(summary['bytes_in'])} → {human_bytes(summary['bytes_out'])}"
        )


ACTIONS = {"4bit": "dequantize 4-bit", "int8": "dequantize int8", "copy": "keep"}


def _render_plan(summary: dict[str, Any]) -> None:
    for component in summary["components"]:
        title = f"plan{' for ' + component['name'] if component['name'] else ''}"
        if component["copied_as_is"]:
            output.stdout.print(f"{title}: nothing quantized, copied as it is")
            continue
        transposed = set(component["transposed"])
        output.emit_tensor_table(
            title,
            None,
            component["tensors"],
            lambda t: ACTIONS[t["kind"]] + (" (Conv1D, [in, out])" if t["name"] in transposed else ""),  # noqa: B023
            f"{component['dequantized_4bit'] + component['dequantized_int8']} dequantized, {component['kept']} kept",
            component["bytes_in"],
            component["bytes_out"],
        )
