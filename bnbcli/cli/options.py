"""Options shared by several verbs, declared once."""

from __future__ import annotations

from typing import Annotated

import typer

from bnbcli import output

JsonFlag = Annotated[
    bool,
    typer.Option("--json", help="Print one JSON document on stdout (no color; progress, if any, as lines on stderr)."),
]
QuietFlag = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")]
VerboseFlag = Annotated[bool, typer.Option("--verbose", "-v", help="Print more detail.")]
NoProgressFlag = Annotated[
    bool,
    typer.Option(
        "--no-progress",
        help="No progress bar, nor the progress line printed every "
        f"{output.PROGRESS_LINE_SECONDS:g} s when stderr is not a terminal.",
    ),
]
