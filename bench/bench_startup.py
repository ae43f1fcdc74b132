"""Where the start of `bnb quantize --backend cuda` goes on this machine, each case in a fresh interpreter.

    python bench/bench_startup.py SRC [--runs 2]      # SRC: a local checkpoint folder (for the hashing cases)
    python bench/bench_startup.py SRC --first-run [--runs 3]   # the CPU first run against the import floor

--first-run: taking turns, `python -c "import torch, safetensors"` and `bnb quantize SRC OUT --config
nf4-dq` (the CPU here) with an empty plan cache (BNB_CACHE_DIR a fresh folder each round), whole
processes; prints each wall time and the median ratio (issue 17's target: at most 2).

Prints one JSON line of seconds per case and run: importing torch; then CUDA's context, CuPy's import,
our kernels (from CuPy's cache once compiled), pinned host memory; the CUDA driver's context made on a
thread while torch imports (and what CUDA's initialisation costs afterwards); importing the `bnb`
command (no torch since 2026-12-06), then the quantize library (torch), with and without the early
source hashing of SRC running in its child process. BENCHMARKS.md has the figures.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

CASES = {
    "import torch": """
t = time.perf_counter(); import torch; r['import_torch'] = time.perf_counter() - t
""",
    "torch, CUDA context, CuPy, kernels, pinned memory": """
t = time.perf_counter(); import torch; r['import_torch'] = time.perf_counter() - t
t = time.perf_counter(); torch.cuda.init(); torch.empty(1, device='cuda'); torch.cuda.synchronize()
r['cuda_init'] = time.perf_counter() - t
t = time.perf_counter(); import cupy; r['import_cupy'] = time.perf_counter() - t
from bnbcli.backends.cuda_runtime import warm_up
t = time.perf_counter(); warm_up(0).join(); r['kernels_loaded'] = time.perf_counter() - t
t = time.perf_counter(); p = torch.empty(256 << 20, dtype=torch.uint8, pin_memory=True)
r['pinned_256MB'] = time.perf_counter() - t
""",
    "driver context on a thread while torch imports": """
import ctypes, threading
def context():
    t = time.perf_counter()
    cuda = ctypes.CDLL('libcuda.so.1')
    device, handle = ctypes.c_int(), ctypes.c_void_p()
    assert cuda.cuInit(0) == 0 and cuda.cuDeviceGet(ctypes.byref(device), 0) == 0
    assert cuda.cuDevicePrimaryCtxRetain(ctypes.byref(handle), device) == 0
    r['context_thread'] = time.perf_counter() - t
thread = threading.Thread(target=context); thread.start()
t = time.perf_counter(); import torch; r['import_torch'] = time.perf_counter() - t
thread.join()
t = time.perf_counter(); torch.cuda.init(); torch.empty(1, device='cuda'); torch.cuda.synchronize()
r['cuda_init'] = time.perf_counter() - t
""",
    "bnb command import alone (no torch)": """
t = time.perf_counter(); from bnbcli.cli.app import main; r['import_command'] = time.perf_counter() - t
""",
    "command, then the quantize library (torch)": """
t = time.perf_counter(); from bnbcli.cli.app import main; r['import_command'] = time.perf_counter() - t
t = time.perf_counter(); import bnbcli.pipeline.quantize; r['import_library'] = time.perf_counter() - t
""",
    "command, early hashing of SRC, then the library": """
t = time.perf_counter(); from bnbcli.cli.app import main; r['import_command'] = time.perf_counter() - t
from bnbcli.checkpoint.hashing import hash_sources_early
hash_sources_early(SRC)
t = time.perf_counter(); import bnbcli.pipeline.quantize; r['import_library'] = time.perf_counter() - t
""",
}


def _wall(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, capture_output=True)
    return time.perf_counter() - started


def first_run(src: str, runs: int) -> None:
    floor_command = [sys.executable, "-c", "import torch, safetensors"]
    ratios = []
    for round_ in range(runs):
        work = tempfile.mkdtemp(prefix="bnb-first-")
        env = dict(os.environ, BNB_CACHE_DIR=os.path.join(work, "cache"))
        try:
            floor = _wall(floor_command, env)
            out = os.path.join(work, "out")
            run = _wall([sys.executable, "-m", "bnbcli", "quantize", src, out, "--config", "nf4-dq", "-q"], env)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        ratios.append(run / floor)
        print(
            f"round {round_ + 1}: import torch, safetensors {floor:.2f} s; bnb quantize {run:.2f} s; {run / floor:.2f}x"
        )
    print(f"median ratio {statistics.median(ratios):.2f}x over {runs} rounds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="a local checkpoint folder")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--first-run", action="store_true", help="the CPU first run against the import floor")
    args = parser.parse_args()
    if args.first_run:
        first_run(args.src, args.runs)
        return
    for name, body in CASES.items():
        for _ in range(args.runs):
            code = (
                f"import json, time\nr = {{}}\nSRC = {args.src!r}\n{body}\n"
                "print(json.dumps({k: round(v, 3) for k, v in r.items()}))"
            )
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            lines = done.stdout.strip().splitlines() or done.stderr.strip().splitlines()[-1:] or ["(no output)"]
            print(f"{name:<55} {lines[-1]}", flush=True)


if __name__ == "__main__":
    main()
