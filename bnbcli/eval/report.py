"""The report of `bnb eval`: frozen summaries, the one-line verdict, and ``as_dict()`` for --json
(raw numbers, null for undefined ones)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from bnbcli.eval.compare import EmbeddingPairs, HiddenError, TokenScores
from bnbcli.eval.memory import MemoryPlan
from bnbcli.eval.stats import (
    PERCENTILES,
    PERCENTILES_LOW,
    Estimate,
    PerplexityStats,
    distribution,
    mean_and_uncertainty,
    perplexity_stats,
    rms_and_uncertainty,
    share_and_uncertainty,
)
from bnbcli.inspect.report import GateFailure, finite

# (upper limit, words) for the verdict: mean KLD of a causal LM, 1 − smallest embedding cosine of an encoder.
KLD_BANDS = ((0.01, "very close to"), (0.05, "close to"), (0.2, "noticeably different from"))
COSINE_BANDS = ((0.01, "very close to"), (0.03, "close to"), (0.1, "noticeably different from"))


@dataclass(frozen=True)
class CausalSummary:
    tokens: int
    perplexity: PerplexityStats
    kld: Estimate
    kld_percentiles: dict[str, float | None]
    kld_bound_mean: float  # mean KLD is within [kld, kld + this] (0: exact)
    kld_bound_max: float
    dp: Estimate
    dp_percentiles: dict[str, float | None]
    rms_dp: Estimate
    same_top1: Estimate
    kld_values: np.ndarray = field(repr=False)  # per token, for the report's histogram

    def as_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "perplexity": self.perplexity.as_dict(),
            "kld": {
                **self.kld.as_dict(),
                **self.kld_percentiles,
                "topk_error_bound": {"mean": finite(self.kld_bound_mean), "max": finite(self.kld_bound_max)},
            },
            "delta_p": {**self.dp.as_dict(), **self.dp_percentiles},
            "rms_delta_p": self.rms_dp.as_dict(),
            "same_top1": self.same_top1.as_dict(),
        }


def causal_summary(scores: TokenScores) -> CausalSummary:
    return CausalSummary(
        tokens=int(scores.kld.size),
        perplexity=perplexity_stats(scores.nll_q, scores.nll_base),
        kld=mean_and_uncertainty(scores.kld),
        kld_percentiles=distribution(scores.kld, PERCENTILES + PERCENTILES_LOW),
        kld_bound_mean=float(scores.kld_bound.mean()) if scores.kld_bound.size else 0.0,
        kld_bound_max=float(scores.kld_bound.max()) if scores.kld_bound.size else 0.0,
        dp=mean_and_uncertainty(scores.dp),
        dp_percentiles=distribution(scores.dp, PERCENTILES + PERCENTILES_LOW),
        rms_dp=rms_and_uncertainty(scores.dp),
        same_top1=share_and_uncertainty(scores.same_top1.astype(np.float64)),
        kld_values=scores.kld,
    )


@dataclass(frozen=True)
class EncoderSummary:
    tokens: int
    token_cosine: Estimate  # the last hidden state, per token
    token_cosine_percentiles: dict[str, float | None]
    embedding_cosine_mean: float  # mean-pooled, L2-normalised, per text
    embedding_cosine_min: float
    same_neighbour: Estimate  # texts whose nearest other text is the same for QUANT's embeddings
    token_cosines: np.ndarray = field(repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "token_cosine": {**self.token_cosine.as_dict(), **self.token_cosine_percentiles},
            "embedding_cosine": {"mean": finite(self.embedding_cosine_mean), "min": finite(self.embedding_cosine_min)},
            "same_nearest_neighbour": self.same_neighbour.as_dict(),
        }


def encoder_summary(token_cosines: np.ndarray, embeddings: EmbeddingPairs) -> EncoderSummary:
    cosines = embeddings.cosines()
    return EncoderSummary(
        tokens=int(token_cosines.size),
        token_cosine=mean_and_uncertainty(token_cosines),
        token_cosine_percentiles=distribution(token_cosines, (("min", 0.0), ("1%", 0.01), ("median", 0.5))),
        embedding_cosine_mean=float(cosines.mean()) if cosines.size else math.nan,
        embedding_cosine_min=float(cosines.min()) if cosines.size else math.nan,
        same_neighbour=share_and_uncertainty(embeddings.same_neighbour().astype(np.float64)),
        token_cosines=token_cosines,
    )


@dataclass(frozen=True)
class LayerReport:
    name: str
    rel_l2: float
    cosine: float
    min_cosine: float
    tokens: int

    @staticmethod
    def of(name: str, error: HiddenError) -> LayerReport:
        return LayerReport(name, error.rel_l2, error.cosine, error.cosine_min, error.tokens)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "rel_l2": finite(self.rel_l2),
            "cosine": finite(self.cosine),
            "min_cosine": finite(self.min_cosine),
            "tokens": self.tokens,
        }


@dataclass(frozen=True)
class EvalReport:
    quant: str
    orig: str
    model_class: str
    kind: Literal["causal", "encoder"]
    device: str
    dtypes: dict[str, str]  # "orig", "quant": the dtype each model's parameters load in
    memory: MemoryPlan
    texts: dict[str, Any]  # source, texts, sequences, tokens, context
    layers: tuple[LayerReport, ...]
    seconds: dict[str, float]  # orig_load, orig_forward, quant_load, quant_forward, total
    causal: CausalSummary | None = None
    encoder: EncoderSummary | None = None
    gates: dict[str, float | None] = field(default_factory=dict)
    failures: tuple[GateFailure, ...] = ()

    @property
    def output_cosine(self) -> float:
        """What --min-cosine checks: an encoder's smallest embedding cosine; a causal LM's mean cosine of
        the last layer's hidden state."""
        if self.encoder is not None:
            return self.encoder.embedding_cosine_min
        return self.layers[-1].cosine if self.layers else math.nan

    def worst_layer(self) -> LayerReport | None:
        measured = [layer for layer in self.layers if math.isfinite(layer.rel_l2)]
        return max(measured, key=lambda layer: layer.rel_l2) if measured else None

    def verdict(self) -> str:
        if self.causal is not None:
            c = self.causal
            words = _band(c.kld.value, KLD_BANDS)
            facts = (
                f"mean KLD {c.kld.value:.4g} ± {c.kld.uncertainty:.2g}, same top-1 {100 * c.same_top1.value:.1f}%, "
                f"PPL ratio {c.perplexity.ratio.value:.4f} ± {c.perplexity.ratio.uncertainty:.4f}"
            )
        else:
            assert self.encoder is not None
            e = self.encoder
            words = _band(1 - e.embedding_cosine_min, COSINE_BANDS)
            facts = (
                f"embedding cosine min {e.embedding_cosine_min:.4f}, mean {e.embedding_cosine_mean:.4f}; "
                f"same nearest neighbour {100 * e.same_neighbour.value:.0f}%"
            )
        gates = ""
        if any(v is not None for v in self.gates.values()):
            gates = f"; gates: {len(self.failures)} failed" if self.failures else "; gates: passed"
        return f"{self.quant} is {words} {self.orig}: {facts}{gates}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "quant": self.quant,
            "orig": self.orig,
            "model_class": self.model_class,
            "kind": self.kind,
            "device": self.device,
            "dtypes": self.dtypes,
            "memory": self.memory.as_dict(),
            "texts": self.texts,
            "causal": self.causal.as_dict() if self.causal else None,
            "encoder": self.encoder.as_dict() if self.encoder else None,
            "output_cosine": finite(self.output_cosine),
            "layers": [layer.as_dict() for layer in self.layers],
            "seconds": self.seconds,
            "verdict": self.verdict(),
            "gates": {
                "limits": self.gates,
                "passed": not self.failures,
                "failures": [f.as_dict() for f in self.failures],
            },
        }


def _band(value: float, bands: tuple[tuple[float, str], ...]) -> str:
    return next((words for limit, words in bands if value <= limit), "far from")
