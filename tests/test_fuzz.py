"""A seeded slice of the mutation fuzzer (tests/fuzz_harness.py); `make fuzz` runs the long one."""

from __future__ import annotations

from pathlib import Path

import pytest
from fuzz_harness import fuzz


@pytest.mark.slow
def test_mutated_checkpoints_never_crash_hang_or_read_outside(tmp_path: Path) -> None:
    tally = fuzz(cases=150, seed=2026, work=tmp_path)
    report = "\n\n".join(f"case {f.case} {f.verb}: {f.kind}\n{f.detail}" for f in tally.findings[:5])
    assert not tally.findings, report
    assert tally.cases == 150
    # The mutations do reach past the first check: some runs succeed, most are refused as bad input.
    assert tally.exits.get(0, 0) > 0 and tally.exits.get(1, 0) > tally.runs // 4, tally.exits
