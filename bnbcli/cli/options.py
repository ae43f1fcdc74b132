"""The command line's options, declared once: each is parsed and checked by Click before the command runs,
so a bad value fails at once, and the same way in every verb. An option with a fixed set of values is
typed by a Literal (its names live beside the library that uses them, in modules that import no torch)
and shows them in --help. -q and -v mean the same in every verb (``QuietFlag``, ``VerboseFlag``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar, get_args

import typer

from bnbcli import output
from bnbcli.backends import BackendName
from bnbcli.errors import UsageError
from bnbcli.plan.scheme_names import DTYPE_NAMES, FloatDtypeName, PlannerName, StorageDtypeName
from bnbcli.units import parse_size

T = TypeVar("T")

JsonFlag = Annotated[
    bool,
    typer.Option("--json", help="Print one JSON document on stdout (no color; progress, if any, as lines on stderr)."),
]


def _quiet(value: bool) -> bool:
    output.set_quiet(value)
    return value


# Click calls these callbacks on every run, given or not: the terminal's state is set for each run.
QuietFlag = Annotated[
    bool,
    typer.Option(
        "--quiet",
        "-q",
        callback=_quiet,
        help="Print nothing on stdout (--json's document excepted) and no progress: only warnings and errors.",
    ),
]
VerboseFlag = Annotated[
    bool, typer.Option("--verbose", "-v", help="Print more detail, where the command has more (-q wins).")
]
NoProgressFlag = Annotated[
    bool,
    typer.Option(
        "--no-progress",
        help="No progress bar, nor the progress line printed every "
        f"{output.PROGRESS_LINE_SECONDS:g} s when stderr is not a terminal.",
    ),
]


class BadValue(typer.BadParameter):
    """A bad option value: Click's usage error (exit 2), with the hint main() prints under it."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.hint = hint


def _checked(parse: Callable[[str], T]) -> Callable[[str], T]:
    """A Click parser from a library validator: its UsageError becomes a BadValue, hint included."""

    def parser(text: str) -> T:
        try:
            return parse(text)
        except UsageError as e:
            raise BadValue(e.message, e.hint) from None

    return parser


def size_option(flag: str, help: str) -> Any:
    """A byte size with its unit ("5GB", "24GiB"), parsed by ``bnbcli.units.parse_size``."""
    return typer.Option(flag, help=help, metavar="SIZE", parser=_checked(parse_size))


class Components(tuple[str, ...]):
    """diffusers component names as --components gives them (a class of its own: Typer reads a plain
    tuple annotation as an option that takes several values)."""


def parse_components(text: str) -> Components:
    names = Components(c.strip() for c in text.split(","))
    if not all(names):
        raise UsageError(f"{text!r} has an empty name", hint="name them, comma-separated: --components unet,vae")
    return names


def choice(flag: str, names: Any, help: str, aliases: Mapping[str, str] | None = None) -> Any:
    """An option whose value is one of the Literal ``names`` (shown in --help as <a|b|c>); ``aliases``
    maps other spellings, in lower case, to one of them."""
    choices: tuple[str, ...] = get_args(names)
    listed = ", ".join(choices)

    def parse(text: str) -> str:
        value = aliases.get(text.lower(), text) if aliases else text
        if value not in choices:
            raise BadValue(f"{text!r} is not one of {listed}", hint=f"use one of {listed}")
        return value

    return typer.Option(flag, help=help, metavar=f"<{'|'.join(choices)}>", parser=parse)


