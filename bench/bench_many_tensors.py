"""The fixed cost per tensor: `bnb quantize`, `bnb inspect` and `bnb footprint` on checkpoints of many tiny
tensors (MoE checkpoints have tens of thousands).

    python bench/bench_many_tensors.py [--counts 1000,50000,200000] [--verbs quantize,inspect,footprint]
                                       [--workdir DIR] [--timeout 600] [--max-shard-size SIZE]

Each checkpoint is one safetensors file of N/2 tiny Linear weights (16×16 bf16) and N/2 biases, named like
an MoE's experts, with no config.json (the name rules plan it, no library is imported). Each command runs
in its own process; the cost per tensor is the extra time over the smallest checkpoint, divided by the extra
tensors, so the interpreter's start-up is not counted. Prints one table; `--json` prints one document.
Besides the wall time, each command's CPU seconds (user + system, its own and its children's) give a cost per
tensor too: on a shared machine the wall time grows with the load, the CPU time much less. Each command's peak
RSS is printed beside its times; `--max-shard-size 100KB` makes quantize write hundreds of shards.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from importlib.metadata import version
from pathlib import Path
from typing import NamedTuple

SIDE = 16
COMMANDS = {
    "quantize": ["quantize", "{src}", "{out}", "--scheme", "nf4", "-q"],
    "inspect": ["inspect", "{src}", "-q", "--json"],
    "footprint": ["footprint", "{src}", "--json"],
}


def checkpoint(folder: Path, count: int) -> Path:
    """count tensors: weights and biases of tiny experts, in one file. Made in a process of its own, and
    torch imported only there: a child's peak RSS as the kernel reports it includes what it was forked
    from, so this process stays small."""
    subprocess.run([sys.executable, __file__, "--make", str(folder), str(count)], check=True)
    return folder


def _make(folder: Path, count: int) -> None:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(count)
    tensors = {}
    for i in range(count // 2):
        layer, expert = divmod(i, 64)
        prefix = f"model.layers.{layer}.mlp.experts.{expert}.up_proj"
        tensors[f"{prefix}.weight"] = torch.randn(SIDE, SIDE, generator=g).to(torch.bfloat16)
        tensors[f"{prefix}.bias"] = torch.zeros(SIDE, dtype=torch.bfloat16)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


class Run(NamedTuple):
    seconds: float
    cpu_seconds: float  # user + system, the command's own and its children's
    peak_rss_mib: float


def timed(args: list[str], timeout: float) -> Run | None:
    """One bnb command in its own process, or None if it ran out of time."""
    with tempfile.TemporaryFile() as stderr:
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "bnbcli", *args], stdout=subprocess.DEVNULL, stderr=stderr)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS and CPU time
        seconds = time.perf_counter() - started
        timed_out = not timer.is_alive()
        timer.cancel()
        code = os.waitstatus_to_exitcode(status)
        if timed_out:
            return None
        if code not in (0, 1):
            stderr.seek(0)
            raise SystemExit(f"bnb {' '.join(args)} failed ({code}): {stderr.read()[-2000:].decode(errors='replace')}")
    return Run(seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024)


def per_tensor(total: float | None, first: float | None, extra: int) -> float | None:
    """Milliseconds per tensor over the smallest checkpoint."""
    return None if total is None or first is None else (total - first) / extra * 1000


def _cell(run: Run | None) -> str:
    if run is None:
        return "timeout"
    return f"{run.seconds:.1f} s ({run.cpu_seconds:.1f} s CPU, {run.peak_rss_mib:.0f} MiB)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="1000,50000,200000")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--verbs", default=",".join(COMMANDS), help="comma-separated: quantize, inspect, footprint")
    parser.add_argument("--max-shard-size", help="quantize's output shards, e.g. 100KB: many shards")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    counts = sorted(int(c) for c in args.counts.split(","))
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bnb-many-"))
    env_note = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {version('torch')}"
    results: dict[str, dict[int, Run | None]] = {}
    try:
        sources = {n: checkpoint(work / f"src-{n}", n) for n in counts}
        for command in args.verbs.split(","):
            for n in counts:
                out = work / "out"
                shutil.rmtree(out, ignore_errors=True)
                argv = [a.format(src=sources[n], out=out) for a in COMMANDS[command]]
                if command == "quantize" and args.max_shard_size:
                    argv += ["--max-shard-size", args.max_shard_size]
                results.setdefault(command, {})[n] = timed(argv, args.timeout)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    base = counts[0]
    rows = []
    for command, seconds in results.items():
        for n in counts[1:]:
            total, first = seconds[n], seconds[base]
            rows.append(
                {
                    "command": command,
                    "tensors": n,
                    "seconds": None if total is None else total.seconds,
                    "cpu_seconds": None if total is None else total.cpu_seconds,
                    "peak_rss_mib": None if total is None else total.peak_rss_mib,
                    "ms_per_tensor": per_tensor(total and total.seconds, first and first.seconds, n - base),
                    "cpu_ms_per_tensor": per_tensor(total and total.cpu_seconds, first and first.cpu_seconds, n - base),
                }
            )
    if args.json:
        runs = {c: {n: r and r._asdict() for n, r in by_count.items()} for c, by_count in results.items()}
        print(json.dumps({"schema_version": 2, "machine": env_note, "base": base, "results": runs, "rows": rows}))
        return 0
    print(f"fixed cost per tensor ({env_note}); smallest checkpoint {base} tensors:")
    for command, seconds in results.items():
        cells = ", ".join(f"{n}: {_cell(r)}" for n, r in seconds.items())
        print(f"  bnb {command:9} {cells}")
    for row in rows:
        per, cpu = (("n/a" if row[k] is None else f"{row[k]:.3f} ms") for k in ("ms_per_tensor", "cpu_ms_per_tensor"))
        print(f"  {row['command']:9} {row['tensors']:>7} tensors: {per} per tensor ({cpu} of CPU)")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--make"]:
        sys.exit(_make(Path(sys.argv[2]), int(sys.argv[3])))
    sys.exit(main())
