"""One writer per OUT (bnbcli/checkpoint/out_lock.py): runs that start at once on the same OUT, real
processes each, leave exactly one writer; the others fail with the documented message and never take or
remove the winner's lock; a lock left by a killed run blocks nobody."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bnbcli.checkpoint.atomic import AtomicOutputDir
from bnbcli.errors import InputError

from helpers.bnb_process import EXIT_FAILED, HANG_SECONDS, assert_no_debris, bnb_env, long_checkpoint, run_bnb

RUNS = 8

# One contender: it says it is ready, waits for "go" (so that all of them try at once), then takes OUT.
# The winner keeps the lock until every other contender has failed, checks that the lock file is still
# its own, and commits. A second winner would wait for failures that never come: the guard then says so.
CONTENDER = """
import os, sys, time
from pathlib import Path
from bnbcli.checkpoint.atomic import AtomicOutputDir
from bnbcli.errors import BnbError

out, signals, runs, guard = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
(signals / f"ready-{os.getpid()}").touch()
while not (signals / "go").exists():
    time.sleep(0.001)
output = AtomicOutputDir(out)
try:
    with output as tmp:
        (tmp / "bnb_manifest.json").write_text(str(os.getpid()))
        deadline = time.monotonic() + guard
        while len(list(signals.glob("failed-*"))) < runs - 1:
            if time.monotonic() > deadline:
                sys.exit("stuck: the others did not all fail")
            time.sleep(0.005)
        print("lock intact" if output.lock.read_text() == str(os.getpid()) else "lock replaced")
        output.commit()
    print("wrote")
except BnbError as exc:
    print(f"error: {exc.message}")
    (signals / f"failed-{os.getpid()}").touch()
"""

# A run that takes OUT's lock, says so, and waits to be killed. With "blank", it then empties the lock
# file: what a second run sees in the instant between the first one's taking the lock and writing its pid.
HOLDER = """
import sys, time
from pathlib import Path
from bnbcli.checkpoint.atomic import AtomicOutputDir

output = AtomicOutputDir(Path(sys.argv[1]))
with output as tmp:
    (tmp / "partial").write_text("half")
    if sys.argv[3:] == ["blank"]:
        output.lock.write_text("")
    Path(sys.argv[2]).touch()
    time.sleep(3600)
