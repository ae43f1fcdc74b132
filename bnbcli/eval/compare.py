"""Per-token comparison of QUANT with ORIG: what is kept of ORIG's output, and the scores.

**KL divergence, exact and with ORIG's top-k.** For one token, with P = ORIG's next-token distribution and
Q = QUANT's, KLD = Σ_v P(v) (log P(v) − log Q(v)) over the vocabulary. When both models run side by side
the sum is over the whole vocabulary (exact). When ORIG runs first and only its ``k`` most likely tokens K
are kept (with their log-probabilities, ORIG's probability of the real next token and R_P = P(v ∉ K)),
the tokens outside K are lumped into one outcome whose probabilities are R_P and R_Q = Q(v ∉ K) (QUANT's
whole distribution is at hand when it runs):

    KLD_k = Σ_{v ∈ K} P(v) (log P(v) − log Q(v)) + R_P log(R_P / R_Q)

By the log-sum inequality KLD_k ≤ KLD, and the difference is R_P · KL(P_tail ‖ Q_tail) between the
normalised tails. Every tail probability of P is at most p_k (the k-th largest) and every tail probability
of Q at least q_min (the smallest Q gives a token outside K), so

    0 ≤ KLD − KLD_k ≤ R_P · log(p_k · R_Q / (R_P · q_min))

which is ``kld_bound``: the error vanishes with the mass R_P outside the top-k, and is exactly 0 when k is
the vocabulary. Perplexities, Δp and same top-1 use values kept exactly, whatever k.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

NEG_INF = float("-inf")


@dataclass(frozen=True)
class Reference:
    """What is kept of ORIG's output for one sequence of a causal LM: n scored tokens."""

    targets: torch.Tensor  # [n] the real next tokens
    token_logp: torch.Tensor  # [n] float32: ORIG's log-probability of the real next token
    top1: torch.Tensor  # [n] ORIG's most likely token
    logp: torch.Tensor  # [n, k] float32: its top-k log-probabilities, largest first; [n, V] when exact
    indices: torch.Tensor | None  # [n, k] their token ids; None when ``logp`` is the whole vocabulary
    log_rest: torch.Tensor  # [n] float64: log P(v ∉ top-k); −inf when exact

    @property
    def nbytes(self) -> int:
        tensors = (self.targets, self.token_logp, self.top1, self.logp, self.indices, self.log_rest)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def to(self, device: torch.device | str) -> Reference:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return Reference(
            self.targets.to(device),
            self.token_logp.to(device),
            self.top1.to(device),
            self.logp.to(device),
            move(self.indices),
            self.log_rest.to(device),
        )


def keep_reference(logp: torch.Tensor, targets: torch.Tensor, top_k: int | None) -> Reference:
    """From ORIG's log-probabilities [n, V] (float32): everything when ``top_k`` is None or covers the
    vocabulary, else the top-k and the log of the mass outside them."""
    token_logp = logp.gather(-1, targets[:, None])[:, 0]
    top1 = logp.argmax(dim=-1)
    if top_k is None or top_k >= logp.shape[-1]:
        rest = torch.full(targets.shape, NEG_INF, dtype=torch.float64, device=logp.device)
        return Reference(targets, token_logp, top1, logp, None, rest)
    values, indices = logp.topk(top_k, dim=-1)
    log_rest = logp.scatter(-1, indices, NEG_INF).logsumexp(dim=-1).double()
    return Reference(targets, token_logp, top1, values, indices, log_rest)


@dataclass(frozen=True)
class TokenScores:
    """Per scored token, float64 on the CPU."""

    kld: np.ndarray
    kld_bound: np.ndarray  # KLD − kld ∈ [0, kld_bound] (module docstring); 0 when exact
    nll_q: np.ndarray
    nll_base: np.ndarray
    dp: np.ndarray  # p_QUANT − p_ORIG of the real next token
    same_top1: np.ndarray  # bool


