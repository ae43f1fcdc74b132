"""The only writer to the terminal: data to stdout, progress, logs and errors to stderr."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

SCHEMA_VERSION = 1

# Data goes to stdout; everything meant for a person watching goes to stderr.
stdout = Console(highlight=False, soft_wrap=True)
stderr = Console(stderr=True, highlight=False, soft_wrap=True)


def emit_json(document: dict[str, Any]) -> None:
    """Print exactly one JSON document with a schema_version, no color, raw numbers."""
    sys.stdout.write(json.dumps({"schema_version": SCHEMA_VERSION, **document}, indent=2) + "\n")
    sys.stdout.flush()


def emit_table(title: str, rows: list[tuple[str, str]]) -> None:
    """A two-column human table on stdout."""
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    stdout.print(table)


def error(message: str, hint: str | None = None) -> None:
    """`error: …` and `hint: …`, one line each, on stderr."""
    stderr.print(f"[bold red]error:[/] {message}", markup=True, highlight=False)
    if hint:
        stderr.print(f"[bold cyan]hint:[/] {hint}", markup=True, highlight=False)
