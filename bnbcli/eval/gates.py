"""CI gates of `bnb eval`: each checks one number of the report; every gate missed is named.

``--max-kld X``        mean KLD(ORIG ‖ QUANT) above X nats (causal LMs)
``--min-top1 X``       the share of tokens where both models rank the same token first below X (0…1; causal LMs)
``--max-ppl-ratio X``  PPL(QUANT) / PPL(ORIG) above X (causal LMs)
``--min-cosine X``     the output cosine below X: an encoder's smallest mean-pooled embedding cosine, a causal
                       LM's mean per-token cosine of the last layer's hidden state
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bnbcli.errors import UsageError

if TYPE_CHECKING:  # the gates are checked with the command line, before torch is imported
    from bnbcli.eval.report import EvalReport
    from bnbcli.inspect.report import GateFailure

GATE_EXAMPLES = "for example --max-kld 0.05 --min-top1 0.9 --max-ppl-ratio 1.05 --min-cosine 0.99"


@dataclass(frozen=True)
class EvalGates:
    max_kld: float | None = None
    min_top1: float | None = None
    max_ppl_ratio: float | None = None
    min_cosine: float | None = None

    def __post_init__(self) -> None:
        for option, value, low, high in (
            ("--max-kld", self.max_kld, 0.0, math.inf),
            ("--min-top1", self.min_top1, 0.0, 1.0),
            ("--max-ppl-ratio", self.max_ppl_ratio, 0.0, math.inf),
            ("--min-cosine", self.min_cosine, -1.0, 1.0),
        ):
            if value is not None and not (math.isfinite(value) and low <= value <= high):
                where = f"between {low:g} and {high:g}" if math.isfinite(high) else f">= {low:g}"
                raise UsageError(f"{option} must be a number {where}, not {value}", hint=GATE_EXAMPLES)

    def check_model(self, causal: bool) -> None:
        """The KLD, top-1 and perplexity gates need a language-model head."""
        if causal:
            return
        asked = [name for name, v in (("--max-kld", self.max_kld), ("--min-top1", self.min_top1)) if v is not None]
        asked += ["--max-ppl-ratio"] if self.max_ppl_ratio is not None else []
        if asked:
            raise UsageError(
                f"{', '.join(asked)} need a causal LM, and QUANT is a model without a language-model head",
                hint="gate an encoder with --min-cosine",
            )

    def as_dict(self) -> dict[str, float | None]:
        return {
            "max_kld": self.max_kld,
            "min_top1": self.min_top1,
            "max_ppl_ratio": self.max_ppl_ratio,
            "min_cosine": self.min_cosine,
        }


def check(gates: EvalGates, report: EvalReport) -> tuple[GateFailure, ...]:
    """Every gate the report misses (NaN misses every gate)."""
    from bnbcli.inspect.report import GateFailure  # with the report's own imports (torch)

    checks: list[tuple[str, str, float | None, float, bool]] = []  # what, option, limit, value, above is bad
    if report.causal is not None:
        c = report.causal
        checks += [
            ("mean KLD", "--max-kld", gates.max_kld, c.kld.value, True),
            ("same top-1", "--min-top1", gates.min_top1, c.same_top1.value, False),
            ("PPL ratio", "--max-ppl-ratio", gates.max_ppl_ratio, c.perplexity.ratio.value, True),
        ]
    checks.append(("output cosine", "--min-cosine", gates.min_cosine, report.output_cosine, False))
    failures = []
    for what, option, limit, value, above_is_bad in checks:
        if limit is None:
            continue
        passed = value <= limit if above_is_bad else value >= limit
        if not passed:
            failures.append(GateFailure(what, option, value, limit))
    return tuple(failures)
