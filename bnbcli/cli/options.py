"""Options shared by several verbs, declared once."""

from __future__ import annotations

from typing import Annotated

import typer

JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout (no color, no progress).")]
QuietFlag = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")]
VerboseFlag = Annotated[bool, typer.Option("--verbose", "-v", help="Print more detail.")]
NoProgressFlag = Annotated[
    bool, typer.Option("--no-progress", help="No progress bar (it is off anyway when stderr is not a terminal).")
]
