"""Time bnbcli's CPU quantization against bitsandbytes' own CPU path, format by format, quiet or busy.

    python bench/bench_cpu_formats.py [--repeats 5] [--warmup 2] [--rounds 1] [--busy] [--baseline DIR]
                                      [--threads N] [--json]

One seeded 4096x4096 bf16 tensor. For each format the sides take turns, each in a fresh process of its
own (so neither side's OpenMP runtime or threads meet the other's), which times ``repeats`` calls after
``warmup``; with ``--rounds N`` the turns repeat N times and a side's figure is the median of all its
calls. The table gives the medians, the speed-up (theirs / ours), whether our timed (fast) path gave
the bytes of our whole-tensor reference (the specification that tests/conformance/test_conformance.py holds to
bitsandbytes' CUDA bytes on every golden case), and whether bitsandbytes' CPU output equals ours.
bitsandbytes' CPU path is not its CUDA path, so its bytes often differ from ours (which are the CUDA
kernels' bytes). int8: bitsandbytes gets x.to(float16), as transformers' Int8Params gives it, and that
cast is inside its timing; ours takes the bf16 tensor and casts inside. If bitsandbytes is not
importable, only ours is timed.

--busy        run the comparison twice: quiet, then with a CPU burner process on every core (started
              and stopped here), as on a shared CI runner.
--baseline D  also time the bnbcli package in folder D (e.g. ``git archive OLD bnbcli | tar -x -C D``)
              as "before", in the same turns: a before/after from one run.
--threads N   torch threads in every process, both sides (default: torch's, one per core); with 1, ours
              runs its parts one after the other, which shows what a second thread is worth to each side.

The machine's load average is printed before and after: on a shared machine, read the figures with it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the parent never imports torch: only the timed children do
    import torch

SHAPE = (4096, 4096)
SEED = 0
FORMATS = ("nf4", "nf4 + double quant", "fp4", "int8 row-wise", "blockwise8 (4096)")


# ------------------------------------------------------------------------------------------------------
# One side, one format, in a process of its own (``--child SIDE FORMAT``)


def side_function(side: str, name: str, x: torch.Tensor) -> Callable[[], list[torch.Tensor]]:
    """A call that quantizes ``x`` as ``name`` and returns the tensors that a checkpoint stores."""
    import torch

    if side == "bnb":
        import bitsandbytes.functional as F

        def theirs_4bit(quant_type: str, dq: bool) -> Callable:
            def run() -> list:
                packed, s = F.quantize_4bit(x, blocksize=64, quant_type=quant_type, compress_statistics=dq)
                return [packed, s.absmax] + ([s.state2.absmax, s.offset.reshape(())] if dq else [])

            return run

        def theirs_int8() -> list:
            cb, scb, _ = F.int8_vectorwise_quant(x.to(torch.float16))
            return [cb, scb]

        def theirs_bw8() -> list:
            q, s = F.quantize_blockwise(x, blocksize=4096)
            return [q, s.absmax]

        return {
            "nf4": theirs_4bit("nf4", False),
            "nf4 + double quant": theirs_4bit("nf4", True),
            "fp4": theirs_4bit("fp4", False),
            "int8 row-wise": theirs_int8,
            "blockwise8 (4096)": theirs_bw8,
        }[name]

    import bnbcli

    def ours_4bit(quant_type: str, dq: bool) -> Callable:
        def run() -> list:
            q = bnbcli.quantize_4bit(x, quant_type, 64, dq)
            return [q.packed, q.absmax] + ([q.nested_absmax, torch.tensor(q.nested_offset)] if dq else [])

        return run

    def ours_int8() -> list:
        q = bnbcli.quantize_int8_rowwise(x)
        return [q.CB, q.SCB]

    def ours_bw8() -> list:
        q = bnbcli.quantize_blockwise8(x, 4096)
        return [q.q, q.absmax]

    return {
        "nf4": ours_4bit("nf4", False),
        "nf4 + double quant": ours_4bit("nf4", True),
        "fp4": ours_4bit("fp4", False),
        "int8 row-wise": ours_int8,
        "blockwise8 (4096)": ours_bw8,
    }[name]


def reference_bytes(name: str, x: torch.Tensor) -> list[torch.Tensor]:
    """The codes and scales of the whole-tensor reference (the specification that the golden CUDA
    vectors test), to show that the fast path timed here gives the same bytes on this tensor."""
    from bnbcli.formats import blockwise8, fourbit, int8
    from bnbcli.formats.blocks import reference_quantize_blocks

    if name.startswith(("nf4", "fp4")):
        codes, absmax = reference_quantize_blocks(x, 64, fourbit.code_table(name[:3]).encoder, pack=True)
        return [codes] if "double" in name else [codes, absmax]  # double quant: its absmax is quantized again
    if name.startswith("int8"):
        cb = int8.reference_quantize_int8_rowwise(x)
        return [cb.CB, cb.SCB]
    return list(reference_quantize_blocks(x, 4096, blockwise8.code_table().encoder))


def raw(tensors: list[torch.Tensor]) -> bytes:
    import torch

    return b"".join(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for t in tensors)


def child(side: str, name: str, repeats: int, warmup: int, threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(SEED)
    x = torch.randn(SHAPE, dtype=torch.float32).to(torch.bfloat16)
    try:
        fn = side_function(side, name, x)
    except ImportError as exc:
        print(json.dumps({"missing": f"{type(exc).__name__}: {exc}"}))
        return
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    out = fn()
    report = {"ms": statistics.median(times), "all_ms": times, "sha256": hashlib.sha256(raw(out)).hexdigest()}
    if side != "bnb":
        import bnbcli

        expected = reference_bytes(name, x)
        report["equals_reference"] = raw(out[: len(expected)]) == raw(expected)
        report["module"] = str(Path(bnbcli.__file__).parent)
        report["torch_threads"] = torch.get_num_threads()
        report["torch"] = torch.__version__
    else:
        import bitsandbytes

        report["bitsandbytes"] = bitsandbytes.__version__
    print(json.dumps(report))


# ------------------------------------------------------------------------------------------------------
# The parent: turns, burners, tables


def run_side(side: str, name: str, args: argparse.Namespace, pythonpath: str | None = None) -> dict:
    command = [sys.executable, __file__, "--child", side, name, "--repeats", str(args.repeats)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([*command, "--warmup", str(args.warmup)], capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"missing": f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"}
    return json.loads(lines[-1])


def pooled(runs: list[dict]) -> dict:
    """One side's processes over the rounds as one: the median of all their calls."""
    if any("missing" in run for run in runs):
        return next(run for run in runs if "missing" in run)
    every = [ms for run in runs for ms in run["all_ms"]]
    return runs[-1] | {"ms": statistics.median(every), "all_ms": every, "round_ms": [run["ms"] for run in runs]}


