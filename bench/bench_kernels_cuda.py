"""Time bnbcli's CUDA kernels against bitsandbytes' CUDA kernels on one GPU, format by format.

    PYTHONPATH=.:<bitsandbytes> python bench/bench_kernels_cuda.py [--rows 8192 --cols 8192] [--json]

One seeded 8192x8192 bf16 tensor (fp16 for int8, which bitsandbytes only takes in fp16). For each
operation both sides run on GPU-resident tensors: warm-up calls first, then ``--samples`` samples, each
timing ``--batch`` back-to-back calls between two CUDA events (so launch gaps count when the host is
slower than the GPU); the table gives the median time per call, the bytes that must move (each input
read once, each output written once) over that time, its fraction of the device-to-device copy
bandwidth measured here (a 1 GiB copy_, bytes read + written), bitsandbytes' time, the speed-up
(bitsandbytes / ours) and whether every output tensor is byte-identical to bitsandbytes'. With double
quantization both sides leave the offset on the device (bitsandbytes' QuantState holds a device tensor;
ours is `quantize_4bit_queued`, what `bnb quantize` calls): nothing waits for the GPU. (Until
2026-12-06 both sides also copied it to the host, 1.4-1.6 us of device time each.)
A second table gives the device time per call from the profiler (every kernel and copy of one call,
host overhead excluded), the same fraction of copy bandwidth and the ratio on that basis.

Experiments: ``--breakdown`` prints each operation's device time kernel by kernel (ours and
bitsandbytes'); ``--grid-waves N`` launches the shared-table 8-bit encoder with N waves of CTAs instead
of the default; ``--nested-encoder Dyn8`` runs double quantization's second level with the
shared-table encoder instead of Dyn8L1; ``--hints`` builds the kernels with each set of PTX cache
qualifiers in HINTS (bnb_common.cuh's BNB_LD_HINT / BNB_ST_HINT), takes turns between them for
``--rounds`` rounds and prints each operation's median device time per build, checking every output
against the shipped build's bytes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
from collections.abc import Callable

import torch

from bnbcli.backends import cuda, cuda_launches, cuda_runtime

try:
    import bitsandbytes
    import bitsandbytes.functional as F
except Exception as exc:  # not installed, or its import fails on this machine
    bitsandbytes = F = None
    BNB_MISSING = f"{type(exc).__name__}: {exc}"


def time_call(fn: Callable[[], object], samples: int, batch: int, warmup: int = 3) -> float:
    """Median seconds per call over ``samples`` event-timed batches of ``batch`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(samples):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(batch):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / batch)
    return statistics.median(times)


def device_events(fn: Callable[[], object], calls: int = 10) -> dict[str, float]:
    """Microseconds of device work per call, by kernel or copy name, as the profiler (CUPTI) records them."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    per_name: dict[str, float] = {}
    for e in prof.events():
        if str(e.device_type).endswith("CUDA"):
            per_name[e.name] = per_name.get(e.name, 0.0) + e.time_range.elapsed_us() / calls
    return per_name


def device_time(fn: Callable[[], object], calls: int = 10) -> float:
    """Seconds of device work per call: every kernel and copy the profiler records."""
    return sum(device_events(fn, calls).values()) / 1e6


def print_breakdown(label: str, fn: Callable[[], object]) -> None:
    events = device_events(fn, 20)
    print(f"{label}: {sum(events.values()):.1f} µs of device time per call")
    for name, us in sorted(events.items(), key=lambda item: -item[1]):
        print(f"    {us:8.2f} µs  {name[:110]}")


def copy_bandwidth(samples: int) -> float:
    """Device-to-device copy, bytes read + written per second."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    seconds = time_call(lambda: dst.copy_(src), samples, 5)
    return 2 * src.numel() / seconds


def raw(tensors: list[torch.Tensor]) -> list[bytes]:
    return [t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes() for t in tensors]


def operations(x: torch.Tensor, x16: torch.Tensor) -> list[tuple[str, int, Callable, Callable | None]]:
    """(name, bytes that must move, ours, theirs); each callable returns the tensors to compare."""
    n = x.numel()
    nb = n // 64
    packed_bytes = n // 2

    def ours_4bit(quant_type: str, dq: bool) -> Callable:
        def run() -> list:
            q, offset = cuda.quantize_4bit_queued(x, quant_type, 64, dq)
            extra = [q.nested_absmax, offset, q.nested_quant_map] if dq else []
            return [q.packed, q.absmax, *extra]

        return run

    def theirs_4bit(quant_type: str, dq: bool) -> Callable:
        def run() -> list:
            packed, s = F.quantize_4bit(x, blocksize=64, quant_type=quant_type, compress_statistics=dq)
            extra = [s.state2.absmax, s.offset, s.state2.code] if dq else []
            return [packed, s.absmax, *extra]

        return run

    def ours_blockwise8() -> list:
        q = cuda.quantize_blockwise8(x, 4096)
        return [q.q, q.absmax]

    def theirs_blockwise8() -> list:
        out, s = F.quantize_blockwise(x, blocksize=4096)
        return [out, s.absmax]

    def ours_int8() -> list:
        q = cuda.quantize_int8_rowwise(x16)
        return [q.CB, q.SCB]

    def theirs_int8() -> list:
        cb, scb, _ = F.int8_vectorwise_quant(x16)
        return [cb, scb]

    q4 = cuda.quantize_4bit(x, "nf4", 64, False)
    q4dq = cuda.quantize_4bit(x, "nf4", 64, True)
    if F is not None:
        their_packed, their_state = F.quantize_4bit(x, blocksize=64, quant_type="nf4")
        their_packed_dq, their_state_dq = F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)

    def theirs_dequant(dq: bool) -> Callable:
        def run() -> list:
            if dq:
                return [F.dequantize_4bit(their_packed_dq, their_state_dq)]
            return [F.dequantize_4bit(their_packed, their_state)]

        return run

    quant4 = 2 * n + packed_bytes + 4 * nb
    quant4_dq = 2 * n + packed_bytes + nb + 4 * (nb // 256)
    have = F is not None
    return [
        ("nf4 quantize", quant4, ours_4bit("nf4", False), theirs_4bit("nf4", False) if have else None),
        ("nf4+dq quantize", quant4_dq, ours_4bit("nf4", True), theirs_4bit("nf4", True) if have else None),
        ("fp4 quantize", quant4, ours_4bit("fp4", False), theirs_4bit("fp4", False) if have else None),
        ("blockwise8 (4096)", 3 * n + 4 * (n // 4096), ours_blockwise8, theirs_blockwise8 if have else None),
        ("int8 row-wise (fp16)", 3 * n + 4 * x16.shape[0], ours_int8, theirs_int8 if have else None),
        (
            "nf4 dequantize",
            packed_bytes + 4 * nb + 2 * n,
            lambda: [cuda.dequantize_4bit(q4)],
            theirs_dequant(False) if have else None,
        ),
        (
            "nf4+dq dequantize",
            packed_bytes + nb + 4 * (nb // 256) + 2 * n,
            lambda: [cuda.dequantize_4bit(q4dq)],
            theirs_dequant(True) if have else None,
        ),
    ]


# Builds compared by --hints: name -> extra NVRTC options ("shipped": bnb_common.cuh's defaults, loads
# without a hint and stores with ".cs").
HINTS = {
    "shipped": (),
    "st plain": ('-DBNB_ST_HINT=""',),
    "ld .L2::256B": ('-DBNB_LD_HINT=".L2::256B"',),
    "ld .L1::no_allocate": ('-DBNB_LD_HINT=".L1::no_allocate"',),
}


def use_build(defines: tuple[str, ...], base: tuple[str, ...]) -> None:
    """Compile the kernels again with ``defines`` added (the next launch compiles; CuPy caches builds)."""
    cuda_runtime.OPTIONS = (*base, *defines)
    cuda_runtime._modules.clear()
    cuda_runtime._functions.clear()
    cuda_runtime.resident_ctas.cache_clear()


def compare_hints(x: torch.Tensor, x16: torch.Tensor, rounds: int) -> None:
    base = cuda_runtime.OPTIONS
    times: dict[str, dict[str, list[float]]] = {}
    reference: dict[str, list[bytes]] = {}
    same: dict[str, bool] = {}
    for _ in range(rounds):
        for build, defines in HINTS.items():
            use_build(defines, base)
            for name, _, ours, _ in operations(x, x16):
                out = raw(ours())
                reference.setdefault(name, out)
                same[build] = same.get(build, True) and out == reference[name]
                times.setdefault(name, {}).setdefault(build, []).append(device_time(ours, 20))
    use_build((), base)
    print(f"{torch.cuda.get_device_name()}: device µs per call, median of {rounds} rounds taking turns")
    print(f"{'operation':<22}" + "".join(f"{b[:22]:>24}" for b in HINTS))
    for name, per_build in times.items():
        print(f"{name:<22}" + "".join(f"{statistics.median(per_build[b]) * 1e6:>24.1f}" for b in HINTS))
    print(f"{'same bytes as shipped':<22}" + "".join(f"{'yes' if same[b] else 'NO':>24}" for b in HINTS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--cols", type=int, default=8192)
    parser.add_argument("--samples", type=int, default=25)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--breakdown", action="store_true", help="device time kernel by kernel, per operation")
    parser.add_argument("--grid-waves", type=int, help="waves of CTAs for the shared-table 8-bit encoder")
    parser.add_argument("--nested-encoder", choices=("Dyn8", "Dyn8L1"), help="double quant's second-level encoder")
    parser.add_argument("--hints", action="store_true", help="compare builds with PTX cache qualifiers (HINTS)")
    parser.add_argument("--rounds", type=int, default=5, help="with --hints: rounds of taking turns")
    args = parser.parse_args()
    if args.grid_waves is not None:
        cuda_launches.GRID_WAVES["Dyn8"] = args.grid_waves
    if args.nested_encoder is not None:
        cuda.NESTED_ENCODER = args.nested_encoder

    torch.manual_seed(0)
    x = torch.randn(args.rows, args.cols, device="cuda", dtype=torch.bfloat16)
    x16 = x.to(torch.float16)
    if args.hints:
        compare_hints(x, x16, args.rounds)
        return
    copy = copy_bandwidth(args.samples)
    rows = []
    for name, nbytes, ours, theirs in operations(x, x16):
        if args.breakdown:
            print_breakdown(f"ours, {name}", ours)
            if theirs is not None:
                print_breakdown(f"bitsandbytes, {name}", theirs)
        t_ours = time_call(ours, args.samples, args.batch)
        row = {"op": name, "bytes": nbytes, "ours_s": t_ours, "ours_GBps": nbytes / t_ours / 1e9}
        row["fraction_of_copy"] = nbytes / t_ours / copy
        row["ours_device_s"] = device_time(ours)
        if theirs is not None:
            t_theirs = time_call(theirs, args.samples, args.batch)
            row.update(bnb_s=t_theirs, speedup=t_theirs / t_ours, identical=raw(ours()) == raw(theirs()))
            row.update(bnb_device_s=device_time(theirs))
        rows.append(row)

    device = torch.cuda.get_device_name()
    report = {
        "schema_version": 1,
        "device": device,
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "shape": [args.rows, args.cols],
        "copy_GBps": copy / 1e9,
        "bitsandbytes": None if bitsandbytes is None else bitsandbytes.__version__,
        "rows": rows,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{device}, {report['date']}, torch {torch.__version__}, bitsandbytes {report['bitsandbytes']}")
    print(f"{args.rows}x{args.cols} bf16 (int8: fp16); device-to-device copy {copy / 1e9:.0f} GB/s (read + write)")
    if F is None:
        print(f"bitsandbytes not importable: {BNB_MISSING}")
    print(
        f"{'operation':<22} {'ours µs':>9} {'GB/s':>7} {'of copy':>8} {'bnb µs':>9} {'speed-up':>9} {'identical':>10}"
    )
    for r in rows:
        theirs = (
            f"{r['bnb_s'] * 1e6:>9.1f} {r['speedup']:>8.2f}x {'yes' if r['identical'] else 'NO':>10}"
            if "bnb_s" in r
            else f"{'-':>9} {'-':>9} {'-':>10}"
        )
        ours = f"{r['ours_s'] * 1e6:>9.1f} {r['ours_GBps']:>7.0f} {r['fraction_of_copy']:>7.0%}"
        print(f"{r['op']:<22} {ours} {theirs}")
    print("device time per call (profiler; host overhead excluded)")
    print(f"{'operation':<22} {'ours µs':>9} {'of copy':>8} {'bnb µs':>9} {'speed-up':>9}")
    for r in rows:
        fraction = r["bytes"] / r["ours_device_s"] / copy
        theirs = (
            f"{r['bnb_device_s'] * 1e6:>9.1f} {r['bnb_device_s'] / r['ours_device_s']:>8.2f}x" if "bnb_s" in r else ""
        )
        print(f"{r['op']:<22} {r['ours_device_s'] * 1e6:>9.1f} {fraction:>7.0%} {theirs}")


if __name__ == "__main__":
    main()
