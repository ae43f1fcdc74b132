"""Progress on stderr: a Rich bar on a terminal; elsewhere (a CI log) a plain line every
PROGRESS_LINE_SECONDS with tensors, bytes, rate and ETA, for the verbs that run long. No test here waits
for the clock: unit tests drive a fake one, command tests set the interval to 0 (a line per tensor)."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from bnbcli import output

from helpers.bnb_process import HANG_SECONDS, bnb_env
from helpers.bnb_process import run_main as bnb
from helpers.golden import golden_dir

GPT2 = golden_dir() / "models" / "gpt2"
DESCRIPTIONS = {"quantize": "quantizing", "dequantize": "dequantizing", "inspect": "inspecting"}
LINE = re.compile(r"^(quantizing|dequantizing|inspecting): \d+ tensors?, .+ of .+ \(\d+%\), .+/s, ETA \S+$")
# One line's figures: tensors done, bytes done and in all, the share, the rate and the ETA.
FIGURES = re.compile(
    r"^quantizing: (?P<tensors>\d+) tensors?, (?P<done>[\d.]+ [KMG]?B) of (?P<total>[\d.]+ [KMG]?B) "
    r"\((?P<share>\d+)%\), (?P<rate>[\d.]+ [KMG]?B)/s, ETA (?P<eta>\d+s|\d+m\d\ds|\d+h\d\dm|unknown)$"
)


@pytest.fixture(autouse=True)
def _not_quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    """An earlier in-process run with -q leaves the terminal quiet until the next run starts."""
    monkeypatch.setattr(output.stdout, "quiet", False)


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


def _figures(stderr: str) -> list[dict[str, str]]:
    found = [FIGURES.match(line) for line in stderr.splitlines()]
    return [m.groupdict() for m in found if m]


def _check_a_line_per_tensor(figures: list[dict[str, str]], tensors: int) -> None:
    """At interval 0 every finished tensor gives a line: the count goes 1, 2, ..., the share only grows,
    the total stays, and the last line is the whole checkpoint with nothing left to wait for."""
    assert [int(f["tensors"]) for f in figures] == list(range(1, tensors + 1))
    shares = [int(f["share"]) for f in figures]
    assert shares == sorted(shares) and shares[-1] == 100
    assert len({f["total"] for f in figures}) == 1 and figures[-1]["done"] == figures[-1]["total"]
    assert figures[-1]["eta"] == "0s"


def test_a_plain_run_in_a_ci_log_prints_lines(tmp_path: Path, capsys, monkeypatch) -> None:
    """No --json: stderr is not a terminal (captured), so the lines come instead of the bar, and stdout
    keeps its one summary line."""
    out = tmp_path / "out"
    code, stdout, stderr = _bnb(["quantize", str(GPT2 / "src"), str(out)], capsys, monkeypatch)
    assert code == 0, stderr
    assert stdout.startswith(f"wrote {out}") and len(stdout.splitlines()) == 1
    manifest = json.loads((out / "bnb_manifest.json").read_text())
    tensors = sum(len(component["tensors"]) for component in manifest["components"])
    _check_a_line_per_tensor(_figures(stderr), tensors)


# The real command in its own process, stderr a pipe, with a small interval (0: a line per tensor).
_WITH_INTERVAL_0 = (
    "import sys; sys.argv = ['bnb', *sys.argv[1:]]\n"
    "from bnbcli import output; output.PROGRESS_LINE_SECONDS = 0.0\n"
    "from bnbcli.cli.entry import console; console()\n"
)


@pytest.mark.parametrize("flag", [None, "-v", "-q"])
def test_the_command_in_a_pipe_prints_lines_unless_quiet(flag: str | None, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["quantize", str(GPT2 / "src"), str(out), *([flag] if flag else [])]
    command = [sys.executable, "-c", _WITH_INTERVAL_0, *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=HANG_SECONDS, env=bnb_env())
    assert done.returncode == 0, done.stderr
    figures = _figures(done.stderr)
    if flag == "-q":
        assert done.stderr == "" and done.stdout == ""  # -q: nothing but errors
        return
    manifest = json.loads((out / "bnb_manifest.json").read_text())
    _check_a_line_per_tensor(figures, sum(len(c["tensors"]) for c in manifest["components"]))


def test_eval_counts_tokens_in_its_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    console, buffer = _console(terminal=False)
    monkeypatch.setattr(output, "stderr", console)
    clock = FakeClock()
    with output.CountProgress(1000, "tokens", enabled=True, clock=clock) as progress:
        clock.now += output.PROGRESS_LINE_SECONDS
        progress.advance(250)
    assert buffer.getvalue().splitlines() == ["tokens: 250 of 1000 (25%), 25/s, ETA 30s"]
