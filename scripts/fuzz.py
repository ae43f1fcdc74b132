"""The long fuzz run: `make fuzz` (or python scripts/fuzz.py --cases 10000 --seed 1).

Mutates small real checkpoints and runs every reading command on each, and runs a share of hostile OUT
paths, links and signals; see tests/helpers/fuzz_harness.py for what counts as a finding. Prints progress, a
summary, the first findings, and exits 1 if there are any.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from helpers.fuzz_harness import Tally, fuzz


def peak_rss_mb() -> int:
    """This process's peak resident memory (Linux reports KiB): all cases run in it."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    started = time.monotonic()

    shown = 0

    def progress(tally: Tally) -> None:
        nonlocal shown
        for finding in tally.findings[shown:]:  # as they come: a long run's first finding need not wait for its end
            print(
                f"--- case {finding.case}, {finding.verb}: {finding.kind}\n{finding.detail}",
                file=sys.stderr,
                flush=True,
            )
        shown = len(tally.findings)
        if tally.cases % 500 == 0:
            print(
                f"{tally.cases} cases, {tally.runs} runs, {len(tally.findings)} findings, "
                f"{time.monotonic() - started:.0f} s, peak RSS {peak_rss_mb()} MB",
                file=sys.stderr,
                flush=True,
            )

    with tempfile.TemporaryDirectory(prefix="bnb-fuzz-") as work:
        tally = fuzz(args.cases, args.seed, Path(work), progress)
    exits = ", ".join(f"exit {code}: {n}" for code, n in sorted(tally.exits.items()))
    classes = ", ".join(f"{n} {label}" for label, n in tally.classes.items())
    paths = ", ".join(f"{kind} {n}" for kind, n in sorted(tally.paths.items()))
    print(
        f"{tally.cases} cases (seed {args.seed}; {classes}), {tally.runs} runs in {time.monotonic() - started:.0f} s; "
        f"{exits}; hostile paths: {sum(tally.paths.values())} ({paths}); peak RSS {peak_rss_mb()} MB; "
        f"{len(tally.findings)} findings"
    )
    for finding in tally.findings[:10]:
        print(f"--- case {finding.case}, {finding.verb}: {finding.kind}\n{finding.detail}")
    return 1 if tally.findings else 0


if __name__ == "__main__":
    sys.exit(main())
