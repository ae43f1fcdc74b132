"""Round-trip error of a quantized tensor against the values it was made from."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class RoundTripError:
    rmse: float
    max_abs: float
    rel_fro: float  # ||x - y||_F / ||x||_F
    sqnr_db: float  # 10 log10(||x||^2 / ||x - y||^2); inf when exact

    def as_dict(self) -> dict[str, float | None]:
        # JSON has no inf/NaN: an exact round trip reports sqnr_db as null.
        # vars, not asdict: its deep copy cost more than the rest of a tiny weight's manifest record
        return {k: (v if math.isfinite(v) else None) for k, v in vars(self).items()}


CHUNK = 1 << 22  # elements per float64 pass: bounded extra memory whatever the tensor size


def roundtrip_sums(original: torch.Tensor, restored: torch.Tensor) -> torch.Tensor:
    """float64 [signal, noise, max_abs] on the tensors' device, chunk by chunk, without waiting for it:
    on a GPU the sums stay queued with the kernels until the writer needs them.

    On the CPU the sums are numpy's pairwise sums, single-threaded: torch's dot splits a reduction by
    thread count, so the manifest's errors would change in the last digits with the number of cores.
    (A GPU sums in its own order: the errors of the two backends may differ in the last digits; the
    quantized bytes never do.)"""
    flat_x, flat_y = original.reshape(-1), restored.reshape(-1)
    if original.device.type == "cpu":
        return _cpu_sums(flat_x, flat_y)
    return _device_sums(flat_x, flat_y)


def _device_sums(flat_x: torch.Tensor, flat_y: torch.Tensor) -> torch.Tensor:
    """Each chunk's three figures into a row of one table, then the table reduced: five kernel launches
    a chunk (the thread that queues a GPU's work spends ~10 µs on each; this runs once per weight)."""
    starts = range(0, flat_x.numel(), CHUNK)
    parts = torch.zeros((max(len(starts), 1), 3), dtype=torch.float64, device=flat_x.device)
    for row, start in enumerate(starts):
        x = flat_x[start : start + CHUNK].to(torch.float64)
        diff = x - flat_y[start : start + CHUNK]  # promoted to float64 in the subtraction, exactly
        torch.dot(x, x, out=parts[row, 0])
        torch.dot(diff, diff, out=parts[row, 1])
        torch.linalg.vector_norm(diff, ord=math.inf, out=parts[row, 2])  # max |diff|; NaN propagates
    return torch.stack((parts[:, 0].sum(), parts[:, 1].sum(), parts[:, 2].max()))


def _cpu_sums(flat_x: torch.Tensor, flat_y: torch.Tensor) -> torch.Tensor:
    signal = noise = max_abs = 0.0
    size = min(CHUNK, flat_x.numel())
    # three float64 buffers for every chunk, written in place: a fresh array per step cost more
    # (page faults) than the arithmetic
    x, diff, work = (torch.empty(size, dtype=torch.float64) for _ in range(3))
    for start in range(0, flat_x.numel(), CHUNK):
        n = min(CHUNK, flat_x.numel() - start)
        x[:n].copy_(flat_x[start : start + n])
        diff[:n].copy_(flat_y[start : start + n])
        xs, ds, ws = x[:n].numpy(), diff[:n].numpy(), work[:n].numpy()
        np.subtract(xs, ds, out=ds)
        signal += float(np.square(xs, out=ws).sum())
        noise += float(np.square(ds, out=ws).sum())
        if n:
            largest = float(np.abs(ds, out=ws).max())
            max_abs = largest if math.isnan(largest) or largest > max_abs else max_abs  # NaN sticks
    return torch.tensor([signal, noise, max_abs], dtype=torch.float64)


def roundtrip_sums_many(originals: list[torch.Tensor], restored: list[torch.Tensor]) -> list[torch.Tensor]:
    """``roundtrip_sums`` of each pair of CPU tensors under ``CHUNK`` elements, the pairs of one size in
    one pass: numpy sums each row of a C-contiguous table with the pairwise summation it gives that
    row alone, so every figure is the one-by-one figure (``tests/unit/test_batch.py``)."""
    by_size: dict[int, list[int]] = {}
    for i, x in enumerate(originals):
        assert x.numel() <= CHUNK and x.device.type == "cpu"
        by_size.setdefault(x.numel(), []).append(i)
    sums: list[torch.Tensor] = [torch.zeros(3, dtype=torch.float64)] * len(originals)
    for n, indices in by_size.items():
        if n == 0:
            continue
        xs = torch.stack([originals[i].reshape(-1) for i in indices]).to(torch.float64).numpy()
        diff = xs - torch.stack([restored[i].reshape(-1) for i in indices]).to(torch.float64).numpy()
        # max |diff| is never below the one-by-one start of 0.0, and NaN propagates as it sticks there
        table = np.stack((np.square(xs).sum(axis=1), np.square(diff).sum(axis=1), np.abs(diff).max(axis=1)), axis=1)
        for i, row in zip(indices, torch.from_numpy(table), strict=True):
            sums[i] = row
    return sums


def error_from_sums(sums: torch.Tensor, numel: int) -> RoundTripError:
    signal, noise, max_abs = (float(v) for v in sums.tolist())
    n = max(numel, 1)
    return RoundTripError(
        rmse=math.sqrt(noise / n),
        max_abs=max_abs,
        rel_fro=math.sqrt(noise / signal) if signal > 0 else (0.0 if noise == 0 else math.inf),
        sqnr_db=10 * math.log10(signal / noise) if noise > 0 and signal > 0 else math.inf,
    )


def roundtrip_error(original: torch.Tensor, restored: torch.Tensor) -> RoundTripError:
    """Errors accumulated in float64, so large tensors neither lose the small differences being
    measured nor need a float64 copy of the whole tensor."""
    return error_from_sums(roundtrip_sums(original, restored), original.numel())
