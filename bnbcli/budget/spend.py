"""The budget spent: score the modules the uniform plan quantizes, choose (bnbcli.plan.budget), and the final
plan. `bnb quantize` writes that plan; `bnb footprint` and `bnb inspect` show its choice and size, from the
same plan and the same choice, without writing."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from bnbcli.backends import resolve_backend
from bnbcli.budget.scores import Progress, calibrated_scores, weight_figures
from bnbcli.checkpoint.source import Checkpoint
from bnbcli.plan.budget.apply import with_choice
from bnbcli.plan.budget.candidates import candidates, single_component
from bnbcli.plan.budget.choice import BudgetChoice, BudgetRequest, record
from bnbcli.plan.decisions import PlannerName
from bnbcli.plan.quantize_layout import DEFAULT_MAX_SHARD_SIZE, QuantizePlan, plan_quantize
from bnbcli.plan.scheme import QuantScheme


def choose_modules(
    uniform: QuantizePlan, request: BudgetRequest, model_dir: Path | None, progress: Progress = lambda n: None
) -> BudgetChoice:
    """Score every module the uniform plan quantizes and spend the budget on them."""
    found = candidates(uniform)
    backend = resolve_backend(request.backend)
    config = single_component(uniform).source.config
    figures = weight_figures(found, uniform.scheme, backend, config, progress)
    if request.calibrate:
        assert model_dir is not None
        texts = list(request.texts) if request.texts is not None else None
        scores = calibrated_scores(found, uniform.scheme, backend, model_dir, texts)
    else:
        scores = {m: f.weight_score for m, f in figures.items()}
    return record(uniform, found, scores, figures, request)


def budget_plan(
    checkpoint: Checkpoint,
    scheme: QuantScheme,
    request: BudgetRequest,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    planner: PlannerName | None = None,
) -> QuantizePlan:
    """The plan `bnb quantize` makes for ``scheme`` with this budget (its ``keep_budget`` is the choice)."""

    def replan(s: QuantScheme) -> QuantizePlan:
        return plan_quantize(checkpoint, s, max_shard_size, planner)

    uniform = replan(scheme)
    return with_choice(uniform, choose_modules(uniform, request, checkpoint.root), replan)


def keeper(budget: BudgetRequest) -> Callable[[Checkpoint, QuantScheme, int, PlannerName | None], Any]:
    """`bnb footprint --keep-budget`: per bnb scheme, the scheme with the kept modules skipped, and the choice."""

    def keep(
        checkpoint: Checkpoint, scheme: QuantScheme, max_shard_size: int, planner: PlannerName | None
    ) -> tuple[QuantScheme, dict[str, Any]]:
        choice = budget_plan(checkpoint, scheme, budget, max_shard_size, planner).keep_budget
        assert isinstance(choice, BudgetChoice)
        return replace(scheme, skip=(*scheme.skip, *choice.modules)), choice.as_dict()

    return keep


def inspect_choices(checkpoint: Checkpoint, request: Any, budget: BudgetRequest) -> dict[str, Any]:
    """`bnb inspect --keep-budget`: per scheme of ``--schemes``, the choice and the output's bytes."""
    from bnbcli.inspect.roundtrip import parse_schemes

    out = {}
    for named in parse_schemes(request.schemes, request.blocksize):
        plan = budget_plan(checkpoint, named.scheme, budget, planner=request.planner)
        out[named.name] = plan.keep_budget.as_dict() | {"bytes_out": plan.bytes_out, "file_bytes": plan.file_bytes}
    return out
