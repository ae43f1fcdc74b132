"""Check bnbcli.formats.cuda_mean.cuda_mean_f32 against torch.mean on a real GPU.

Run from the repository root on a machine with a CUDA GPU:

    PYTHONPATH=. python bench/device_check_cuda_mean.py

For a few hundred lengths (1..64, powers of two and their neighbours, launch
configuration boundaries, odd sizes up to ~20 million) and several value
distributions it compares the float32 bits of ``torch.mean(x)`` computed on
``cuda`` with the numpy emulation, prints ``cuda_mean: M/T match`` and the
first mismatches, and exits 1 on any mismatch.  If the environment variable
OUT names a directory, the mismatches are written to
``$OUT/cuda_mean_mismatches.json`` (and a few small mismatching inputs to
``$OUT/cuda_mean_mismatch_inputs.npz``).
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import torch

from bnbcli.formats.cuda_mean import cuda_mean_f32, reduce_config

DISTS = ("absmax", "normal", "uniform", "wide", "cancel", "lognormal")


def make_lengths(rng: np.random.Generator) -> list[int]:
    lengths: set[int] = set(range(1, 65))
    for p in range(6, 25):
        lengths.update((2**p - 1, 2**p, 2**p + 1))
    # Launch-configuration boundaries of setReduceConfig for 1-D float32:
    # 128 (float4 loads), 2048 (512 threads), 131072 (split over CTAs),
    # 8448*512 (ctas_per_output saturates at 132 SMs * 4 blocks), 2**24 (float
    # factor no longer exact), multiples of 1024.
    for b in (
        127,
        128,
        129,
        130,
        131,
        2047,
        2048,
        2049,
        2050,
        2051,
        8191,
        8193,
        131071,
        131072,
        131073,
        131075,
        135168,
        135169,
        264191,
        264192,
        4325375,
        4325376,
        4325377,
        4325379,
        16777215,
        16777217,
        16777219,
        16777221,
        20_000_000,
        19_999_999,
        20_971_520,
    ):
        lengths.add(b)
    lengths.update(1024 * int(k) for k in rng.integers(1, 16384, size=24))
    lengths.update(int(v) for v in np.exp(rng.uniform(np.log(65), np.log(2e7), size=130)))
    lengths.update(int(v) | 1 for v in np.exp(rng.uniform(np.log(65), np.log(2e5), size=40)))
    return sorted(lengths)


def make_values(rng: np.random.Generator, n: int, dist: str) -> np.ndarray:
    if dist == "absmax":  # bitsandbytes-like first-level absmax: positive, ~2-4
        x = np.abs(rng.standard_normal((n, 4))).max(axis=1) * 0.9 + 0.1
    elif dist == "normal":
        x = rng.standard_normal(n)
    elif dist == "uniform":
        x = rng.random(n)
    elif dist == "wide":  # many binades: summation order matters a lot
        x = rng.standard_normal(n) * np.exp2(rng.integers(-24, 24, size=n))
    elif dist == "cancel":  # large values cancelling, small ones surviving
        x = np.where(rng.random(n) < 0.5, 1e4, -1e4) + rng.standard_normal(n)
    elif dist == "lognormal":
        x = rng.lognormal(0.0, 3.0, size=n)
    else:
        raise ValueError(dist)
    return x.astype(np.float32)


def bits(v) -> str:
    return f"0x{int(np.float32(v).view(np.uint32)):08x}"


def main() -> int:
    t0 = time.time()
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(0)
    sm = props.multi_processor_count
    mtps = getattr(props, "max_threads_per_multi_processor", 2048)
    print(f"torch {torch.__version__} on {props.name}: {sm} SMs, {mtps} threads/SM", flush=True)
    rng = np.random.default_rng(20261123)
    lengths = make_lengths(rng)
    cases = []
    for i, n in enumerate(lengths):
        dists = [DISTS[i % len(DISTS)]]
        if n <= 2_000_000:  # small/medium lengths: two distributions each
            dists.append(DISTS[(i + 3) % len(DISTS)])
        for d in dists:
            cases.append((n, d))
    total = matched = 0
    mismatches = []
    bad_inputs = {}
    emu_time = 0.0
    for n, d in cases:
        x = make_values(rng, n, d)
        xt = torch.from_numpy(x).to(dev)
        theirs = np.float32(torch.mean(xt).item())
        del xt
        te = time.perf_counter()
        ours = cuda_mean_f32(x, sm_count=sm, max_threads_per_sm=mtps)
        emu_time += time.perf_counter() - te
        total += 1
        same = np.float32(ours).view(np.uint32) == theirs.view(np.uint32)
        if same:
            matched += 1
        else:
            cfg = reduce_config(n, sm, mtps)
            mismatches.append(
                {
                    "n": n,
                    "dist": d,
                    "ours": bits(ours),
                    "theirs": bits(theirs),
                    "ours_f": float(ours),
                    "theirs_f": float(theirs),
                    "config": cfg,
                }
            )
            if n <= 1_000_000 and len(bad_inputs) < 6:
                bad_inputs[f"n{n}_{d}"] = x
    print(
        f"cuda_mean: {matched}/{total} match "
        f"({len(lengths)} lengths, emulation {emu_time:.1f} s, total {time.time() - t0:.1f} s)"
    )
    for m in mismatches[:20]:
        print(
            f"  MISMATCH n={m['n']} dist={m['dist']} ours={m['ours']} ({m['ours_f']!r}) "
            f"theirs={m['theirs']} ({m['theirs_f']!r}) config={m['config']}"
        )
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "cuda_mean_mismatches.json"), "w") as f:
            json.dump(
                {
                    "torch": torch.__version__,
                    "device": props.name,
                    "sm_count": sm,
                    "matched": matched,
                    "total": total,
                    "mismatching_lengths": sorted({m["n"] for m in mismatches}),
                    "mismatches": mismatches,
                },
                f,
                indent=1,
            )
        if bad_inputs:
            np.savez(os.path.join(out, "cuda_mean_mismatch_inputs.npz"), **bad_inputs)
    return 0 if matched == total else 1


if __name__ == "__main__":
    sys.exit(main())
