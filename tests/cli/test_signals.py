"""Ctrl-C (SIGINT) and SIGTERM (a CI job cancelled, `docker stop`), issue 16 rows 5 and 11.

Either signal, at any moment: one line on stderr (`error: interrupted`, or `error: terminated (SIGTERM)`),
exit 130 or 143, no OUT, nothing left beside it. Before, a SIGINT during torch's import sometimes ended
in "terminate called after throwing an instance of 'pybind11::error_already_set'", a stack dump and
SIGABRT (the KeyboardInterrupt raised inside a native callback), and SIGTERM killed the run outright,
leaving its temporary folder behind.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bnbcli import interrupts
from bnbcli.cli import entry

from helpers.bnb_process import (
    HANG_SECONDS,
    assert_no_debris,
    interruptible_bnb,
    long_checkpoint,
    tree_digest,
    wait_for_handlers,
)

EXPECTED = {
    signal.SIGINT: (130, ["error: interrupted"]),
    signal.SIGTERM: (143, ["error: terminated (SIGTERM)"]),
}


def outcome(proc: subprocess.Popen[str], signum: int, out: Path) -> str:
    stdout, stderr = proc.communicate(timeout=HANG_SECONDS)
    shown = f"{signal.Signals(signum).name}: exit {proc.returncode}\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    code, lines = EXPECTED[signal.Signals(signum)]
    if proc.returncode == 0:  # it finished first: then OUT is whole
        assert (out / "bnb_manifest.json").is_file(), shown
        return "finished"
    assert proc.returncode == code, shown
    assert stderr.splitlines() == lines and stdout == "", shown
    assert not out.exists(), shown
    assert_no_debris(out)
    return "stopped"


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """260 MiB with a config.json: the planner's child and the hashing child start with the run."""
    src = tmp_path_factory.mktemp("signals") / "src"
    long_checkpoint(src, count=130)
    (src / "config.json").write_text('{"model_type": "not-in-transformers"}')  # planned by name rules
    return src


@pytest.mark.slow
def test_signals_at_any_moment_of_the_start_up_under_load(big: Path, tmp_path: Path) -> None:
    """SIGINT or SIGTERM to the whole process group at 24 moments of the first 2.5 s (torch's import,
    the children starting, planning, the first tensors), two runs at a time sharing one core.

    The load: both runs (and their children) are pinned to one core, so each gets half of it whatever
    the machine, as beside a busy process on the 2-core machine the suite runs on under `make test`
    (a burner process there cost a core for the whole test, and gave no load on a many-core machine)."""
    rng = random.Random(16)
    trials = [(rng.uniform(0.0, 2.5), rng.choice([signal.SIGINT, signal.SIGTERM])) for _ in range(24)]
    before = tree_digest(big)
    core = {min(os.sched_getaffinity(0))}

    def trial(index: int) -> str:
        delay, signum = trials[index]
        out = tmp_path / f"out{index}"
        os.sched_setaffinity(0, core)  # this pool thread's core, inherited by the process it starts
        proc = interruptible_bnb("quantize", str(big), str(out), "--config", "nf4-dq", "--no-progress")
        try:
            wait_for_handlers(proc)
            time.sleep(delay)
            os.killpg(proc.pid, signum)
            return outcome(proc, signum, out)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(trial, range(len(trials))))
    assert "stopped" in results
    assert tree_digest(big) == before


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_mid_run_cleans_up(signum: int, tmp_path: Path) -> None:
    """Row 11: SIGTERM (and SIGINT) once the run is writing: the temporary folder with its partial shard
    goes, exit 143 (130), one line. The signal goes to bnb alone, as `docker stop` sends it."""
    src, out = tmp_path / "src", tmp_path / "out"
    long_checkpoint(src)
    before = tree_digest(tmp_path)
    proc = interruptible_bnb("quantize", str(src), str(out), "--scheme", "nf4", "--double-quant", "--no-progress")
    try:
        shard = tmp_path / f".out.bnb-tmp-{proc.pid}" / "model.safetensors"
        deadline = time.monotonic() + HANG_SECONDS
        while not (shard.exists() and shard.stat().st_size > 0):
            assert proc.poll() is None, f"finished before it could be stopped: {proc.communicate()}"
            assert time.monotonic() < deadline, "no shard data appeared within 60 s"
            time.sleep(0.02)
        proc.send_signal(signum)
        assert outcome(proc, signum, out) == "stopped"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert tree_digest(tmp_path) == before


