"""The modules a budget can keep, and what keeping each one costs, from the plan with every module quantized.

Keeping a module replaces its quantized entries (packed weight, absmax, quant_map, nested absmax and map,
quant_state JSON; int8's SCB and weight_format) by its weight as it is, so its cost is its unquantized bytes
minus its quantized bytes, both known from the plan's layout. One part is not known before quantizing: with
double quantization the quant_state JSON ends in ``nested_offset`` written in decimal, 3 to 24 characters.
The cost uses the shortest, so it is the most keeping that module can add: a sum of costs bounds the bytes
the output really grows by.

A kept module goes into ``llm_int8_skip_modules`` by its full name, which transformers matches as a
pattern (from the start up to a dot, or as a suffix): a name that catches other quantized modules keeps
them too, so such a module is one item with all of them (``Candidate.members``).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

from bnbcli.errors import UsageError
from bnbcli.formats.layout import MAX_FLOAT_REPR, SHORTEST_FLOAT_REPR
from bnbcli.plan.planners.common import pattern_matches
from bnbcli.plan.quantize_layout import QuantizePlan, TensorJob


@dataclass(frozen=True)
class Candidate:
    module: str
    job: TensorJob  # its weight in the plan with every module quantized
    kept_bytes: int  # the weight unquantized (its dtype in the output)
    quantized_bytes: int  # its quantized entries, the shortest JSON counted
    members: tuple[str, ...]  # the quantized modules its skip entry keeps: itself first, then those it catches

    @property
    def own_cost(self) -> int:
        return self.kept_bytes - self.quantized_bytes


def single_component(plan: QuantizePlan):
    """The one component a budget chooses in: a pipeline's components are planned one at a time."""
    if len(plan.components) != 1:
        names = ", ".join(c.name for c in plan.components)
        raise UsageError(
            f"--keep-budget and --target-size choose within one model, and this pipeline has several ({names})",
            hint=f"quantize one component at a time: --components {plan.components[0].name}",
        )
    return plan.components[0]


def candidates(plan: QuantizePlan) -> tuple[Candidate, ...]:
    """Every quantized Linear weight of the uniform plan, in checkpoint order."""
    jobs = [j for j in single_component(plan).jobs if j.quantized and j.decision.module]
    names = [j.decision.module or "" for j in jobs]
    caught = catches(names)
    out = []
    for job, name in zip(jobs, names, strict=True):
        variable = sum(1 for e in job.entries if e.variable)
        quantized = job.bytes_out - variable * (MAX_FLOAT_REPR - SHORTEST_FLOAT_REPR)
        kept = job.source.numel * job.dtype.itemsize
        out.append(Candidate(name, job, kept, quantized, (name, *caught[name])))
    return tuple(out)


def linear_bytes(items: tuple[Candidate, ...]) -> int:
    """What a `--keep-budget N%` is a share of: the quantizable Linear weights unquantized."""
    return sum(c.kept_bytes for c in items)


_PLAIN = re.compile(r"[\w.]+")


def catches(names: list[str]) -> dict[str, list[str]]:
    """name → the other names its skip entry matches (``pattern_matches``: transformers' rule), without
    comparing every pair: a plain name (letters, digits, _ and dots, a dot matching any character)
    matches a prefix of its own length ending at a dot or the end, or a suffix."""
    found: dict[str, list[str]] = {n: [] for n in names}
    plain = [n for n in names if _PLAIN.fullmatch(n)]
    by_dots: dict[tuple[int, tuple[int, ...]], dict[str, str]] = defaultdict(dict)
    for n in plain:  # a pattern is found by its length and dot positions, with the others' chars at the dots
        by_dots[(len(n), tuple(i for i, ch in enumerate(n) if ch == "."))][n] = n
    for other in names:
        hits = {other[i:] for i in range(1, len(other))} & found.keys()  # suffixes
        for (length, dots), patterns in by_dots.items():
            if len(other) < length or (len(other) > length and other[length] != "."):
                continue
            masked = "".join("." if i in dots else ch for i, ch in enumerate(other[:length]))
            if masked in patterns:
                hits.add(patterns[masked])
        for pattern in sorted(hits - {other}):
            found[pattern].append(other)
    for n in names:  # anything else is matched the slow way
        if n not in plain:
            found[n] = [o for o in names if o != n and pattern_matches(o, n)]
    return found
