"""The fixed cost per tensor: `bnb quantize`, `bnb inspect` and `bnb footprint` on checkpoints of many tiny
tensors (MoE checkpoints have tens of thousands).

    python bench/bench_many_tensors.py [--counts 1000,50000,200000] [--verbs quantize,inspect,footprint]
                                       [--workdir DIR] [--timeout 600]

Each checkpoint is one safetensors file of N/2 tiny Linear weights (16×16 bf16) and N/2 biases, named like
an MoE's experts, with no config.json (the name rules plan it, no library is imported). Each command runs
in its own process; the cost per tensor is the extra time over the smallest checkpoint, divided by the extra
tensors, so the interpreter's start-up is not counted. Prints one table; `--json` prints one document.
Besides the wall time, each command's CPU seconds (user + system, its own and its children's) give a cost per
tensor too: on a shared machine the wall time grows with the load, the CPU time much less.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

SIDE = 16
COMMANDS = {
    "quantize": ["quantize", "{src}", "{out}", "--scheme", "nf4", "-q"],
    "inspect": ["inspect", "{src}", "-q", "--json"],
    "footprint": ["footprint", "{src}", "--json"],
}


def checkpoint(folder: Path, count: int) -> Path:
    """count tensors: weights and biases of tiny experts, in one file."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(count)
    tensors = {}
    for i in range(count // 2):
        layer, expert = divmod(i, 64)
        prefix = f"model.layers.{layer}.mlp.experts.{expert}.up_proj"
        tensors[f"{prefix}.weight"] = torch.randn(SIDE, SIDE, generator=g).to(torch.bfloat16)
        tensors[f"{prefix}.bias"] = torch.zeros(SIDE, dtype=torch.bfloat16)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(command: str, src: Path, out: Path, timeout: float) -> tuple[float, float] | None:
    """(wall seconds, CPU seconds) of one command, or None if it ran out of time."""
    args = [a.format(src=src, out=out) for a in COMMANDS[command]]
    shutil.rmtree(out, ignore_errors=True)
    cpu = _children_cpu()
    started = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "bnbcli", *args], capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return None
    seconds = time.perf_counter() - started
    if done.returncode not in (0, 1):
        raise SystemExit(f"bnb {' '.join(args)} failed ({done.returncode}): {done.stderr[-2000:]}")
    return seconds, _children_cpu() - cpu


def per_tensor(total: float | None, first: float | None, extra: int) -> float | None:
    """Milliseconds per tensor over the smallest checkpoint."""
    return None if total is None or first is None else (total - first) / extra * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="1000,50000,200000")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--verbs", default=",".join(COMMANDS), help="comma-separated: quantize, inspect, footprint")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    counts = sorted(int(c) for c in args.counts.split(","))
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bnb-many-"))
    env_note = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    results: dict[str, dict[int, tuple[float, float] | None]] = {}
    try:
        sources = {n: checkpoint(work / f"src-{n}", n) for n in counts}
        for command in args.verbs.split(","):
            results[command] = {n: timed(command, sources[n], work / "out", args.timeout) for n in counts}
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
                    "seconds": None if total is None else total[0],
                    "cpu_seconds": None if total is None else total[1],
                    "ms_per_tensor": per_tensor(total and total[0], first and first[0], n - base),
                    "cpu_ms_per_tensor": per_tensor(total and total[1], first and first[1], n - base),
                }
            )
    if args.json:
        print(json.dumps({"schema_version": 1, "machine": env_note, "base": base, "results": results, "rows": rows}))
        return 0
    print(f"fixed cost per tensor ({env_note}); smallest checkpoint {base} tensors:")
    for command, seconds in results.items():
        cells = ", ".join(
            f"{n}: {'timeout' if s is None else f'{s[0]:.1f} s ({s[1]:.1f} s CPU)'}" for n, s in seconds.items()
        )
        print(f"  bnb {command:9} {cells}")
    for row in rows:
        per, cpu = (("n/a" if row[k] is None else f"{row[k]:.3f} ms") for k in ("ms_per_tensor", "cpu_ms_per_tensor"))
        print(f"  {row['command']:9} {row['tensors']:>7} tensors: {per} per tensor ({cpu} of CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
