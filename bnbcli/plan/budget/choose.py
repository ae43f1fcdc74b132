"""Which modules to keep: a 0/1 knapsack, error saved against bytes spent, solved greedily with a bound.

Each candidate has a value (the error its quantization adds, which keeping it saves: its score) and a
cost (the bytes keeping it adds). The greedy choice takes candidates by value per byte, best first, each
one that still fits, then compares that set with the best single candidate that fits and keeps the
better (the classic fix that makes greedy at least half the optimum). Near-optimality is shown on every
run, not assumed: the optimum of the fractional knapsack (the same order, the first candidate that does
not fit taken in part) bounds every 0/1 choice from above, and ``Choice.bound`` is the share of that
bound the choice reaches (1.0: optimal). Ties are broken by checkpoint order, so the same scores give
the same choice.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from bnbcli.plan.budget.candidates import Candidate


@dataclass(frozen=True)
class Item:
    """A candidate as the knapsack sees it: its own module and those its skip entry also keeps."""

    candidate: Candidate
    index: int  # checkpoint order
    value: float
    cost: int


@dataclass(frozen=True)
class Picked:
    item: Item
    rank: int  # 1 = the best value per byte among all candidates
    cost: int  # bytes it added once the modules chosen before it were counted
    value: float


@dataclass(frozen=True)
class Solution:
    picked: tuple[Picked, ...]
    value: float
    cost: int
    upper_bound: float | None  # the fractional optimum (None when skip entries overlap)


def items(found: tuple[Candidate, ...], scores: Mapping[str, float]) -> list[Item]:
    own = {c.module: c for c in found}
    out = []
    for index, c in enumerate(found):
        value = sum(scores[m] for m in c.members)
        cost = sum(own[m].own_cost for m in c.members)
        out.append(Item(c, index, value, cost))
    return out


def _order(pool: list[Item]) -> list[Item]:
    """Best value per byte first; an item that costs nothing (or saves bytes) before all others."""

    def key(item: Item) -> tuple[float, int]:
        ratio = float("inf") if item.cost <= 0 else item.value / item.cost
        return (-ratio, item.index)

    return sorted(pool, key=key)


def greedy(pool: list[Item], scores: Mapping[str, float], allowance: int) -> Solution:
    """The greedy choice under ``allowance`` bytes, or the best single item when that is worth more. An
    item whose skip entry also keeps modules chosen before it costs and saves only the others."""
    if allowance <= 0:
        return Solution((), 0.0, 0, 0.0)
    ordered = _order(pool)
    rank = {item.index: r for r, item in enumerate(ordered, start=1)}
    own_cost = {item.candidate.module: item.candidate.own_cost for item in pool}
    kept: set[str] = set()
    picked: list[Picked] = []
    spent = 0
    for item in ordered:
        new = [m for m in item.candidate.members if m not in kept]
        cost = sum(own_cost[m] for m in new)
        if new and spent + cost <= allowance:
            picked.append(Picked(item, rank[item.index], cost, sum(scores[m] for m in new)))
            kept.update(new)
            spent += cost
    total = sum(p.value for p in picked)
    single = max((i for i in pool if i.cost <= allowance), key=lambda i: (i.value, -i.index), default=None)
    if single is not None and single.value > total:
        picked, total, spent = (
            [Picked(single, rank[single.index], single.cost, single.value)],
            single.value,
            single.cost,
        )
    overlapping = any(len(i.candidate.members) > 1 for i in pool)
    return Solution(tuple(picked), total, spent, None if overlapping else fractional_bound(ordered, allowance))


def fractional_bound(ordered: list[Item], allowance: int) -> float:
    """The fractional knapsack's optimum: no 0/1 choice within ``allowance`` saves more."""
    room, value = allowance, 0.0
    for item in ordered:
        if item.cost <= 0:
            value += item.value
        elif item.cost <= room:
            room -= item.cost
            value += item.value
        else:
            return value + item.value * room / item.cost
    return value
