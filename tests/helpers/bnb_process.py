"""Running the real `bnb` command (in a subprocess, or through main() here), and checking what it left on disk."""

from __future__ import annotations

import hashlib
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

COMMAND = [sys.executable, "-c", "from bnbcli.cli.entry import console; console()"]
EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130

# How long a test waits for a process or an event before calling it a hang: a guard, never a speed limit
# (the suite runs beside other work on 2 cores; a run that takes 10 s alone can take minutes there).
HANG_SECONDS = 900


def bnb_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("BNB_DEBUG", None)  # a traceback would be wanted there; here it is a failure
    env.update(HF_HUB_OFFLINE="1", NO_COLOR="1", TERM="dumb", COLUMNS="300")
    return env


def run_bnb(
    *args: str, timeout: float = HANG_SECONDS, env: dict[str, str] | None = None, **popen: object
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COMMAND, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=bnb_env() | (env or {}),
        stdin=subprocess.DEVNULL,
        **popen,  # type: ignore[arg-type]
    )


def run_main(
    args: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> tuple[int, str, str]:
    """`bnb ARGS` in this process, through main() and its error boundary: (exit code, stdout, stderr)."""
    from bnbcli.cli.app import main

    monkeypatch.setattr(sys, "argv", ["bnb", *args])
    monkeypatch.delenv("BNB_DEBUG", raising=False)
    capsys.readouterr()
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def tree_digest(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (hidden ones too) → the sha256 of a file, or "dir"."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            out[os.path.relpath(os.path.join(dirpath, name), root)] = "dir"
        for name in filenames:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.file_digest(f, "sha256").hexdigest()
    return out


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` by what would show that it was replaced or changed (type, inode, size,
    time, bytes or link target), without opening a FIFO or a device."""
    found: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            content: object = None
            if stat.S_ISREG(st.st_mode):
                content = Path(path).read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            kind = stat.S_IFMT(st.st_mode)
            found[os.path.relpath(path, root)] = (kind, st.st_ino, st.st_size, st.st_mtime_ns, st.st_rdev, content)
    return found


def debris(out: Path) -> list[str]:
    """Temporary folders, files or locks of bnb left beside OUT."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.bnb-"))


def assert_no_debris(out: Path) -> None:
    leftovers = debris(out)
    assert not leftovers, f"temporary folder or lock left beside OUT: {leftovers}"


def long_checkpoint(folder: Path, count: int = 40, size: int = 1024) -> None:
    """``count`` bf16 [size, size] projection weights in one file: a run with many tensors to interrupt."""
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    tensors = {
        f"model.layers.{i}.mlp.up_proj.weight": torch.randn(size, size, generator=g).to(torch.bfloat16)
        for i in range(count)
    }
    save_file(tensors, folder / "model.safetensors")


def interruptible_bnb(*args: str) -> subprocess.Popen[str]:
    """``bnb ARGS`` started as a terminal would start it, for a test to send it SIGINT or SIGTERM: pipes
    for its output, SIGINT's default disposition (a shell's background job, pytest under one included,
    inherits SIGINT ignored, and Python keeps an inherited SIG_IGN), and a session of its own, so that a
    signal can go to its whole process group, its children included, as a terminal's Ctrl-C does."""
    return subprocess.Popen(
        [*COMMAND, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=bnb_env(),
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def wait_for_handlers(proc: subprocess.Popen[str], timeout: float = HANG_SECONDS) -> None:
    """Until ``proc`` catches SIGTERM (the SigCgt mask in /proc): bnb's signal handlers are in place.
    Before that, Python itself is starting, and no program can answer a signal."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        with open(f"/proc/{proc.pid}/status") as f:
            caught = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
        if caught & (1 << (signal.SIGTERM - 1)):
            return
        time.sleep(0.005)
    raise AssertionError("bnb never installed its signal handlers")
