"""Round-trip error of a quantized tensor against the values it was made from."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from bnbcli.formats import parts


@dataclass(frozen=True, slots=True)
class RoundTripError:
    rmse: float
    max_abs: float
    rel_fro: float  # ||x - y||_F / ||x||_F
    sqnr_db: float  # 10 log10(||x||^2 / ||x - y||^2); inf when exact

    def as_dict(self) -> dict[str, float | None]:
        # JSON has no inf/NaN: an exact round trip reports sqnr_db as null.
        # the fields by name, not asdict: its deep copy cost more than the rest of a tiny weight's manifest record
        values = {k: getattr(self, k) for k in self.__slots__}
        return {k: (v if math.isfinite(v) else None) for k, v in values.items()}


# A quantized weight's restored values as float32, a range of elements at a time: ``restore(start, stop, out)``
# writes elements [start, stop) into ``out`` (the CPU sums ask for blocks; a dequantized copy of the whole weight
# is never made). ``start`` is a multiple of SUM_BLOCK.
Restore = Callable[[int, int, torch.Tensor], None]

CHUNK = 1 << 22  # elements per float64 pass: bounded extra memory whatever the tensor size
SUM_BLOCK = 1 << 18  # elements per block of the CPU sums (fastest of 2**14 ... 2**20 on a 2816x1024 weight);
# every weight formats.batch joins is one block


def roundtrip_sums(original: torch.Tensor, restored: torch.Tensor | Restore) -> torch.Tensor:
    """float64 [signal, noise, max_abs] on the tensors' device, chunk by chunk, without waiting for it:
    on a GPU the sums stay queued with the kernels until the writer needs them.

    On the CPU the sums are numpy's pairwise sums of fixed blocks, added in block order: torch's dot
    splits a reduction by thread count, so the manifest's errors would change in the last digits with
    the number of cores. ``restored`` may also be a ``Restore`` of CPU values: the same figures, without a
    dequantized copy of the weight.
    (A GPU sums in its own order: the errors of the two backends may differ in the last digits; the
    quantized bytes never do.)"""
    flat_x = original.reshape(-1)
    if callable(restored):
        return _cpu_sums(flat_x, restored)
    if original.device.type == "cpu":
        return _cpu_sums(flat_x, restored.reshape(-1))
    return _device_sums(flat_x, restored.reshape(-1))


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


def _cpu_sums(flat_x: torch.Tensor, flat_y: torch.Tensor | Restore) -> torch.Tensor:
    """Each block of SUM_BLOCK elements summed on its own in float32 (numpy's pairwise sums, in buffers that
    stay in the cache), the blocks split between the CPU threads (``parts``), then the blocks' figures added
    in float64 in block order: the same figures whatever the thread count. float32 holds every source
    value and (bar a rounding, relative 6e-8) their differences; within a block the pairwise sum's error is
    under 1e-6 relative, and a block whose float32 squares overflow is summed again in float64."""
    n = flat_x.numel()
    blocks = max(1, -(-n // SUM_BLOCK))
    table = np.zeros((blocks, 3), dtype=np.float64)

    def work(start: int, stop: int) -> None:
        size = min(SUM_BLOCK, stop - start)
        # float32 buffers reused for every block of the part: a fresh array per block cost more (page
        # faults) than the arithmetic
        x, y, diff, scratch = (torch.empty(size, dtype=torch.float32) for _ in range(4))
        for begin in range(start, stop, SUM_BLOCK):
            m = min(SUM_BLOCK, stop - begin)
            block_x = flat_x[begin : begin + m]
            wide = block_x if block_x.dtype == torch.float32 else x[:m].copy_(block_x)
            if callable(flat_y):
                flat_y(begin, begin + m, y[:m])  # the same float32 values as widening the dequantized weight
                torch.sub(wide, y[:m], out=diff[:m])
            else:
                torch.sub(wide, flat_y[begin : begin + m], out=diff[:m])
            rows = (1, m)  # one row: the figures a joined call gives this block (roundtrip_sums_many)
            table[begin // SUM_BLOCK] = _block_sums(
                wide.numpy().reshape(rows), diff[:m].numpy().reshape(rows), scratch[:m].numpy().reshape(rows)
            )[0]

    if blocks == 1:
        work(0, n)  # no threads for one block (a small weight)
    else:
        parts.for_each_part(work, n, SUM_BLOCK)
    return torch.tensor([table[:, 0].sum(), table[:, 1].sum(), table[:, 2].max()], dtype=torch.float64)


def _block_sums(x: np.ndarray, diff: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """float64 [rows, 3]: [sum x², sum diff², max |diff|] of each row of float32 [rows, n] tables (a NaN
    propagates); a row whose float32 squares overflow (|x| over 1.8e19) is summed again in float64."""
    table = np.stack(
        (
            np.square(x, out=scratch).sum(axis=-1),
            np.square(diff, out=scratch).sum(axis=-1),
            np.abs(diff, out=scratch).max(axis=-1),
        ),
        axis=-1,
    ).astype(np.float64)
    for row in np.flatnonzero(np.isinf(table[:, :2]).any(axis=-1)):
        table[row, 0] = np.square(x[row], dtype=np.float64).sum()
        table[row, 1] = np.square(diff[row], dtype=np.float64).sum()
    return table


def roundtrip_sums_many(originals: list[torch.Tensor], restored: list[torch.Tensor]) -> list[torch.Tensor]:
    """``roundtrip_sums`` of each pair of CPU tensors of one block (``SUM_BLOCK`` elements) at most, the pairs
    of one size in one pass: numpy sums each row of a C-contiguous table with the pairwise summation it gives that
    row alone, so every figure is the one-by-one figure (``tests/unit/test_batch.py``)."""
    by_size: dict[int, list[int]] = {}
    for i, x in enumerate(originals):
        assert x.numel() <= SUM_BLOCK and x.device.type == "cpu"
        by_size.setdefault(x.numel(), []).append(i)
    sums: list[torch.Tensor] = [torch.zeros(3, dtype=torch.float64)] * len(originals)
    for n, indices in by_size.items():
        if n == 0:
            continue
        xs = torch.stack([originals[i].reshape(-1) for i in indices]).to(torch.float32)
        diff = xs - torch.stack([restored[i].reshape(-1) for i in indices]).to(torch.float32)
        table = _block_sums(xs.numpy(), diff.numpy(), np.empty(diff.shape, dtype=np.float32))
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
