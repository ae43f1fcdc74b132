"""Per-tensor statistics, computed in float64 chunks so that memory stays about one tensor.

Three passes over the tensor, chunk by chunk (``bnbcli.formats.metrics.CHUNK`` elements at a time): the first counts
NaN, Inf and zeros and sums the finite values for the mean and absmax; the second sums central moments
(2nd and 4th); the third counts values beyond ``SIGMAS`` standard deviations. Central moments from a second pass
avoid the cancellation of the one-pass formula (E[x⁴] − 4μE[x³] + …) when the mean is far from zero.
Non-finite values are counted and left out of every other statistic.

``tensor_stats_many`` takes many small tensors (MoE checkpoints have tens of thousands) in one numpy pass
per size: numpy sums each row of a C-contiguous table with the pairwise summation it gives that row alone
(``bnbcli.formats.metrics.roundtrip_sums_many`` relies on the same), so each figure is the one-by-one figure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from bnbcli.formats.metrics import CHUNK

SIGMAS = 6.0  # "beyond 6σ": LLM.int8's outlier threshold is 6.0 too, in activation units


@dataclass(frozen=True)
class TensorStats:
    numel: int
    absmax: float  # of the finite values; 0.0 when there are none
    mean: float
    std: float  # population standard deviation of the finite values
    kurtosis: float  # excess kurtosis (a normal distribution has 0); NaN when std is 0
    beyond_6sigma: float  # share of finite values with |x - mean| > 6 std
    zeros: int
    nan: int
    inf: int

    @property
    def nonfinite(self) -> int:
        return self.nan + self.inf

    def as_dict(self) -> dict[str, float | int | None]:
        # JSON has no NaN: an undefined statistic is null
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in vars(self).items()}


def _chunks(t: torch.Tensor):
    flat = t.reshape(-1)
    for start in range(0, flat.numel(), CHUNK):
        yield flat[start : start + CHUNK].to(torch.float64).numpy()


def tensor_stats(t: torch.Tensor) -> TensorStats:
    """Statistics of a floating (or integer) tensor on the CPU; the tensor is never copied whole."""
    t = t.detach().cpu()
    n = finite = zeros = nan = inf = 0
    total = 0.0
    absmax = 0.0
    for x in _chunks(t):
        n += x.size
        isnan = np.isnan(x)
        isinf = np.isinf(x)
        nan += int(isnan.sum())
        inf += int(isinf.sum())
        good = x[~(isnan | isinf)]
        finite += good.size
        zeros += int((good == 0).sum())
        if good.size:
            total += float(good.sum())
            absmax = max(absmax, float(np.abs(good).max()))
    mean = total / finite if finite else math.nan
    m2 = m4 = 0.0
    for x in _chunks(t):
        d = x[np.isfinite(x)] - mean
        sq = d * d
        m2 += float(sq.sum())
        m4 += float((sq * sq).sum())
    std, kurtosis = _spread(finite, m2, m4)
    beyond = 0
    if finite and std > 0:
        limit = SIGMAS * std
        for x in _chunks(t):
            beyond += int((np.abs(x[np.isfinite(x)] - mean) > limit).sum())
    return _stats(n, finite, absmax, mean, std, kurtosis, beyond, zeros, nan, inf)


def _spread(finite: int, m2: float, m4: float) -> tuple[float, float]:
    """(std, excess kurtosis) from the central moment sums of ``finite`` values."""
    var = m2 / finite if finite else math.nan
    std = math.sqrt(var) if finite else math.nan
    kurtosis = (m4 / finite) / (var * var) - 3.0 if finite and var > 0 else math.nan
    return std, kurtosis


def _stats(
    n: int, finite: int, absmax: float, mean: float, std: float, kurtosis: float, beyond: int, *counts: int
) -> TensorStats:
    zeros, nan, inf = counts
    share = beyond / finite if finite else math.nan
    return TensorStats(n, absmax, mean, std, kurtosis, share, zeros, nan, inf)


def tensor_stats_many(tensors: list[torch.Tensor]) -> list[TensorStats]:
    """``tensor_stats`` of each tensor, the same figures: those of one dtype and size (1 to ``CHUNK``
    elements, all finite) in one pass per statistic, the others one by one."""
    groups: dict[tuple[torch.dtype, int], list[int]] = {}
    found: list[TensorStats | None] = [None] * len(tensors)
    for i, t in enumerate(tensors):
        if 0 < t.numel() <= CHUNK and t.device.type == "cpu":
            groups.setdefault((t.dtype, t.numel()), []).append(i)
    for (_, n), indices in groups.items():
        table = torch.stack([tensors[i].reshape(-1) for i in indices]).to(torch.float64).numpy()
        clean = np.isfinite(table).all(axis=1)  # a row with NaN or Inf: one by one (it sums fewer values)
        rows = [i for i, ok in zip(indices, clean.tolist(), strict=True) if ok]
        for i, stats in zip(rows, _table_stats(table[clean] if not clean.all() else table, n), strict=True):
            found[i] = stats
    return [s if s is not None else tensor_stats(t) for s, t in zip(found, tensors, strict=True)]


def _table_stats(x: np.ndarray, n: int) -> list[TensorStats]:
    """The statistics of each row of ``x`` [rows, n], every value finite: ``tensor_stats``'s passes row-wise."""
    total = x.sum(axis=1)
    absmax = np.abs(x).max(axis=1)
    zeros = (x == 0).sum(axis=1)
    mean = total / n
    d = x - mean[:, None]
    sq = d * d
    m2, m4 = sq.sum(axis=1), (sq * sq).sum(axis=1)
    std = np.sqrt(m2 / n)  # math.sqrt's figure: both round the square root correctly
    beyond = np.where(std > 0, (np.abs(d) > (SIGMAS * std)[:, None]).sum(axis=1), 0)
    found = []
    for m, a, s2, s4, b, z in zip(*(v.tolist() for v in (mean, absmax, m2, m4, beyond, zeros)), strict=True):
        found.append(_stats(n, n, a, m, *_spread(n, s2, s4), b, z, 0, 0))
    return found