def _kl_terms(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Σ P (log P − log Q) over the last axis; a token with P = 0 adds nothing."""
    terms = torch.exp(logp) * (logp - logq)
    return torch.where(logp > NEG_INF, terms, torch.zeros((), dtype=terms.dtype, device=terms.device)).sum(dim=-1)


def score(ref: Reference, logq: torch.Tensor) -> TokenScores:
    """QUANT's log-probabilities [n, V] (float32, on the device of ``ref``) against ORIG's reference."""
    token_logq = logq.gather(-1, ref.targets[:, None])[:, 0]
    same = logq.argmax(dim=-1) == ref.top1
    if ref.indices is None:
        kld = _kl_terms(ref.logp, logq).double()
        bound = torch.zeros_like(kld)
    else:
        head = _kl_terms(ref.logp, logq.gather(-1, ref.indices)).double()
        log_q_rest = logq.scatter(-1, ref.indices, NEG_INF).logsumexp(dim=-1).double()
        log_q_min = logq.scatter(-1, ref.indices, float("inf")).amin(dim=-1).double()
        p_rest = torch.exp(ref.log_rest)
        has_rest = p_rest > 0
        zero = torch.zeros_like(p_rest)
        kld = head + torch.where(has_rest, p_rest * (ref.log_rest - log_q_rest), zero)
        p_k = ref.logp[:, -1].double()
        bound = torch.where(has_rest, p_rest * (p_k + log_q_rest - ref.log_rest - log_q_min), zero).clamp(min=0)
    dp = torch.exp(token_logq.double()) - torch.exp(ref.token_logp.double())
    return TokenScores(
        kld=kld.cpu().numpy(),
        kld_bound=bound.cpu().numpy(),
        nll_q=(-token_logq.double()).cpu().numpy(),
        nll_base=(-ref.token_logp.double()).cpu().numpy(),
        dp=dp.cpu().numpy(),
        same_top1=same.cpu().numpy(),
    )


def join(scores: list[TokenScores]) -> TokenScores:
    def cat(name: str) -> np.ndarray:
        return np.concatenate([getattr(s, name) for s in scores]) if scores else np.zeros(0)

    return TokenScores(*(cat(name) for name in TokenScores.__dataclass_fields__))


# --- hidden states ---------------------------------------------------------------------------------------


def token_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine of each row of ``a`` with the same row of ``b`` [tokens, hidden], in float32."""
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)


@dataclass
class HiddenError:
    """One layer's hidden state, QUANT against ORIG, summed over tokens."""

    squared_error: float = 0.0  # Σ ‖h_q − h_o‖²
    squared_norm: float = 0.0  # Σ ‖h_o‖²
    cosine_sum: float = 0.0
    cosine_min: float = float("inf")
    tokens: int = 0

    def add(self, quant: torch.Tensor, orig: torch.Tensor) -> None:
        q, o = quant.float(), orig.float()
        self.squared_error += float(((q - o) ** 2).sum())
        self.squared_norm += float((o * o).sum())
        cos = token_cosines(q, o)
        self.cosine_sum += float(cos.double().sum())
        self.cosine_min = min(self.cosine_min, float(cos.min()))
        self.tokens += cos.numel()

    @property
    def rel_l2(self) -> float:
        """‖H_q − H_o‖ / ‖H_o‖ over all tokens (Frobenius)."""
        return (self.squared_error / self.squared_norm) ** 0.5 if self.squared_norm > 0 else float("nan")

    @property
    def cosine(self) -> float:
        return self.cosine_sum / self.tokens if self.tokens else float("nan")


@dataclass
class EmbeddingPairs:
    """Mean-pooled, L2-normalised last hidden states (one per text), of ORIG and of QUANT."""

    orig: list[torch.Tensor] = field(default_factory=list)
    quant: list[torch.Tensor] = field(default_factory=list)

    def cosines(self) -> np.ndarray:
        if not self.orig:
            return np.zeros(0)
        return token_cosines(torch.stack(self.quant), torch.stack(self.orig)).double().numpy()

    def same_neighbour(self) -> np.ndarray:
        """Per text: QUANT's embeddings pick the same nearest other text as ORIG's (empty below 2 texts)."""
        if len(self.orig) < 2:
            return np.zeros(0, dtype=bool)
        return nearest(torch.stack(self.quant)) == nearest(torch.stack(self.orig))


def pooled(hidden: torch.Tensor) -> torch.Tensor:
    """The mean over tokens of [tokens, hidden], L2-normalised (sentence-transformers' mean pooling)."""
    return torch.nn.functional.normalize(hidden.float().mean(dim=0), dim=-1).cpu()


def nearest(embeddings: torch.Tensor) -> np.ndarray:
    similarity = embeddings @ embeddings.T
    similarity.fill_diagonal_(NEG_INF)
    return similarity.argmax(dim=-1).numpy()
