"""`bnb footprint SRC`: memory per quantization scheme, from safetensors headers and config.json alone."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from bnbcli import output
from bnbcli.cli import heap
from bnbcli.cli.budget import budget_request
from bnbcli.cli.options import (
    CalibrateFlag,
    ComponentNames,
    ComputeDtype,
    Dtype,
    JsonFlag,
    KeepBudgetOption,
    MaxShardSize,
    Planner,
    QuantStorage,
    QuietFlag,
    Revision,
    Skip,
    TargetSizeOption,
    TextFileOption,
    VerboseFlag,
    size_option,
)
from bnbcli.plan.scheme_names import DEFAULT_SCHEMES, PlannerName
from bnbcli.units import human_bytes

# How the report is shown, not what it says: left out of the cached report's key.
_PRESENTATION = ("json_output", "quiet", "verbose")


def footprint(
    src: Annotated[
        str,
        typer.Argument(
            help="A folder, a .safetensors file, an index.json, a diffusers pipeline folder, or a Hub repo id "
            "(only headers and config.json are fetched).",
        ),
    ],
    schemes: Annotated[
        str,
        typer.Option(
            "--schemes",
            metavar="A,B",
            help="Comma-separated: stored, fp8, int8, nf4, nf4-dq, fp4, fp4-dq (stored: as the files hold it).",
        ),
    ] = ",".join(DEFAULT_SCHEMES),
    gpu_memory: Annotated[
        int | None, size_option("--gpu-memory", "A GPU's memory, e.g. 24GiB or 80GB: a verdict per scheme.")
    ] = None,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per sequence, for the KV cache (decoders).")] = 4096,
    batch: Annotated[int, typer.Option("--batch", help="Sequences at once, for the KV cache (decoders).")] = 1,
    dtype: Dtype = None,
    skip: Skip = None,
    blocksize: Annotated[int, typer.Option("--blocksize", help="4-bit block size, as in bnb quantize.")] = 64,
    compute_dtype: ComputeDtype = None,
    quant_storage: QuantStorage = "uint8",
    max_shard_size: MaxShardSize = None,
    components: ComponentNames = None,
    revision: Revision = None,
    planner: Planner = "auto",
    keep_budget: KeepBudgetOption = None,
    target_size: TargetSizeOption = None,
    calibrate: CalibrateFlag = False,
    text_file: TextFileOption = None,
    json_output: JsonFlag = False,
    quiet: QuietFlag = False,
    verbose: VerboseFlag = False,
) -> None:
    """Per scheme: parameters quantized and kept, the files bnb quantize writes, get_memory_footprint() after
    loading, GPU memory at run time, and with --gpu-memory whether it fits. Reads no tensor data. -v: the
    settings each scheme was counted with."""
    arguments = {k: v for k, v in locals().items() if k not in _PRESENTATION}  # as given: the cached report's key
    from bnbcli.cli import footprint_cache

    entry = footprint_cache.key(src, arguments, text_file if calibrate else None)
    report = footprint_cache.load(entry)
    if report is None:
        report = _computed(**arguments)
        footprint_cache.store(entry, report)
    output.warnings(report["warnings"])
    if json_output:
        output.emit_json(report)
    elif not quiet:
        _render(report)
        if verbose:
            output.emit_table("settings", [(key, _setting(key, value)) for key, value in report["settings"].items()])


def _computed(
    src: str,
    schemes: str,
    gpu_memory: int | None,
    seq_len: int,
    batch: int,
    dtype: str | None,
    skip: list[str] | None,
    blocksize: int,
    compute_dtype: str | None,
    quant_storage: str,
    max_shard_size: int | None,
    components: tuple[str, ...] | None,
    revision: str | None,
    planner: PlannerName,
    keep_budget: str | None,
    target_size: int | None,
    calibrate: bool,
    text_file: Path | None,
) -> dict[str, Any]:
    """The report, from the library (torch, and transformers or diffusers when they know the model)."""
    with heap.library_import():
        from bnbcli.footprint import FootprintRequest, footprint, make_schemes
        from bnbcli.plan.quantize_layout import DEFAULT_MAX_SHARD_SIZE
        from bnbcli.plan.scheme import FLOAT_DTYPES, STORAGE_DTYPES, parse_dtype

    load_dtype = parse_dtype(dtype, "--dtype", FLOAT_DTYPES) if dtype else None
    request = FootprintRequest(
        src=src,
        schemes=make_schemes(
            tuple(s.strip() for s in schemes.split(",") if s.strip()),
            dtype=load_dtype,
            blocksize=blocksize,
            compute_dtype=parse_dtype(compute_dtype, "--compute-dtype", FLOAT_DTYPES) if compute_dtype else None,
            quant_storage=parse_dtype(quant_storage or "uint8", "--quant-storage", STORAGE_DTYPES),
            skip=tuple(skip or ()),
        ),
        revision=revision,
        components=components,
        dtype=load_dtype,
        max_shard_size=DEFAULT_MAX_SHARD_SIZE if max_shard_size is None else max_shard_size,
        planner=None if planner == "auto" else planner,
        seq_len=seq_len,
        batch=batch,
        gpu_memory=gpu_memory,
        keep=_keeper(budget_request(keep_budget, target_size, calibrate, text_file, "auto")),
    )
    with heap.collections_paused():  # as quantize's run: a report of 200,000 tensors took 46 s with them, 27 s without
        return footprint(request).as_dict()


def human_count(n: int) -> str:
    for unit, size in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _files(total: int | None, smallest: int | None) -> str:
    if total is None:
        return "—"
    return f"≤ {human_bytes(total)}" if smallest != total else human_bytes(total)


def _setting(key: str, value: Any) -> str:
    if value is None:
        return "default"
    return human_bytes(value) if key in ("gpu_memory", "max_shard_size") else str(value)


def _maybe(n: int | None) -> str:
    return "—" if n is None else human_bytes(n)


def _verdict(s: dict[str, Any]) -> str:
    if s["fits"] is None:
        return "—"
    room = human_bytes(abs(s["headroom"]))
    return f"fits, {room} free" if s["fits"] else f"does not fit, {room} short"


def _cells(item: dict[str, Any]) -> list[str]:
    """quantized, kept, files, get_memory_footprint, GPU at run time: for a scheme or one component."""
    files = item.get("files")
    total = item["file_bytes"] if files is None else (sum(f["bytes"] for f in files) if files else None)
    smallest = item["file_bytes_min"] if files is None else (sum(f["bytes_min"] for f in files) if files else None)
    return [
        human_count(item["params_quantized"]),
        human_count(item["params_kept"]),
        _files(total, smallest),
        _maybe(item["get_memory_footprint"]),
        _maybe((item["runtime"] or {}).get("total")),
    ]


def _render(report: dict[str, Any]) -> None:
    from rich.table import Table

    settings = report["settings"]
    verdicts = settings["gpu_memory"] is not None
    source = report["source"].get("repo_id") or report["source"].get("path")
    several = len(report["schemes"][0]["components"]) > 1
    planners = ", ".join(sorted({c["planner"] for c in report["schemes"][0]["components"]}))
    table = Table(
        title=f"footprint of {source} — planner: {planners}; seq-len {settings['seq_len']}, batch {settings['batch']}",
        title_justify="left",
    )
    headers = ["scheme", *(["component"] if several else []), "quantized", "kept", "files", "get_memory_footprint"]
    headers += ["GPU at run time", *([f"on {human_bytes(settings['gpu_memory'])}"] if verdicts else [])]
    for h in headers:
        table.add_column(h, justify="left" if h in ("scheme", "component") or h.startswith("on ") else "right")
    notes: list[str] = []
    for s in report["schemes"]:
        if several:
            for c in s["components"]:
                table.add_row(s["label"], c["name"], *_cells(c), *([""] if verdicts else []))
        table.add_row(s["label"], *(["total"] if several else []), *_cells(s), *([_verdict(s)] if verdicts else []))
        if several:
            table.add_section()
        notes += [n for c in s["components"] for n in c["notes"] if n not in notes]
    output.stdout.print(table)
    output.stdout.print(
        "get_memory_footprint: what transformers/diffusers report once loaded and after one forward pass "
        "(4-bit biases then move to the compute dtype). GPU at run time adds the quant state, the largest layer "
        "dequantized for a matmul, the KV cache and activations (decoders) and a 0.5 GiB CUDA context."
    )
    if any(s["file_bytes_min"] != s["file_bytes"] for s in report["schemes"]):
        output.stdout.print("≤: double quant writes each weight's nested_offset in decimal, of varying length.")
    for note in notes:
        output.stdout.print(f"note: {note}")
    for s in report["schemes"]:
        if s["keep_budget"] is not None:
            from bnbcli.cli.budget import render_choice

            render_choice(s["keep_budget"], title=f"{s['label']}: kept in 16-bit by the budget")


def _keeper(budget: Any) -> Any:
    """--keep-budget: what bnb footprint asks of each bnb scheme (bnbcli.budget.spend.keeper), or None."""
    if budget is None:
        return None
    from bnbcli.budget.spend import keeper

    return keeper(budget)
