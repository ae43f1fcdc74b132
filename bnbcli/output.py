"""The only writer to the terminal: data to stdout, progress, logs and errors to stderr."""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bnbcli import json_text

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
    # json.dumps(indent=2)'s text; its pure-Python encoder took a fifth of `bnb inspect --json` on 50,000 tensors
    json_text.write_indented({"schema_version": SCHEMA_VERSION, **document}, sys.stdout.write)
    sys.stdout.write("\n")
    sys.stdout.flush()


def json_emitted() -> bool:
    return _emitted


def new_run() -> None:
    """Nothing printed yet: main() may run more than once in one process (tests do)."""
    global _emitted
    _emitted = False
    set_quiet(False)


def set_quiet(quiet: bool) -> None:
    """-q: nothing on stdout but a JSON document (written past the console), and no progress."""
    stdout.quiet = quiet


def quiet() -> bool:
    return stdout.quiet


def emit_table(title: str, rows: list[tuple[str, str]]) -> None:
    """A two-column human table on stdout."""
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    stdout.print(table)


# A plan with more rows than this shows one row per group of tensors that differ only in the numbers of their
# names (layers, experts) and agree in shape, dtype and action: 200,000 rows took rich 85 s to lay out, and no
# one reads them in a terminal (--json lists every tensor).
FULL_TABLE_ROWS = 1000


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
    tensor's keys name/shape/dtype/bytes_in/bytes_out), then a ``total`` row; past FULL_TABLE_ROWS tensors, a
    row per group of alike tensors (``fold_rows``). Nothing under -q: the table would be laid out to be
    dropped (86 s for the 200,000 rows of a tiny-expert checkpoint's --dry-run -q)."""
    if stdout.quiet:
        return
    from bnbcli.units import human_bytes

    rows = [(t["name"], t["shape"], t["dtype"], action(t), t["bytes_in"], t["bytes_out"]) for t in tensors]
    if len(rows) > FULL_TABLE_ROWS:
        rows = fold_rows(rows)
        note = "alike tensors folded into one row: their names' numbers as *, then how many; --json lists every one"
        caption = f"{caption}\n{note}" if caption else note
    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    # Names fold onto a second line rather than lose the part (q_proj, bias) that tells rows apart.
    table.add_column("tensor", overflow="fold")
    for column in ("shape", "dtype", "action", "in", "out"):
        table.add_column(column, justify="right" if column in ("in", "out") else "left", no_wrap=column != "action")
    for name, shape, dtype, what, row_in, row_out in rows[:FULL_TABLE_ROWS]:
        dims = "×".join(map(str, shape)) or "scalar"
        table.add_row(name, dims, dtype, what, human_bytes(row_in), human_bytes(row_out))
    if len(rows) > FULL_TABLE_ROWS:
        table.add_row(f"… {len(rows) - FULL_TABLE_ROWS} more rows", "", "", "", "", "")
    table.add_section()
    table.add_row(total, "", "", "", human_bytes(bytes_in), human_bytes(bytes_out))
    stdout.print(table)


Row = tuple[str, list[int], str, str, int, int]  # name, shape, dtype, action, bytes in, bytes out


def fold_rows(rows: list[Row]) -> list[Row]:
    """One row per group of rows whose names differ only in their numbers and whose shape, dtype and action
    agree, in the order of each group's first row: its name with every number as *, then ×count, and the
    group's bytes; a group of one keeps its row."""
    groups: dict[tuple[str, tuple[int, ...], str, str], list[Row]] = {}
    for row in rows:
        groups.setdefault((_NUMBERS.sub("*", row[0]), tuple(row[1]), row[2], row[3]), []).append(row)
    folded = []
    for (pattern, _, _, _), members in groups.items():
        if len(members) == 1:
            folded.append(members[0])
            continue
        _, shape, dtype, what, _, _ = members[0]
        name = f"{pattern} ×{len(members)}"
        folded.append((name, shape, dtype, what, sum(m[4] for m in members), sum(m[5] for m in members)))
    return folded


_NUMBERS = re.compile(r"\d+")


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


# A run whose stderr is not a terminal (a CI log) has no bar: it prints a plain progress line at most this
# often instead, so that a long run shows it is alive.
PROGRESS_LINE_SECONDS = 10.0


class ByteProgress:
    """Progress on stderr over ``total`` bytes, advanced once per tensor: a Rich bar when stderr is a
    terminal, else a plain line (``progress_line``) when a tensor finishes and ``PROGRESS_LINE_SECONDS``
    have passed since the last one; nothing when disabled (--no-progress) or quiet (-q). ``bar=False`` (--json)
    gives the lines on a terminal too. ``clock`` is for tests."""

    def __init__(
        self,
        total: int,
        description: str,
        enabled: bool,
        bar: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.enabled = enabled = enabled and not quiet()
        self.lines = enabled and not (bar and stderr.is_terminal)
        self.total = total
        self.description = description
        self.interval = PROGRESS_LINE_SECONDS
        self.clock = clock
        self.done_bytes = 0
        self.done_tensors = 0
        self._started = self._last_line = 0.0
        self._lock = threading.Lock()  # advanced from a pipeline's writer thread
        self._progress: Any = None
        self._task: Any = None

    def _columns(self) -> tuple[Any, ...]:
        from rich.progress import BarColumn, DownloadColumn, TimeRemainingColumn, TransferSpeedColumn

        return BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn()

    def __enter__(self) -> ByteProgress:
        self._started = self._last_line = self.clock()
        if self.enabled and not self.lines:
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
        """One more tensor done, of ``nbytes``."""
        if self._progress is not None:
            self._progress.advance(self._task, nbytes)
        if not self.lines:
            return
        with self._lock:
            self.done_bytes += nbytes
            self.done_tensors += 1
            now = self.clock()
            if now - self._last_line < self.interval:
                return
            self._last_line = now
            line = self._line(now - self._started)
        stderr.print(line, markup=False, highlight=False)

    def _line(self, seconds: float) -> str:
        return progress_line(self.description, self.done_tensors, self.done_bytes, self.total, seconds)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)


class CountProgress(ByteProgress):
    """The same progress, counting things (tokens) rather than bytes in tensors."""

    def _columns(self) -> tuple[Any, ...]:
        from rich.progress import BarColumn, MofNCompleteColumn, TimeElapsedColumn, TimeRemainingColumn

        return BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()

    def _line(self, seconds: float) -> str:
        done, total = self.done_bytes, self.total
        share = f" ({done / total:.0%})" if total else ""
        rate = done / seconds if seconds > 0 else 0.0
        return f"{self.description}: {done} of {total}{share}, {rate:.0f}/s, ETA {_eta(done, total, rate)}"


def progress_line(description: str, tensors: int, done: int, total: int, seconds: float) -> str:
    """``quantizing: 12 tensors, 1.20 GB of 16.06 GB (7%), 210.00 MB/s, ETA 1m10s``."""
    from bnbcli.units import human_bytes

    share = f" ({done / total:.0%})" if total else ""
    rate = done / seconds if seconds > 0 else 0.0
    return (
        f"{description}: {tensors} tensor{'s' if tensors != 1 else ''}, {human_bytes(done)} of {human_bytes(total)}"
        f"{share}, {human_bytes(round(rate))}/s, ETA {_eta(done, total, rate)}"
    )


def _eta(done: int, total: int, rate: float) -> str:
    from bnbcli.units import human_seconds

    return human_seconds((total - done) / rate) if rate > 0 and total >= done else "unknown"