Backend = Annotated[
    BackendName,
    choice("--backend", BackendName, "auto is cuda when a GPU and CuPy are here, else cpu: the same bytes."),
]
Planner = Annotated[
    PlannerName,
    choice(
        "--planner",
        PlannerName,
        "How weights are told apart. auto: the planner table, else transformers or diffusers when they know "
        "the model, else name rules.",
    ),
]
Dtype = Annotated[
    FloatDtypeName | None,
    choice(
        "--dtype",
        FloatDtypeName,
        "The model's dtype (fp16, bf16, fp32 work too): quantize casts weights to it first, dequantize writes "
        "floating tensors in it, footprint loads in it (default: as the checkpoint holds them).",
        DTYPE_NAMES,
    ),
]
ComputeDtype = Annotated[
    FloatDtypeName | None,
    choice(
        "--compute-dtype", FloatDtypeName, "4-bit: bnb_4bit_compute_dtype (default: the model's dtype).", DTYPE_NAMES
    ),
]
QuantStorage = Annotated[
    StorageDtypeName | None,
    choice(
        "--quant-storage", StorageDtypeName, "4-bit: the dtype the packed bytes are stored as (uint8).", DTYPE_NAMES
    ),
]
Revision = Annotated[
    str | None, typer.Option("--revision", metavar="REV", help="Hub revision (branch, tag or commit).")
]
ComponentNames = Annotated[
    Components | None,
    typer.Option(
        "--components",
        help="diffusers: only these components, comma-separated (default: all).",
        metavar="A,B",
        parser=_checked(parse_components),
    ),
]
MaxShardSize = Annotated[
    int | None,
    size_option(
        "--max-shard-size",
        "Largest output shard, e.g. 5GB (default: 50GB; dequantize keeps the source's shards).",
    ),
]
Skip = Annotated[
    list[str] | None,
    typer.Option(
        "--skip",
        metavar="PATTERN",
        help="Keep modules matching PATTERN in 16-bit (repeatable; added to the planner's defaults).",
    ),
]


OutArgument = Annotated[
    str,
    typer.Argument(
        help="The folder to write (must not exist unless --overwrite).",
        show_default=False,
    ),
]


ReportOption = Annotated[
    str | None,
    typer.Option(
        "--report",
        metavar="FILE.html",
        help="Write a self-contained HTML report (inline SVG, no network); an existing FILE is replaced only "
        "when it is a report bnb wrote (or empty).",
    ),
]


OverwriteFlag = Annotated[
    bool, typer.Option("--overwrite", help="Replace OUT if it exists and bnb wrote it (or it is an empty folder).")
]


def output_path(value: str, name: str = "OUT", what: str = "folder") -> Path:
    """A path to write, as given. An empty one (an unset variable in a script) would be taken for the
    current folder: refused."""
    if not value:
        raise UsageError(f"{name} is empty", hint=f"give the {what} to write (is the variable meant to hold it unset?)")
    return Path(value)


# --keep-budget / --target-size / --calibrate: bnb quantize, bnb footprint and bnb inspect take them alike.


def _keep_budget(text: str) -> Any:
    from bnbcli.plan.budget.spec import parse_keep_budget  # no torch: spec.py imports only units and errors

    return parse_keep_budget(text)


def _target_size(text: str) -> Any:
    from bnbcli.plan.budget.spec import parse_target_size

    return parse_target_size(text)


KeepBudgetOption = Annotated[
    Any,
    typer.Option(
        "--keep-budget",
        help="Keep in 16-bit the modules whose quantization costs the model most, for at most this many extra "
        "bytes: a share of the Linear weights' 16-bit bytes (10%) or a size (600MB).",
        metavar="N%|SIZE",
        parser=_checked(_keep_budget),
    ),
]
TargetSizeOption = Annotated[
    Any,
    typer.Option(
        "--target-size",
        help="As --keep-budget, with the budget set by the size of the whole output (e.g. 5.2GB).",
        metavar="SIZE",
        parser=_checked(_target_size),
    ),
]
CalibrateFlag = Annotated[
    bool,
    typer.Option(
        "--calibrate",
        help="--keep-budget: score modules by running the model on text (built-in, or --text-file) instead of "
        "from the weights alone.",
    ),
]
TextFileOption = Annotated[
    Path | None, typer.Option("--text-file", help="--calibrate: one text per line (default: built-in texts).")
]
