"""The budget's choice as a record: which modules stay unquantized, what each costs and why, and the figures
the dry run, the manifest, `bnb footprint` and `bnb inspect` show."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bnbcli.formats.layout import MAX_FLOAT_REPR, SHORTEST_FLOAT_REPR
from bnbcli.plan.budget import choose
from bnbcli.plan.budget.candidates import Candidate, linear_bytes
from bnbcli.plan.budget.spec import KeepBudget
from bnbcli.plan.quantize_layout import QuantizePlan

WEIGHTS = (
    "weights: relative round-trip error energy ‖ΔW‖²/‖W‖² under the scheme, times the path gain of the "
    "attention value/output or MLP pair the module is in (1 for others)"
)
CALIBRATED = "calibrated: output error each module's quantization adds on text (KL divergence or cosine distance)"


@dataclass(frozen=True)
class BudgetRequest:
    budget: KeepBudget
    calibrate: bool = False
    texts: tuple[str, ...] | None = None  # --text-file's texts (None: the built-in ones)
    backend: str = "auto"


@dataclass(frozen=True)
class WeightFigures:
    """`bnb inspect`'s figures of one weight under the scheme."""

    rel_error: float  # ‖ΔW‖/‖W‖
    outlier_dims: int  # outlier input columns + output rows
    large_values: int  # isolated large values
    path_gain: float = 1.0  # what its block's product does to its error (bnbcli.budget.paths)

    @property
    def weight_score(self) -> float:
        return self.rel_error**2 * self.path_gain


@dataclass(frozen=True)
class KeptModule:
    module: str
    rank: int  # by error saved per byte among all candidates (1 = best)
    score: float
    bytes: int  # what keeping it adds at most (after the modules chosen before it)
    also_keeps: tuple[str, ...] = ()  # other modules its llm_int8_skip_modules entry matches


@dataclass(frozen=True)
class BudgetChoice:
    budget: KeepBudget
    method: str
    linear_bytes: int  # the quantizable Linear weights unquantized: what a share is of
    uniform_bytes: int  # the output's files with every module quantized (largest, with double quant)
    allowance: int  # extra bytes allowed
    kept: tuple[KeptModule, ...]
    candidates: int
    scores: dict[str, float]  # every candidate's score, in checkpoint order
    saved_share: float  # of the sum of all scores, the share the kept modules save
    bound: float | None  # the choice's value over the fractional optimum (≤ 1; None if not computed)
    weights: dict[str, WeightFigures] = field(default_factory=dict)
    texts: int | None = None  # calibration texts

    @property
    def spent(self) -> int:
        return sum(k.bytes for k in self.kept)

    @property
    def everything(self) -> bool:
        return sum(1 + len(k.also_keeps) for k in self.kept) == self.candidates

    @property
    def modules(self) -> tuple[str, ...]:
        return tuple(k.module for k in self.kept)

    def as_dict(self) -> dict[str, Any]:
        return {
            "budget": self.budget.as_dict(),
            "method": self.method,
            "texts": self.texts,
            "linear_bytes": self.linear_bytes,
            "uniform_bytes": self.uniform_bytes,
            "allowance": self.allowance,
            "spent": self.spent,
            "candidates": self.candidates,
            "everything_kept": self.everything,
            "saved_share": self.saved_share,
            "near_optimal_bound": self.bound,
            "cost_bound": f"double quant: each cost counts the shortest nested_offset ({SHORTEST_FLOAT_REPR} "
            f"characters, of at most {MAX_FLOAT_REPR}), so spent is the most the output grows by",
            "kept": [vars(k) | {"also_keeps": list(k.also_keeps)} for k in self.kept],
            "scores": self.scores,
            "weights": {m: vars(w) for m, w in self.weights.items()},
        }


def record(
    uniform: QuantizePlan,
    found: tuple[Candidate, ...],
    scores: dict[str, float],
    figures: dict[str, WeightFigures],
    request: BudgetRequest,
) -> BudgetChoice:
    """The budget spent on the candidates by score per byte (choose.py), as the record the commands show."""
    files = uniform.file_bytes
    allowance = request.budget.allowance(linear_bytes(found), files)
    solution = choose.greedy(choose.items(found, scores), scores, allowance)
    total = sum(scores.values())
    kept = tuple(
        KeptModule(
            p.item.candidate.module, p.rank, scores[p.item.candidate.module], p.cost, p.item.candidate.members[1:]
        )
        for p in solution.picked
    )
    bound = solution.upper_bound
    return BudgetChoice(
        budget=request.budget,
        method=CALIBRATED if request.calibrate else WEIGHTS,
        linear_bytes=linear_bytes(found),
        uniform_bytes=files,
        allowance=allowance,
        kept=kept,
        candidates=len(found),
        scores={c.module: scores[c.module] for c in found},
        saved_share=solution.value / total if total > 0 else 0.0,
        bound=(solution.value / bound if bound else 1.0) if bound is not None else None,
        weights=figures,
        texts=(len(request.texts) if request.texts is not None else None) if request.calibrate else None,
    )
