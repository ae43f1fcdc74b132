"""Per-tensor statistics, computed in float64 chunks so that memory stays about one tensor.

Three passes over the tensor, chunk by chunk (``bnbcli.formats.metrics.CHUNK`` elements at a time): the first counts
NaN, Inf and zeros and sums the finite values for the mean and absmax; the second sums central moments
(2nd and 4th); the third counts values beyond ``SIGMAS`` standard deviations. Central moments from a second pass
avoid the cancellation of the one-pass formula (E[x⁴] − 4μE[x³] + …) when the mean is far from zero.
Non-finite values are counted and left out of every other statistic.
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
    var = m2 / finite if finite else math.nan
    std = math.sqrt(var) if finite else math.nan
    kurtosis = (m4 / finite) / (var * var) - 3.0 if finite and var > 0 else math.nan
    beyond = 0
    if finite and std > 0:
        limit = SIGMAS * std
        for x in _chunks(t):
            beyond += int((np.abs(x[np.isfinite(x)] - mean) > limit).sum())
    return TensorStats(
        numel=n,
        absmax=absmax,
        mean=mean,
        std=std,
        kurtosis=kurtosis,
        beyond_6sigma=beyond / finite if finite else math.nan,
        zeros=zeros,
        nan=nan,
        inf=inf,
    )
