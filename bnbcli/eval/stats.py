"""The statistics `llama-perplexity --kl-divergence` prints, computed the same way, from per-token values.

Per scored token t (the model predicts token t+1 from tokens ≤ t) the comparison keeps:
``nll_q`` and ``nll_base`` (−log p of the real next token under QUANT and ORIG), ``kld`` (KL(ORIG ‖ QUANT)
over the vocabulary, in nats), ``dp`` (p_QUANT − p_ORIG of the real next token) and whether both models
rank the same token first. From those:

- a mean and its uncertainty: the standard error sqrt((E[x²] − E[x]²) / (n − 1)), 0 for n ≤ 10;
- PPL = exp(mean nll), ± PPL × the mean's uncertainty; the ratio PPL(Q)/PPL(base) = exp(mean nll_q −
  mean nll_base), whose uncertainty counts the covariance of the two means (they share the tokens);
- percentiles by linear interpolation between the sorted values (fraction × (n − 1));
- RMS Δp = sqrt(mean Δp²), ± its uncertainty through d sqrt(x) = dx / (2 sqrt(x));
- same top-1: a share k/n, ± sqrt(p (1 − p) / (n − 1)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

PERCENTILES = (("max", 1.0), ("99.9%", 0.999), ("99%", 0.99), ("95%", 0.95), ("90%", 0.9), ("median", 0.5))
PERCENTILES_LOW = (("10%", 0.1), ("5%", 0.05), ("1%", 0.01), ("0.1%", 0.001), ("min", 0.0))


@dataclass(frozen=True)
class Estimate:
    value: float
    uncertainty: float

    def as_dict(self) -> dict[str, float | None]:
        return {"value": _finite(self.value), "uncertainty": _finite(self.uncertainty)}


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def mean_and_uncertainty(x: np.ndarray) -> Estimate:
    n = x.size
    if n == 0:
        return Estimate(math.nan, math.nan)
    mean = float(x.mean())
    var = float((x * x).mean()) - mean * mean
    return Estimate(mean, math.sqrt(var / (n - 1)) if var > 0 and n > 10 else 0.0)


def covariance_of_means(a: np.ndarray, b: np.ndarray) -> float:
    n = a.size
    if n < 10:
        return 0.0
    return (float((a * b).mean()) - float(a.mean()) * float(b.mean())) / (n - 1)


def percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """Linear interpolation at ``fraction × (n − 1)`` of values sorted ascending."""
    n = sorted_values.size
    if n == 0:
        return math.nan
    position = min(max(fraction, 0.0), 1.0) * (n - 1)
    low = int(position)
    high = min(low + 1, n - 1)
    weight = position - low
    return float((1 - weight) * sorted_values[low] + weight * sorted_values[high])


def distribution(values: np.ndarray, points: tuple[tuple[str, float], ...]) -> dict[str, float | None]:
    ordered = np.sort(values)
    return {name: _finite(percentile(ordered, fraction)) for name, fraction in points}


@dataclass(frozen=True)
class PerplexityStats:
    ppl_q: Estimate
    ppl_base: Estimate
    ln_ratio: Estimate  # mean ln(PPL(Q)/PPL(base))
    ratio: Estimate  # PPL(Q)/PPL(base)
    difference: Estimate  # PPL(Q) − PPL(base)
    correlation: float  # of the two mean log-perplexities

    def as_dict(self) -> dict[str, object]:
        return {
            "ppl_q": self.ppl_q.as_dict(),
            "ppl_base": self.ppl_base.as_dict(),
            "ln_ratio": self.ln_ratio.as_dict(),
            "ratio": self.ratio.as_dict(),
            "difference": self.difference.as_dict(),
            "correlation": _finite(self.correlation),
        }


def perplexity_stats(nll_q: np.ndarray, nll_base: np.ndarray) -> PerplexityStats:
    log_q, log_base = mean_and_uncertainty(nll_q), mean_and_uncertainty(nll_base)
    ppl_q = math.exp(log_q.value)
    ppl_base = math.exp(log_base.value)
    cov = covariance_of_means(nll_q, nll_base)
    spread = log_q.uncertainty * log_base.uncertainty
    ln_ratio = log_q.value - log_base.value
    ln_unc = math.sqrt(max(log_q.uncertainty**2 + log_base.uncertainty**2 - 2 * cov, 0.0))
    ppl_q_unc, ppl_base_unc = ppl_q * log_q.uncertainty, ppl_base * log_base.uncertainty
    diff_var = ppl_q_unc**2 + ppl_base_unc**2 - 2 * ppl_q * ppl_base * cov
    return PerplexityStats(
        ppl_q=Estimate(ppl_q, ppl_q_unc),
        ppl_base=Estimate(ppl_base, ppl_base_unc),
        ln_ratio=Estimate(ln_ratio, ln_unc),
        ratio=Estimate(math.exp(ln_ratio), math.exp(ln_ratio) * ln_unc),
        difference=Estimate(ppl_q - ppl_base, math.sqrt(max(diff_var, 0.0))),
        correlation=cov / spread if spread > 0 else math.nan,
    )


def rms_and_uncertainty(x: np.ndarray) -> Estimate:
    mean_square = mean_and_uncertainty(x * x)
    rms = math.sqrt(mean_square.value) if mean_square.value >= 0 else math.nan
    return Estimate(rms, 0.5 / rms * mean_square.uncertainty if rms > 0 else 0.0)


def share_and_uncertainty(hits: np.ndarray) -> Estimate:
    n = hits.size
    if n == 0:
        return Estimate(math.nan, math.nan)
    p = float(hits.mean())
    return Estimate(p, math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else 0.0)