"""


def _python(code: str, *args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=bnb_env(),
    )


def _wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + HANG_SECONDS
    while not condition():
        assert time.monotonic() < deadline, f"{what} never happened"
        time.sleep(0.01)


def test_runs_started_at_once_leave_one_writer(tmp_path: Path) -> None:
    out, signals = tmp_path / "out", tmp_path / "signals"
    signals.mkdir()
    runs = [_python(CONTENDER, out, signals, RUNS, HANG_SECONDS) for _ in range(RUNS)]
    try:
        _wait_for(lambda: len(list(signals.glob("ready-*"))) == RUNS, "all contenders ready")
        (signals / "go").touch()
        results = {p.pid: p.communicate(timeout=HANG_SECONDS) for p in runs}
    finally:
        for p in runs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert all(p.returncode == 0 for p in runs), results
    winners = [pid for pid, (stdout, _) in results.items() if stdout.splitlines()[-1:] == ["wrote"]]
    assert len(winners) == 1, results
    (winner,) = winners
    assert results[winner][0].splitlines() == ["lock intact", "wrote"], results[winner]
    busy = re.compile(rf"error: another bnb(?: \(pid (\d+)\))? is writing {re.escape(str(out))}")
    for pid, (stdout, stderr) in results.items():
        if pid != winner:
            match = busy.fullmatch(stdout.strip())
            assert match, (stdout, stderr)
            assert match.group(1) in (None, str(winner)), stdout  # the pid named is the writer's
    assert (out / "bnb_manifest.json").read_text() == str(winner)
    assert_no_debris(out)  # no lock file, no temporary folder


def test_quantize_runs_started_at_once_on_one_out(tmp_path: Path) -> None:
    """The same with `bnb quantize` itself: whether a loser comes while the winner writes (the lock) or
    after it finished (OUT exists), it fails with exit 1 and the winner's output is whole."""
    src, out = tmp_path / "src", tmp_path / "out"
    long_checkpoint(src, count=12, size=512)
    reference = tmp_path / "reference"
    assert run_bnb("quantize", str(src), str(reference), "--no-progress").returncode == 0
    command = [sys.executable, "-c", "from bnbcli.cli.entry import console; console()", "quantize", str(src), str(out)]
    runs = [
        subprocess.Popen(
            [*command, "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=bnb_env()
        )
        for _ in range(6)
    ]
    results = [p.communicate(timeout=HANG_SECONDS) for p in runs]
    codes = [p.returncode for p in runs]
    assert codes.count(0) == 1 and codes.count(EXIT_FAILED) == 5, (codes, results)
    for (_, stderr), code in zip(results, codes, strict=True):
        if code:
            error, hint = stderr.splitlines()
            at = re.escape(str(out))
            assert re.fullmatch(rf"error: (another bnb( \(pid \d+\))? is writing {at}|{at} already exists)", error)
            assert hint.startswith("hint: ")
    written = {p.name: p.read_bytes() for p in out.glob("*.safetensors")}
    assert written and written == {p.name: p.read_bytes() for p in reference.glob("*.safetensors")}
    assert_no_debris(out)


def test_a_killed_runs_lock_blocks_nobody(tmp_path: Path) -> None:
    out, ready = tmp_path / "out", tmp_path / "ready"
    holder = _python(HOLDER, out, ready)
    try:
        _wait_for(lambda: ready.exists() or holder.poll() is not None, "the holder taking the lock")
        assert holder.poll() is None, holder.communicate()
        lock = tmp_path / ".out.bnb-lock"
        assert lock.read_text() == str(holder.pid)
        # While it lives, OUT is its own.
        with pytest.raises(InputError) as busy, AtomicOutputDir(out):
            pass
        assert busy.value.message == f"another bnb (pid {holder.pid}) is writing {out}"
        holder.send_signal(signal.SIGKILL)
        holder.communicate(timeout=HANG_SECONDS)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.communicate()
    assert lock.exists()  # left behind by the killed run, with its pid
    output = AtomicOutputDir(out)
    with output as tmp:
        assert lock.read_text() == str(os.getpid())
        (tmp / "bnb_manifest.json").write_text("{}")
        output.commit()
    assert (out / "bnb_manifest.json").is_file()
    assert_no_debris(out)  # the killed run's lock and temporary folder are gone


def test_a_lock_taken_an_instant_ago_is_respected(tmp_path: Path) -> None:
    """The race of the hand-made lock (issue 18): a run that met the lock file before its holder had
    written its pid took it for a stale one, removed it, and wrote OUT beside the holder."""
    out, ready = tmp_path / "out", tmp_path / "ready"
    lock = tmp_path / ".out.bnb-lock"
    holder = _python(HOLDER, out, ready, "blank")
    try:
        _wait_for(lambda: ready.exists() or holder.poll() is not None, "the holder taking the lock")
        assert holder.poll() is None, holder.communicate()
        before = lock.stat()
        with pytest.raises(InputError) as busy, AtomicOutputDir(out):
            pass
        assert busy.value.message == f"another bnb is writing {out}"
        assert os.path.samestat(lock.stat(), before), "the holder's lock file was removed or replaced"
        assert holder.poll() is None
    finally:
        holder.kill()
        holder.communicate()


def _interrupt_once(real):
    calls = []

    def interrupted(*args, **kwargs):
        if not calls:
            calls.append(args)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    return interrupted


def test_a_ctrl_c_while_taking_the_lock_leaves_no_lock_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whether the Ctrl-C comes before the lock is taken (the file just made) or after (the pid not yet
    written), the run removes its lock file on the way out, as it does when a Ctrl-C comes later."""
    import filelock

    out = tmp_path / "out"
    for module, name in ((filelock, "lock_descriptor"), (os, "ftruncate")):
        with monkeypatch.context() as patch:
            patch.setattr(module, name, _interrupt_once(getattr(module, name)))
            with pytest.raises(KeyboardInterrupt), AtomicOutputDir(out):
                pass
        assert sorted(p.name for p in tmp_path.iterdir()) == [], name
    output = AtomicOutputDir(out)  # and the next run is not hindered
    with output as tmp:
        (tmp / "bnb_manifest.json").write_text("{}")
        output.commit()
    assert_no_debris(out)
