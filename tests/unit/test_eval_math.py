"""`bnb eval`'s arithmetic against independent computations: KL divergence over the full vocabulary
(torch.nn.functional.kl_div), the top-k approximation within its stated bound, and llama-perplexity's
statistics (means, uncertainties, percentiles) recomputed here with numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bnbcli.eval.compare import keep_reference, score
from bnbcli.eval.stats import (
    mean_and_uncertainty,
    percentile,
    perplexity_stats,
    rms_and_uncertainty,
    share_and_uncertainty,
)

VOCAB, TOKENS = 300, 64


def _logits(seed: int, spread: float) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    orig = torch.randn(TOKENS, VOCAB, generator=g) * spread
    quant = orig + 0.3 * torch.randn(TOKENS, VOCAB, generator=g)
    return torch.log_softmax(orig, dim=-1), torch.log_softmax(quant, dim=-1)


def _exact_kld(logp: torch.Tensor, logq: torch.Tensor) -> np.ndarray:
    kl = torch.nn.functional.kl_div(logq.double(), logp.double(), log_target=True, reduction="none")
    return kl.sum(dim=-1).numpy()


@pytest.mark.parametrize("spread", [1.0, 4.0])
def test_full_vocabulary_kld_equals_kl_div(spread: float) -> None:
    logp, logq = _logits(0, spread)
    targets = torch.randint(0, VOCAB, (TOKENS,), generator=torch.Generator().manual_seed(1))
    scores = score(keep_reference(logp, targets, None), logq)
    np.testing.assert_allclose(scores.kld, _exact_kld(logp, logq), rtol=1e-5, atol=1e-7)
    assert not scores.kld_bound.any()
    np.testing.assert_allclose(scores.nll_q, -logq[torch.arange(TOKENS), targets].double().numpy(), rtol=1e-6)
    np.testing.assert_allclose(scores.nll_base, -logp[torch.arange(TOKENS), targets].double().numpy(), rtol=1e-6)
    dp = logq[torch.arange(TOKENS), targets].double().exp() - logp[torch.arange(TOKENS), targets].double().exp()
    np.testing.assert_allclose(scores.dp, dp.numpy(), rtol=1e-5, atol=1e-9)
    assert (scores.same_top1 == (logp.argmax(-1) == logq.argmax(-1)).numpy()).all()


def test_identical_distributions_give_exactly_zero() -> None:
    logp, _ = _logits(2, 3.0)
    targets = torch.zeros(TOKENS, dtype=torch.long)
    for k in (None, 10):
        scores = score(keep_reference(logp, targets, k), logp.clone())
        assert (scores.kld == 0).all() if k is None else np.abs(scores.kld).max() < 1e-6
        assert scores.same_top1.all() and (scores.dp == 0).all()


@pytest.mark.parametrize("spread", [0.5, 2.0, 6.0])
@pytest.mark.parametrize("k", [1, 5, 40, VOCAB - 1, VOCAB])
def test_top_k_kld_is_a_lower_bound_within_the_stated_bound(k: int, spread: float) -> None:
    logp, logq = _logits(3, spread)
    targets = torch.randint(0, VOCAB, (TOKENS,), generator=torch.Generator().manual_seed(4))
    exact = _exact_kld(logp, logq)
    approx = score(keep_reference(logp, targets, k), logq)
    error = exact - approx.kld
    slack = 1e-5 * np.maximum(1.0, np.abs(exact))  # float32 log-probabilities
    assert (error >= -slack).all(), f"top-{k} overstates KLD by {-error.min():.3g}"
    assert (error <= approx.kld_bound + slack).all(), f"top-{k}: error {error.max():.3g} beyond the bound"
    if k == VOCAB:
        assert (approx.kld_bound == 0).all()
        np.testing.assert_allclose(approx.kld, exact, rtol=1e-5, atol=1e-7)
    exact_full = score(keep_reference(logp, targets, None), logq)
    for field in ("nll_q", "nll_base", "dp", "same_top1"):  # kept exactly whatever k
        np.testing.assert_array_equal(getattr(approx, field), getattr(exact_full, field))


def test_the_bound_is_tight_enough_to_shrink_with_the_tail() -> None:
    logp, logq = _logits(5, 3.0)
    targets = torch.zeros(TOKENS, dtype=torch.long)
    bounds = [score(keep_reference(logp, targets, k), logq).kld_bound.mean() for k in (5, 50, 200)]
    assert bounds[0] > bounds[1] > bounds[2] > 0


def test_statistics_equal_numpy() -> None:
    rng = np.random.default_rng(0)
    nll_base = rng.gamma(2.0, 1.0, size=500)
    nll_q = nll_base + rng.normal(0.05, 0.2, size=500)
    n = nll_q.size
    m = mean_and_uncertainty(nll_q)
    assert m.value == pytest.approx(nll_q.mean(), rel=1e-12)
    assert m.uncertainty == pytest.approx(nll_q.std() / math.sqrt(n - 1), rel=1e-9)
    p = perplexity_stats(nll_q, nll_base)
    assert p.ppl_q.value == pytest.approx(math.exp(nll_q.mean()), rel=1e-12)
    assert p.ppl_base.value == pytest.approx(math.exp(nll_base.mean()), rel=1e-12)
    assert p.ratio.value == pytest.approx(math.exp(nll_q.mean() - nll_base.mean()), rel=1e-12)
    # the ratio's uncertainty is the standard error of the mean per-token difference
    assert p.ln_ratio.uncertainty == pytest.approx((nll_q - nll_base).std() / math.sqrt(n - 1), rel=1e-6)
    assert p.correlation == pytest.approx(np.corrcoef(nll_q, nll_base)[0, 1], rel=1e-6)
    ordered = np.sort(nll_q)
    for q in (0.0, 0.001, 0.01, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0):
        assert percentile(ordered, q) == pytest.approx(np.quantile(nll_q, q), rel=1e-12)
    dp = rng.normal(0, 0.05, size=n)
    assert rms_and_uncertainty(dp).value == pytest.approx(math.sqrt((dp * dp).mean()), rel=1e-12)
    hits = rng.random(n) < 0.9
    share = share_and_uncertainty(hits.astype(float))
    assert share.value == hits.mean()
    assert share.uncertainty == pytest.approx(math.sqrt(hits.mean() * (1 - hits.mean()) / (n - 1)), rel=1e-12)
