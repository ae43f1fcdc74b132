"""The error contract of `bnb quantize`, through the real command in a subprocess.

Every bad input must give exit code 1 (the input is bad) or 2 (the arguments are), exactly one
`error: …` line that names the problem and the file or tensor, one `hint: …` line, no traceback,
nothing on stdout, no OUT afterwards (nor a `.OUT.bnb-tmp-*` folder or a `.OUT.bnb-lock` beside it),
and the source untouched. That last part is checked by hashing the case's whole folder, hidden files
included, before and after.

Each run starts Python and imports torch (~3 s), so the cases selected for a session are started
together, a few at a time, by one fixture; each test then checks its own case.
"""

from __future__ import annotations

import signal
import subprocess
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers.bnb_process import (  # tests/ is on sys.path (conftest.py)
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    HANG_SECONDS,
    assert_no_debris,
    interruptible_bnb,
    long_checkpoint,
    run_bnb,
    tree_digest,
)
from helpers.quantize_cases import CASES, Case

PARALLEL = 3  # runs at once: each is mostly CPU-bound imports, and a run waits a little on its disk


@dataclass
class Outcome:
    root: Path
    args: list[str]
    before: dict[str, str]
    result: subprocess.CompletedProcess[str]
    seconds: float


def _run_case(root: Path, case: Case) -> Outcome:
    args = case.build(root)
    before = tree_digest(root)
    started = time.monotonic()
    result = run_bnb("quantize", *args)
    return Outcome(root, args, before, result, time.monotonic() - started)


@pytest.fixture(scope="module")
def outcomes(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Future[Outcome]]:
    """Start every selected case at once (PARALLEL at a time); tests wait on their own."""
    selected = [
        item.callspec.params["name"]
        for item in request.session.items
        if item.module is request.module and hasattr(item, "callspec") and "name" in item.callspec.params
    ]
    base = tmp_path_factory.mktemp("quantize-errors")
    pool = ThreadPoolExecutor(max_workers=PARALLEL)
    futures = {name: pool.submit(_run_case, base / name, CASES[name]) for name in dict.fromkeys(selected)}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.parametrize("name", list(CASES))
def test_quantize_error_contract(name: str, outcomes: dict[str, Future[Outcome]]) -> None:
    case = CASES[name]
    outcome = outcomes[name].result()
    result, root = outcome.result, outcome.root
    out = Path(outcome.args[1])
    shown = f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    assert "Traceback" not in result.stderr, shown
    assert result.returncode == case.code, shown
    assert_no_debris(out)

    if case.code == 0:
        after = tree_digest(root)
        inputs_after = {k: v for k, v in after.items() if k != "out" and not k.startswith("out/")}
        inputs_before = {k: v for k, v in outcome.before.items() if k != "out" and not k.startswith("out/")}
        assert inputs_after == inputs_before, "the source changed"
        assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
        assert not (out / "precious.txt").exists(), "--overwrite should replace OUT, not merge into it"
        assert result.stdout.startswith(f"wrote {out}"), shown
        return

    # Nothing written, nothing moved: the whole case folder is byte for byte as before (OUT included
    # where it existed), so no OUT, no temporary folder, no lock, and an untouched source.
    assert tree_digest(root) == outcome.before, "the run changed files: " + shown
    assert out.exists() == case.out_exists
    assert result.stdout == "", shown
    lines = result.stderr.splitlines()
    assert len(lines) == 2, shown
    error, hint = lines
    assert error.startswith("error: ") and hint.startswith("hint: "), shown
    for word in case.words:
        assert word in error, f"{word!r} not in the error line\n{shown}"
    for word in case.hint_words:
        assert word in hint, f"{word!r} not in the hint line\n{shown}"
    assert "internal error" not in error, shown


def test_every_error_case_names_its_file_or_tensor() -> None:
    """The cases about a file or a tensor check for its name in the error line (a guard on the table)."""
    for name, case in CASES.items():
        if case.code == EXIT_FAILED:
            assert case.words, name


# ------------------------------------------------------------------------------------------- Ctrl-C


@pytest.mark.parametrize("delay", [0.3, 0.8, 1.5])
def test_sigint_while_starting_or_planning(tmp_path: Path, delay: float) -> None:
    """Ctrl-C while Python imports torch, or while the planner imports transformers: still one line, exit
    130 and nothing left behind (an interrupted import must not turn into a traceback, nor its half-made
    native threads into an abort at exit)."""
    src, out = tmp_path / "src", tmp_path / "out"
    long_checkpoint(src, count=130)  # 260 MiB
    (src / "config.json").write_text('{"model_type": "not-in-transformers"}')  # transformers asked, then name rules
    proc = interruptible_bnb("quantize", str(src), str(out), "--scheme", "nf4", "--no-progress")
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=HANG_SECONDS)
    shown = f"exit {proc.returncode}\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    assert proc.returncode == EXIT_INTERRUPTED, shown
    assert stderr.splitlines() == ["error: interrupted"], shown
    assert not out.exists()
    assert_no_debris(out)


def test_sigint_leaves_nothing_behind(tmp_path: Path) -> None:
    """Ctrl-C in the middle of the tensors: exit 130, `error: interrupted`, no OUT, no temp folder, no lock.

    The signal is sent once the temporary folder holds a shard with data in it, so the run is known to
    be inside the pipeline (never while it imports or plans), whatever the machine's speed.
    """
    src, out = tmp_path / "src", tmp_path / "out"
    long_checkpoint(src)
    before = tree_digest(tmp_path)
    proc = interruptible_bnb("quantize", str(src), str(out), "--scheme", "nf4", "--double-quant", "--no-progress")
    try:
        deadline = time.monotonic() + HANG_SECONDS
        tmp_dir = tmp_path / f".out.bnb-tmp-{proc.pid}"
        shard = tmp_dir / "model.safetensors"
        while True:
            assert proc.poll() is None, f"finished before it could be interrupted: {proc.communicate()}"
            assert time.monotonic() < deadline, "no shard data appeared within 60 s"
            try:
                if shard.stat().st_size > 0:
                    break
            except FileNotFoundError:
                pass
            time.sleep(0.02)
        assert (tmp_path / ".out.bnb-lock").is_file()
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=HANG_SECONDS)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    shown = f"exit {proc.returncode}\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    assert proc.returncode == EXIT_INTERRUPTED, shown
    assert "Traceback" not in stderr and stdout == "", shown
    assert stderr.splitlines() == ["error: interrupted"], shown
    assert not out.exists()
    assert_no_debris(out)
    assert tree_digest(tmp_path) == before