def burners() -> list[subprocess.Popen]:
    """A process spinning on every core."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]


def compare(args: argparse.Namespace, busy: bool) -> list[dict]:
    spinning = burners() if busy else []
    try:
        time.sleep(0.5 if busy else 0.0)  # the burners running before the first timing
        rows = []
        for name in FORMATS:
            sides: dict[str, list[dict]] = {}
            for _ in range(args.rounds):
                sides.setdefault("ours", []).append(run_side("ours", name, args))
                sides.setdefault("bnb", []).append(run_side("bnb", name, args))
                if args.baseline:
                    sides.setdefault("before", []).append(run_side("ours", name, args, pythonpath=args.baseline))
            rows.append({"format": name} | {side: pooled(runs) for side, runs in sides.items()})
        return rows
    finally:
        for process in spinning:
            process.kill()
        for process in spinning:
            process.wait()


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    avx512 = sorted(f for f in flags if f.startswith("avx512"))
    return f"{model}, {os.cpu_count()} cores, {'AVX512 (' + ' '.join(avx512) + ')' if avx512 else 'no AVX512'}"


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def print_table(title: str, rows: list[dict], baseline: bool) -> None:
    print(title)
    before = f" {'before ms':>10} {'before/ours':>11}" if baseline else ""
    print(
        f"  {'format':<20} {'ours ms':>9} {'bnb ms':>9} {'speed-up':>9}{before}  {'ours = reference':>16}  bnb = ours"
    )
    for r in rows:
        ours, bnb = r["ours"], r["bnb"]
        if "missing" in ours:
            print(f"  {r['format']:<20} ours failed: {ours['missing']}")
            continue
        have_bnb = "missing" not in bnb
        speedup = f"{bnb['ms'] / ours['ms']:8.2f}x" if have_bnb else f"{'-':>9}"
        extra = ""
        if baseline:
            old = r["before"]
            extra = (
                f" {old['ms']:10.1f} {old['ms'] / ours['ms']:10.2f}x"
                if "missing" not in old
                else f" {'-':>10} {'-':>11}"
            )
        same = ("yes" if bnb["sha256"] == ours["sha256"] else "no") if have_bnb else "-"
        print(
            f"  {r['format']:<20} {ours['ms']:9.1f} {bnb['ms'] if have_bnb else float('nan'):9.1f} {speedup}{extra}  "
            f"{'yes' if ours['equals_reference'] else 'NO':>16}  {same}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per side and format (the median)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1, help="turns of every side per format (a fresh process each)")
    parser.add_argument("--busy", action="store_true", help="also run with a CPU burner on every core")
    parser.add_argument("--baseline", type=str, default=None, help="a folder holding an older bnbcli package")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in every process (default: torch's)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of the tables")
    parser.add_argument("--child", nargs=2, metavar=("SIDE", "FORMAT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.repeats, args.warmup, args.threads)
        return
    if args.baseline and not (Path(args.baseline) / "bnbcli" / "__init__.py").is_file():
        parser.error(f"--baseline {args.baseline}: no bnbcli package in that folder")

    info: dict = {"shape": list(SHAPE), "dtype": "bfloat16", "cpu": cpu_model(), "repeats": args.repeats}
    info["rounds"] = args.rounds
    info["load_before"] = loadavg()
    runs = {"quiet": compare(args, busy=False)}
    if args.busy:
        runs["busy"] = compare(args, busy=True)
    info["load_after"] = loadavg()
    info["runs"] = runs
    first = runs["quiet"][0]["ours"]
    if args.json:
        print(json.dumps(info, indent=2))
        return
    bnb = runs["quiet"][0]["bnb"].get("bitsandbytes", "NOT importable")
    print(
        f"4096x4096 bf16, torch {first.get('torch')}, {first.get('torch_threads')} torch threads, bitsandbytes {bnb}; "
        f"each side in its own process ({args.rounds} per side and format, taking turns), "
        f"median of {args.repeats * args.rounds} calls after {args.warmup} warm-up calls each"
    )
    print(f"{info['cpu']}; load average before {info['load_before']}, after {info['load_after']}")
    if args.baseline:
        print(f"before = the bnbcli in {runs['quiet'][0]['before'].get('module', args.baseline)}")
    for load, rows in runs.items():
        label = "quiet" if load == "quiet" else f"busy: a CPU burner process on each of the {os.cpu_count()} cores"
        print_table(label, rows, bool(args.baseline))


if __name__ == "__main__":
    main()
