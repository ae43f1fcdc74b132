"""Progress on stderr: a Rich bar on a terminal; elsewhere (a CI log) a plain line every
PROGRESS_LINE_SECONDS with tensors, bytes, rate and ETA, for the verbs that run long. No test here waits
for the clock: unit tests drive a fake one, command tests set the interval to 0 (a line per tensor)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
from golden import golden_dir
from rich.console import Console
from test_dequantize_cli import bnb

from bnbcli import output

GPT2 = golden_dir() / "models" / "gpt2"
DESCRIPTIONS = {"quantize": "quantizing", "dequantize": "dequantizing", "inspect": "inspecting"}
LINE = re.compile(r"^(quantizing|dequantizing|inspecting): \d+ tensors?, .+ of .+ \(\d+%\), .+/s, ETA \S+$")


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _console(terminal: bool) -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=terminal, width=120, highlight=False, soft_wrap=True), buffer


def test_a_line_once_the_interval_has_passed(monkeypatch: pytest.MonkeyPatch) -> None:
    console, buffer = _console(terminal=False)
    monkeypatch.setattr(output, "stderr", console)
    clock = FakeClock()
    with output.ByteProgress(4_000_000_000, "quantizing", enabled=True, clock=clock) as progress:
        clock.now += output.PROGRESS_LINE_SECONDS - 1
        progress.advance(1_000_000_000)  # not yet
        assert buffer.getvalue() == ""
        clock.now += 1
        progress.advance(1_000_000_000)
        clock.now += 1
        progress.advance(0)  # 1 s after the last line: nothing
    lines = buffer.getvalue().splitlines()
    assert lines == ["quantizing: 2 tensors, 2.00 GB of 4.00 GB (50%), 200.00 MB/s, ETA 10s"]


def test_no_lines_when_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    console, buffer = _console(terminal=False)
    monkeypatch.setattr(output, "stderr", console)
    clock = FakeClock()
    with output.ByteProgress(10, "quantizing", enabled=False, clock=clock) as progress:
        clock.now += 3600
        progress.advance(5)
    assert buffer.getvalue() == ""


def test_a_terminal_gets_the_rich_bar_not_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    console, buffer = _console(terminal=True)
    monkeypatch.setattr(output, "stderr", console)
    clock = FakeClock()
    with output.ByteProgress(2_000_000, "quantizing", enabled=True, clock=clock) as progress:
        assert progress._progress is not None
        clock.now += 3600
        progress.advance(1_000_000)
        progress._progress.refresh()
    shown = buffer.getvalue()
    assert "quantizing" in shown and "━" in shown and "1.0/2.0 MB" in shown
    assert "tensor" not in shown  # no plain line


def test_json_on_a_terminal_gets_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    console, buffer = _console(terminal=True)
    monkeypatch.setattr(output, "stderr", console)
    clock = FakeClock()
    with output.ByteProgress(10, "inspecting", enabled=True, bar=False, clock=clock) as progress:
        assert progress._progress is None
        clock.now += output.PROGRESS_LINE_SECONDS
        progress.advance(10)
    assert buffer.getvalue().splitlines() == ["inspecting: 1 tensor, 10 B of 10 B (100%), 1 B/s, ETA 0s"]


def test_line_without_progress_yet() -> None:
    assert (
        output.progress_line("quantizing", 0, 0, 5_000, 12.0)
        == "quantizing: 0 tensors, 0 B of 5.00 KB (0%), 0 B/s, ETA unknown"
    )
    assert output.progress_line("quantizing", 3, 10, 0, 1.0).endswith("10 B of 0 B, 10 B/s, ETA unknown")


# -------------------------------------------------------------------------------------------- the verbs


def _bnb(args: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> tuple[int, str, str]:
    """`bnb ARGS` in this process, stderr not a terminal, a progress line after every tensor."""
    monkeypatch.setattr(output, "PROGRESS_LINE_SECONDS", 0.0)
    return bnb(args, capsys, monkeypatch)


def _progress_lines(stderr: str) -> list[str]:
    lines = [line for line in stderr.splitlines() if LINE.match(line)]
    assert len(lines) == len([line for line in stderr.splitlines() if " tensor" in line and "ETA" in line])
    return lines


def _documented_tensors(verb: str, document: dict) -> int:
    if verb == "inspect":
        return len(document["tensors"])
    return sum(len(component["tensors"]) for component in document["components"])


@pytest.mark.parametrize("verb", ["quantize", "dequantize", "inspect"])
def test_each_long_verb_prints_lines_with_json_on_stdout(verb: str, tmp_path: Path, capsys, monkeypatch) -> None:
    src = GPT2 / ("nf4" if verb == "dequantize" else "src")
    args = [verb, str(src)] + ([] if verb == "inspect" else [str(tmp_path / "out")])
    code, stdout, stderr = _bnb([*args, "--json"], capsys, monkeypatch)
    assert code == 0, stderr
    document = json.loads(stdout)  # stdout is one JSON document, nothing else
    lines = _progress_lines(stderr)
    assert len(lines) == _documented_tensors(verb, document) > 1  # a line per tensor at interval 0
    assert lines[-1].startswith(f"{DESCRIPTIONS[verb]}: {len(lines)} tensors, ")
    assert "(100%)" in lines[-1]


@pytest.mark.parametrize("flag", ["-q", "--no-progress"])
def test_quiet_and_no_progress_silence_the_lines(flag: str, tmp_path: Path, capsys, monkeypatch) -> None:
    code, _, stderr = _bnb(["quantize", str(GPT2 / "src"), str(tmp_path / "out"), flag], capsys, monkeypatch)
    assert code == 0, stderr
    assert not [line for line in stderr.splitlines() if "tensor" in line and "ETA" in line]
