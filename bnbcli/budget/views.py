"""The budget for the verbs that write nothing: `bnb footprint` and `bnb inspect` show the choice and the
size `bnb quantize` would write with the same flags, from the same plan and the same choice."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from bnbcli.budget.apply import spend
from bnbcli.budget.choice import BudgetChoice, BudgetRequest
from bnbcli.checkpoint.source import Checkpoint
from bnbcli.output_plan import DEFAULT_MAX_SHARD_SIZE, QuantizePlan, plan_quantize
from bnbcli.plan import PlannerName
from bnbcli.scheme import QuantScheme


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

    return spend(replan(scheme), request, replan, checkpoint.root)


def kept_scheme(plan: QuantizePlan) -> tuple[QuantScheme, BudgetChoice]:
    """The scheme whose --skip holds the budget's modules, and the choice."""
    choice = plan.keep_budget
    assert isinstance(choice, BudgetChoice)
    return replace(plan.scheme, skip=(*plan.scheme.skip, *choice.modules)), choice


def inspect_choices(checkpoint: Checkpoint, request: Any, budget: BudgetRequest) -> dict[str, Any]:
    """`bnb inspect --keep-budget`: per scheme of ``--schemes``, the choice and the output's bytes."""
    from bnbcli.inspect.roundtrip import parse_schemes

    out = {}
    for named in parse_schemes(request.schemes, request.blocksize):
        plan = budget_plan(checkpoint, named.scheme, budget, planner=request.planner)
        _, choice = kept_scheme(plan)
        files = sum(c.shard_bytes(s) for c in plan.components for s in c.shards)
        out[named.name] = choice.as_dict() | {"bytes_out": plan.bytes_out, "file_bytes": files}
    return out
