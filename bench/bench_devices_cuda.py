"""The GPU stage alone on 1 … N GPUs: what `--devices` gains when reading and writing are not the limit.

    python bench/bench_devices_cuda.py WORK_DIR [--layers 8] [--repeats 3]

End to end (bench_quantize_cuda.py), a second GPU buys nothing on the GPU machine: the GPU stage is a
few percent of the run, which reading, writing and start-up fill. This measures that stage on its own.
It generates (once) a Llama-8B-shaped bf16 checkpoint of LAYERS layers with bench_quantize_cuda's
generator, plans it as `bnb quantize` does (name rules, so no transformers import), reads every
quantized weight into pinned host memory, and then, for each scheme and each set of GPUs (0; 0,1; …),
pushes the weights through the pipeline's own converters: round-robin over the GPUs, results collected
one GPU-count behind, as the pipeline's writer does. Time runs from the first call to the last
finish() (host→device copy, kernels, round-trip error, device→host copy); the best of REPEATS runs after
an untimed one. The untimed run also hashes every entry: each set of GPUs must give the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections import deque
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_quantize_cuda import make_checkpoint

SCHEMES = {"nf4": {"method": "nf4"}, "nf4-dq": {"method": "nf4", "double_quant": True}, "int8": {"method": "int8"}}


class CopyOnly:
    """The transfer floor: only the host→device copy of each weight, on a copy stream, as the converter does."""

    def __init__(self, device) -> None:
        import torch

        self.device = device
        self.stream = torch.cuda.Stream(device)

    def __call__(self, job, tensor):
        import torch

        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            on_device = tensor.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)

        def finish() -> None:
            done.synchronize()
            kept.clear()  # the device copy is freed once the copy is done, as the converter's is

        kept = [on_device]
        return SimpleNamespace(entries={}, finish=finish)


def run_once(converters, work, hash_entries: bool) -> tuple[float, float, str]:
    """(seconds for every weight through ``converters``, seconds the calling thread spent inside the
    converter calls, the sha256 over all entries when asked)."""
    import torch

    digest = hashlib.sha256()
    in_flight: deque = deque()
    calling = 0.0

    def collect() -> None:
        converted = in_flight.popleft()
        converted.finish()
        if hash_entries:
            for key, value in converted.entries.items():
                digest.update(key.encode())
                digest.update(value.contiguous().view(torch.uint8).numpy().tobytes())

    for device in range(torch.cuda.device_count()):
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for i, (job, tensor) in enumerate(work):
        called = time.perf_counter()
        in_flight.append(converters[i % len(converters)](job, tensor))
        calling += time.perf_counter() - called
        if len(in_flight) > len(converters):
            collect()
    while in_flight:
        collect()
    return time.perf_counter() - started, calling, digest.hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    from bnbcli.checkpoint.source import open_checkpoint
    from bnbcli.checkpoint.tensor_reads import read_tensor
    from bnbcli.pipeline.convert import make_converters
    from bnbcli.plan.quantize_layout import plan_quantize
    from bnbcli.plan.scheme import QuantScheme

    gpus = torch.cuda.device_count()
    src = args.work / f"llama8b-shaped-{args.layers}L"
    make_checkpoint(src, args.layers)
    checkpoint = open_checkpoint(str(src))
    print(f"{torch.cuda.get_device_name(0)} ×{gpus}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    for name, settings in SCHEMES.items():
        scheme = QuantScheme(**settings)
        plan = plan_quantize(checkpoint, scheme, planner="name-rules")
        jobs = [job for component in plan.components for job in component.jobs if job.quantized]
        work = [(job, read_tensor(job.source, pin_memory=True)) for job in jobs]
        gigabytes = sum(t.numel() * t.element_size() for _, t in work) / 1e9
        baseline = None
        digests = set()
        for count in range(1, gpus + 1):
            devices = tuple(torch.device("cuda", i) for i in range(count))
            if name == "nf4":  # the transfer floor, once: the same for every scheme
                copiers = [CopyOnly(d) for d in devices]
                run_once(copiers, work, hash_entries=False)
                floor = min(run_once(copiers, work, hash_entries=False)[0] for _ in range(args.repeats))
                print(
                    f"copy    {count} GPU{'s' if count > 1 else ' '}: host→device alone "
                    f"{floor * 1e3:8.1f} ms = {gigabytes / floor:6.1f} GB/s"
                )
            converters = make_converters("cuda", devices, scheme, allow_nonfinite=False)
            _, _, digest = run_once(converters, work, hash_entries=True)
            digests.add(digest)
            best, calling, _ = min(run_once(converters, work, hash_entries=False) for _ in range(args.repeats))
            baseline = baseline or best
            print(
                f"{name:<7} {count} GPU{'s' if count > 1 else ' '}: {len(work)} weights, {gigabytes:.2f} GB in "
                f"{best * 1e3:8.1f} ms = {gigabytes / best:6.1f} GB/s, {baseline / best:4.2f}× one GPU, "
                f"{calling * 1e3:6.1f} ms in the converter calls; sha256 {digest[:12]}"
            )
        print(f"{name:<7} same bytes on every set of GPUs: {'yes' if len(digests) == 1 else 'NO'}")
        del work
    return 0


if __name__ == "__main__":
    sys.exit(main())
