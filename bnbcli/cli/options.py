"""Options shared by several verbs, declared once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bnbcli.errors import UsageError

JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout (no color, no progress).")]
QuietFlag = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")]
VerboseFlag = Annotated[bool, typer.Option("--verbose", "-v", help="Print more detail.")]
NoProgressFlag = Annotated[
    bool, typer.Option("--no-progress", help="No progress bar (it is off anyway when stderr is not a terminal).")
]

OutArgument = Annotated[
    str,
    typer.Argument(
        help="The folder to write (must not exist unless --overwrite).",
        show_default=False,
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
