"""Time bnbcli's CPU quantization against bitsandbytes' own CPU path, format by format.

    python bench/bench_cpu_formats.py [--repeats 15] [--warmup 3] [--json]

One seeded 4096x4096 bf16 tensor; for each format both sides quantize it, warm-up runs first, then
``repeats`` rounds that time ours and theirs back to back (so machine noise hits both alike); the
table gives the medians, the speed-up (theirs / ours), whether our timed (fast) path gave the bytes of
our whole-tensor reference (the specification that tests/test_conformance.py holds to bitsandbytes'
CUDA bytes on every golden case), and whether bitsandbytes' CPU output equals ours. bitsandbytes' CPU
path is not its CUDA path, so its bytes often differ from ours (which are the CUDA kernels' bytes).
int8: bitsandbytes gets x.to(float16), as transformers' Int8Params gives it, and that cast is inside
its timing; ours takes the bf16 tensor and casts inside. If bitsandbytes is not
importable, only ours is timed.
"""

from __future__ import annotations

import os

# Both sides run OpenMP regions, from two copies of libgomp (torch's and the system one bitsandbytes
# links). After a region each copy's idle threads busy-wait for the next one, by default long enough
# to halve the other library's speed on a 2-core machine. A short spin keeps the two out of each
# other's way (measured: ours 26 ms alone, 55 ms right after bitsandbytes, 28 ms with this setting;
# bitsandbytes 74 ms either way). It must be set before torch loads libgomp.
os.environ.setdefault("GOMP_SPINCOUNT", "1000")

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch

import bnbcli

try:
    import bitsandbytes
    import bitsandbytes.functional as F
except Exception as exc:  # not installed, or its import fails on this machine
    bitsandbytes = None
    BNB_MISSING = f"{type(exc).__name__}: {exc}"

SHAPE = (4096, 4096)
SEED = 0


def ours_and_theirs(x: torch.Tensor) -> dict[str, tuple[Callable, Callable | None]]:
    """format -> (ours, theirs); each returns the tensors that a checkpoint stores, in one order."""

    def ours_4bit(quant_type: str, dq: bool) -> Callable:
        def run() -> list:
            q = bnbcli.quantize_4bit(x, quant_type, 64, dq)
            return [q.packed, q.absmax] + ([q.nested_absmax, torch.tensor(q.nested_offset)] if dq else [])

        return run

    def theirs_4bit(quant_type: str, dq: bool) -> Callable:
        def run() -> list:
            packed, s = F.quantize_4bit(x, blocksize=64, quant_type=quant_type, compress_statistics=dq)
            return [packed, s.absmax] + ([s.state2.absmax, s.offset.reshape(())] if dq else [])

        return run

    def ours_int8() -> list:
        q = bnbcli.quantize_int8_rowwise(x)
        return [q.CB, q.SCB]

    def theirs_int8() -> list:
        cb, scb, _ = F.int8_vectorwise_quant(x.to(torch.float16))
        return [cb, scb]

    def ours_bw8() -> list:
        q = bnbcli.quantize_blockwise8(x, 4096)
        return [q.q, q.absmax]

    def theirs_bw8() -> list:
        q, s = F.quantize_blockwise(x, blocksize=4096)
        return [q, s.absmax]

    have = bitsandbytes is not None
    return {
        "nf4": (ours_4bit("nf4", False), theirs_4bit("nf4", False) if have else None),
        "nf4 + double quant": (ours_4bit("nf4", True), theirs_4bit("nf4", True) if have else None),
        "fp4": (ours_4bit("fp4", False), theirs_4bit("fp4", False) if have else None),
        "int8 row-wise": (ours_int8, theirs_int8 if have else None),
        "blockwise8 (4096)": (ours_bw8, theirs_bw8 if have else None),
    }


def reference_bytes(x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """format -> the codes and scales of the whole-tensor reference (the specification that the golden
    CUDA vectors test), to show that the fast path timed here gives the same bytes on this tensor."""
    from bnbcli.formats import blockwise8, fourbit, int8
    from bnbcli.formats.blocks import reference_quantize_blocks

    def four(quant_type: str) -> list[torch.Tensor]:
        return list(reference_quantize_blocks(x, 64, fourbit.code_table(quant_type).encoder, pack=True))

    cb = int8.reference_quantize_int8_rowwise(x)
    return {
        "nf4": four("nf4"),
        "nf4 + double quant": four("nf4")[:1],  # the packed codes; its absmax is itself quantized
        "fp4": four("fp4"),
        "int8 row-wise": [cb.CB, cb.SCB],
        "blockwise8 (4096)": list(reference_quantize_blocks(x, 4096, blockwise8.code_table().encoder)),
    }


def identical(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    def raw(t: torch.Tensor) -> bytes:
        return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()

    return len(a) == len(b) and all(x.dtype == y.dtype and raw(x) == raw(y) for x, y in zip(a, b, strict=True))


def yes(flag: bool) -> str:
    return "yes" if flag else "NO"


def timed(fn: Callable) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    args = parser.parse_args()

    torch.manual_seed(SEED)
    x = torch.randn(SHAPE, dtype=torch.float32).to(torch.bfloat16)
    rows = []
    spec = reference_bytes(x)
    for name, (ours, theirs) in ours_and_theirs(x).items():
        for _ in range(args.warmup):
            ours()
            if theirs:
                theirs()
        ours_ms, theirs_ms = [], []
        for _ in range(args.repeats):
            ours_ms.append(timed(ours))
            if theirs:
                theirs_ms.append(timed(theirs))
        row = {"format": name, "ours_ms": statistics.median(ours_ms)}
        expected = spec[name]
        row["equals_reference"] = identical(ours()[: len(expected)], expected)
        if theirs:
            row["bnb_ms"] = statistics.median(theirs_ms)
            row["speedup"] = row["bnb_ms"] / row["ours_ms"]
            row["byte_identical"] = identical(ours(), theirs())
        rows.append(row)

    info = {
        "shape": list(SHAPE),
        "dtype": "bfloat16",
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gomp_spincount": os.environ["GOMP_SPINCOUNT"],
        "bitsandbytes": bitsandbytes.__version__ if bitsandbytes else None,
        "machine": platform.machine(),
        "repeats": args.repeats,
        "results": rows,
    }
    if bitsandbytes is None:
        info["bitsandbytes_missing"] = BNB_MISSING
    if args.json:
        print(json.dumps(info, indent=2))
        return

    bnb = f"bitsandbytes {info['bitsandbytes']}" if bitsandbytes else "bitsandbytes NOT importable"
    print(
        f"4096x4096 bf16, torch {torch.__version__}, {info['torch_threads']} torch threads, {bnb}; "
        f"median of {args.repeats}"
    )
    if bitsandbytes is None:
        print(f"  ({BNB_MISSING}): timing ours only")
    print(f"{'format':<20} {'ours ms':>9} {'bnb ms':>9} {'speed-up':>9}  {'ours = reference':>16}  bnb = ours")
    for r in rows:
        if "bnb_ms" in r:
            same = "yes" if r["byte_identical"] else "no"
            print(
                f"{r['format']:<20} {r['ours_ms']:9.1f} {r['bnb_ms']:9.1f} {r['speedup']:8.2f}x  "
                f"{yes(r['equals_reference']):>16}  {same}"
            )
        else:
            print(f"{r['format']:<20} {r['ours_ms']:9.1f} {'-':>9} {'-':>9}  {yes(r['equals_reference']):>16}  -")


if __name__ == "__main__":
    main()
