"""A seeded slice of the mutation fuzzer (tests/helpers/fuzz_harness.py); `make fuzz` runs the long one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from helpers import fuzz_harness
from helpers.fuzz_harness import fuzz, silent_fallback


@pytest.mark.slow
def test_mutated_checkpoints_never_crash_hang_or_read_outside(tmp_path: Path) -> None:
    tally = fuzz(cases=150, seed=2026, work=tmp_path)
    report = "\n\n".join(f"case {f.case} {f.verb}: {f.kind}\n{f.detail}" for f in tally.findings[:5])
    assert not tally.findings, report
    assert tally.cases == 150
    # The mutations do reach past the first check: some runs succeed, most are refused as bad input.
    assert tally.exits.get(0, 0) > 0 and tally.exits.get(1, 0) > tally.runs // 4, tally.exits
    # and the slice holds cases of every class: served from an offline Hub cache, a nonsense config.json
    assert tally.classes["offline Hub"] > 0 and tally.classes["nonsense config"] > 0, tally.classes


def test_a_silent_fallback_is_a_finding(tmp_path: Path) -> None:
    """The fuzzer's check for nonsense configs can fail: name rules with config.json and no warning."""
    (tmp_path / "config.json").write_text("{}")
    plan = {"components": [{"planner": "name-rules"}], "warnings": []}
    assert silent_fallback(tmp_path, json.dumps(plan)) is not None
    assert silent_fallback(tmp_path, json.dumps({**plan, "warnings": ["planned by name rules because …"]})) is None
    assert silent_fallback(tmp_path, json.dumps({"components": [{"planner": "transformers"}], "warnings": []})) is None


def test_a_run_that_allocates_past_the_cap_is_a_memory_finding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The memory check still catches one case's blow-up (a header that makes bnb allocate what it
    describes): here each run on a case's files touches MAX_GROWTH_BYTES + 64 MiB, after a higher peak
    that this process reached and left before the fuzz began."""
    real = fuzz_harness.run_verb
    case = str(tmp_path / "case")

    def greedy(args: list[str], out: Any = None, seconds: int = fuzz_harness.CASE_SECONDS) -> Any:
        held = b"\1" * (fuzz_harness.MAX_GROWTH_BYTES + (64 << 20)) if case in args else b""  # noqa: F841
        return real(args, out, seconds)

    monkeypatch.setattr(fuzz_harness, "run_verb", greedy)
    earlier_peak = b"\1" * (2 * fuzz_harness.MAX_GROWTH_BYTES)  # work before the fuzz (another test) peaked high
    del earlier_peak
    tally = fuzz(cases=2, seed=2026, work=tmp_path)
    assert tally.runs > 0 and {f.kind for f in tally.findings} == {"memory"}, tally.findings