# Python code that torch's C++ runs while torch is importing: `torch._C._c10d_init()` imports modules, and
# since torch is still initialising, Python runs importlib's module-lock code for it. The profile hook
# sends SIGINT from there, so the handler runs inside that code, under a C++ frame.
SIGNAL_IN_TORCH_CALLBACK = """\
import os, signal, sys
from bnbcli.cli import entry

def raising(signum, frame):  # what Python's own handler (and bnb's before) does
    raise KeyboardInterrupt

signal.signal(signal.SIGINT, raising if sys.argv[1] == "raising" else entry._on_signal)
calls = []

def hook(frame, event, arg):
    if event == "c_call":
        calls.append(getattr(arg, "__name__", ""))
    elif event in ("c_return", "c_exception") and calls:
        calls.pop()
    elif event == "call" and calls and calls[-1] == "_c10d_init" and "importlib" in frame.f_code.co_filename:
        sys.setprofile(None)
        print("sent", flush=True)
        os.kill(os.getpid(), signal.SIGINT)

sys.setprofile(hook)
import torch
print("imported", flush=True)
"""


def test_ctrl_c_inside_torchs_native_import_callback_exits_130_not_abort() -> None:
    """Row 5, made deterministic: a KeyboardInterrupt raised there unwinds into C++, which cannot take it:
    "terminate called after throwing an instance of 'python_error'", SIGABRT. bnb's handler raises
    nothing during the start-up: one line, exit 130."""

    def run(handler: str) -> subprocess.CompletedProcess[str]:
        program = [sys.executable, "-c", SIGNAL_IN_TORCH_CALLBACK, handler]
        return subprocess.run(program, capture_output=True, text=True, timeout=HANG_SECONDS)

    raising = run("raising")
    assert raising.stdout == "sent\n", f"the hook no longer finds torch's callback: {raising}"
    assert raising.returncode == -signal.SIGABRT and "terminate called" in raising.stderr, raising
    ours = run("bnb")
    assert (ours.returncode, ours.stdout, ours.stderr) == (130, "sent\n", "error: interrupted\n"), ours


# A module whose import sends this process a signal and goes on working: where the signal lands
# inside an import, as in torch's, whose native callbacks cannot take a KeyboardInterrupt.
SIGNALLING_MODULE = """\
import os, signal
os.kill(os.getpid(), signal.{name})
total = sum(range(3_000_000))  # the handler runs during this, inside the import
print("import finished", flush=True)
"""


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_a_signal_during_the_start_up_exits_at_once_without_raising_into_the_import(name: str, tmp_path: Path) -> None:
    """Before the command line is imported nothing is written: the handler exits there and then,
    instead of raising KeyboardInterrupt into whatever import is running."""
    (tmp_path / "signalling.py").write_text(SIGNALLING_MODULE.format(name=name))
    program = (
        "import signal, sys\n"
        "from bnbcli.cli import entry\n"
        "for signum in entry.SIGNALS:\n"
        "    signal.signal(signum, entry._on_signal)\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "import signalling\n"
        "print('went on', flush=True)\n"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=HANG_SECONDS)
    code, lines = EXPECTED[signal.Signals[name]]
    assert (result.returncode, result.stderr.splitlines(), result.stdout) == (code, lines, ""), result


def test_a_signal_inside_a_later_import_is_raised_once_the_import_is_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the run is under way (transformers imported by the planner in this process, say), a signal
    inside an import waits for its end and is raised right after it, where the run can clean up."""
    (tmp_path / "signalling_later.py").write_text(SIGNALLING_MODULE.format(name="SIGINT"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(entry, "_imported", True)
    monkeypatch.setattr(interrupts, "_requested", False)
    entry.watch_deferred_signals()  # as main() does once the command line is imported
    previous = signal.signal(signal.SIGINT, entry._on_signal)
    try:
        with pytest.raises(KeyboardInterrupt):
            import signalling_later  # noqa: F401

            imported = time.monotonic()
            while time.monotonic() < imported + 30:  # the signal comes again once the import is over
                time.sleep(0.01)
        assert "signalling_later" in sys.modules, "the KeyboardInterrupt was raised inside the import"
    finally:
        signal.signal(signal.SIGINT, previous)
        sys.modules.pop("signalling_later", None)
    assert interrupts.requested()
