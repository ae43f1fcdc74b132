"""The plan with the budget spent: the uniform plan, the choice, then the plan with the chosen modules added to
``--skip`` by their full names, checked against the choice before anything is written.

The final plan goes through the same planner as any ``--skip``: its explicit ``llm_int8_skip_modules`` then
holds the chosen modules, so loaders keep exactly what the budget chose. The check: the modules the final
plan keeps are the uniform plan's plus the chosen ones (with what their entries catch), and its tensor bytes
grew by at most the choice's ``spent``, itself within the allowance. With ``--target-size`` the final
plan's files (the largest they can be) must also fit the target; a choice whose safetensors headers or
shards would overshoot gives back its lowest-ranked modules until they fit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from bnbcli.errors import InternalError
from bnbcli.plan.budget.choice import BudgetChoice
from bnbcli.plan.quantize_layout import ComponentPlan, QuantizePlan
from bnbcli.plan.scheme import QuantScheme

Replan = Callable[[QuantScheme], QuantizePlan]


def _kept_modules(plan: QuantizePlan) -> set[str]:
    return {j.decision.module or "" for c in plan.components for j in c.jobs if j.decision.module and not j.quantized}


def with_choice(uniform: QuantizePlan, choice: BudgetChoice, replan: Replan) -> QuantizePlan:
    """The plan that keeps ``choice``'s modules, checked; recorded in the plan as ``keep_budget``."""
    while True:
        if not choice.kept:
            return replace(uniform, keep_budget=choice)
        scheme = replace(uniform.scheme, skip=(*uniform.scheme.skip, *choice.modules))
        final = replan(scheme)
        _check(uniform, final, choice)
        target = choice.budget.target
        if target is None or final.file_bytes <= target:
            return replace(final, components=tuple(_relabel(c, choice) for c in final.components), keep_budget=choice)
        choice = _without_last(choice)


def _check(uniform: QuantizePlan, final: QuantizePlan, choice: BudgetChoice) -> None:
    expected = _kept_modules(uniform) | {m for k in choice.kept for m in (k.module, *k.also_keeps)}
    if _kept_modules(final) != expected:
        odd = sorted(_kept_modules(final) ^ expected)
        raise InternalError(f"the plan with the budget keeps other modules than the budget chose ({odd[0]})")
    if not final.bytes_out - uniform.bytes_out <= choice.spent <= choice.allowance:
        raise InternalError(
            f"the budget's modules add {final.bytes_out - uniform.bytes_out} bytes, over the {choice.spent} counted"
        )


def _relabel(component: ComponentPlan, choice: BudgetChoice) -> ComponentPlan:
    """The chosen modules' weights say why they are kept: the budget, not a --skip the user typed."""
    why = {k.module: f"kept by the budget: rank {k.rank}, score {k.score:.4g}" for k in choice.kept}
    for k in choice.kept:
        why.update(dict.fromkeys(k.also_keeps, f"kept with {k.module} (its skip entry matches it)"))
    jobs = tuple(
        replace(j, decision=replace(j.decision, reason=why[j.decision.module]))
        if j.decision.module in why and not j.quantized and "--skip" in j.decision.reason
        else j
        for j in component.jobs
    )
    return replace(component, jobs=jobs)


def _without_last(choice: BudgetChoice) -> BudgetChoice:
    """The choice less its lowest-ranked kept module (the last one --target-size can give back)."""
    worst = max(choice.kept, key=lambda k: k.rank)
    kept = tuple(k for k in choice.kept if k is not worst)
    total = sum(choice.scores.values())
    saved = sum(k.score + sum(choice.scores[m] for m in k.also_keeps) for k in kept)
    return replace(choice, kept=kept, saved_share=saved / total if total > 0 else 0.0, bound=None)
