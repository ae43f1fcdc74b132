"""The only writer to the terminal: data to stdout, progress, logs and errors to stderr."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

SCHEMA_VERSION = 1

# Data goes to stdout; everything meant for a person watching goes to stderr. Piped into a file, tables
# keep their natural width (Rich would assume 80 columns) unless COLUMNS says otherwise.
PIPE_WIDTH = 200
stdout = Console(
    highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else PIPE_WIDTH
)
stderr = Console(stderr=True, highlight=False, soft_wrap=True)


_emitted = False  # whether this run printed its JSON document (an error after it must not print a second)


def emit_json(document: dict[str, Any]) -> None:
    """Print exactly one JSON document with a schema_version, no color, raw numbers."""
    global _emitted
    _emitted = True
    sys.stdout.write(json.dumps({"schema_version": SCHEMA_VERSION, **document}, indent=2) + "\n")
    sys.stdout.flush()


def json_emitted() -> bool:
    return _emitted


def new_run() -> None:
    """Nothing printed yet: main() may run more than once in one process (tests do)."""
    global _emitted
    _emitted = False


def emit_table(title: str, rows: list[tuple[str, str]]) -> None:
    """A two-column human table on stdout."""
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    stdout.print(table)


def emit_tensor_table(
    title: str,
    caption: str | None,
    tensors: list[dict[str, Any]],
    action: Callable[[dict[str, Any]], str],
    total: str,
    bytes_in: int,
    bytes_out: int,
) -> None:
    """A plan on stdout: a row per tensor (name, shape, dtype, ``action(tensor)``, bytes in and out, from the
    tensor's keys name/shape/dtype/bytes_in/bytes_out), then a ``total`` row."""
    from bnbcli.units import human_bytes

    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    # Names fold onto a second line rather than lose the part (q_proj, bias) that tells rows apart.
    table.add_column("tensor", overflow="fold")
    for column in ("shape", "dtype", "action", "in", "out"):
        table.add_column(column, justify="right" if column in ("in", "out") else "left", no_wrap=column != "action")
    for t in tensors:
        shape = "×".join(map(str, t["shape"])) or "scalar"
        table.add_row(t["name"], shape, t["dtype"], action(t), human_bytes(t["bytes_in"]), human_bytes(t["bytes_out"]))
    table.add_section()
    table.add_row(total, "", "", "", human_bytes(bytes_in), human_bytes(bytes_out))
    stdout.print(table)


def warning(message: str) -> None:
    """`warning: …`, one line on stderr: something worth a look that does not stop the run."""
    stderr.print(f"[bold yellow]warning:[/] {escape(message)}", markup=True, highlight=False)


def warnings(messages: list[str]) -> None:
    for message in messages:
        warning(message)


def failure(message: str) -> None:
    """`fail: …`, one line on stderr: one check that did not pass (the run then exits 1)."""
    stderr.print(f"[bold red]fail:[/] {escape(message)}", markup=True, highlight=False)


def error(message: str, hint: str | None = None) -> None:
    """`error: …` and `hint: …`, one line each, on stderr."""
    stderr.print(f"[bold red]error:[/] {message}", markup=True, highlight=False)
    if hint:
        stderr.print(f"[bold cyan]hint:[/] {hint}", markup=True, highlight=False)


class ByteProgress:
    """A Rich progress bar in bytes on stderr; a no-op when disabled (not a terminal, --json, -q)."""

    def __init__(self, total: int, description: str, enabled: bool) -> None:
        self.enabled = enabled and stderr.is_terminal
        self.total = total
        self.description = description
        self._progress: Any = None
        self._task: Any = None

    def _columns(self) -> tuple[Any, ...]:
        from rich.progress import BarColumn, DownloadColumn, TimeRemainingColumn, TransferSpeedColumn

        return BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn()

    def __enter__(self) -> ByteProgress:
        if self.enabled:
            from rich.progress import Progress

            self._progress = Progress(
                "[progress.description]{task.description}",
                *self._columns(),
                console=stderr,
                transient=True,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(self.description, total=self.total)
        return self

    def advance(self, nbytes: int) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, nbytes)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)


class CountProgress(ByteProgress):
    """The same bar, counting things (tokens) rather than bytes."""

    def _columns(self) -> tuple[Any, ...]:
        from rich.progress import BarColumn, MofNCompleteColumn, TimeElapsedColumn, TimeRemainingColumn

        return BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()
