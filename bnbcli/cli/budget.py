"""--keep-budget / --target-size / --calibrate on the command line: the request, checked before anything is
read, and the choice as the terminal shows it (bnb quantize --dry-run, bnb footprint, bnb inspect)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bnbcli import output
from bnbcli.errors import UsageError
from bnbcli.units import human_bytes


def budget_request(keep: Any, target: Any, calibrate: bool, text_file: Path | None, backend: str) -> Any:
    """A ``bnbcli.plan.budget.choice.BudgetRequest``, or None without a budget; flags that need one are refused."""
    from bnbcli.plan.budget.spec import one_budget

    budget = one_budget(keep, target)
    if budget is None:
        if calibrate:
            raise UsageError("--calibrate goes with --keep-budget or --target-size", hint="leave --calibrate out")
        if text_file is not None:
            raise UsageError("--text-file goes with --calibrate", hint="leave --text-file out")
        return None
    if text_file is not None and not calibrate:
        raise UsageError("--text-file goes with --calibrate", hint="add --calibrate")
    from bnbcli.eval.texts import read_text_file
    from bnbcli.plan.budget.choice import BudgetRequest

    texts = tuple(read_text_file(text_file)) if text_file is not None else None
    return BudgetRequest(budget, calibrate, texts, backend)


def _budget_line(choice: dict[str, Any]) -> str:
    budget = choice["budget"]
    if budget["share"] is not None:
        what = f"{100 * budget['share']:g}% of the Linear weights' {human_bytes(choice['linear_bytes'])} unquantized"
    elif budget["size"] is not None:
        what = human_bytes(budget["size"])
    else:
        what = f"--target-size {human_bytes(budget['target_size'])} − {human_bytes(choice['uniform_bytes'])} uniform"
    return f"keep budget: {what} = {human_bytes(choice['allowance'])} ({choice['allowance']} bytes)"


def render_choice(choice: dict[str, Any], title: str = "kept in 16-bit by the budget") -> None:
    """The kept modules, best value per byte first, with what each costs and why it was chosen."""
    from rich.table import Table

    output.stdout.print(_budget_line(choice))
    output.stdout.print(f"method: {choice['method']}" + (f" ({choice['texts']} texts)" if choice["texts"] else ""))
    table = Table(title=title, title_justify="left")
    for header in ("rank", "module", "bytes", "score", "rel error", "path gain"):
        table.add_column(header, justify="left" if header == "module" else "right")
    for kept in sorted(choice["kept"], key=lambda k: k["rank"]):
        weights = choice["weights"].get(kept["module"])
        also = f" (+ {', '.join(kept['also_keeps'])})" if kept["also_keeps"] else ""
        rel = f"{100 * weights['rel_error']:.2f}%" if weights else "—"
        gain = f"{weights['path_gain']:.2f}" if weights else "—"
        row = (str(kept["rank"]), kept["module"] + also, human_bytes(kept["bytes"]), f"{kept['score']:.4g}", rel, gain)
        table.add_row(*row)
    if choice["kept"]:
        output.stdout.print(table)
    output.stdout.print(outcome_line(choice))


def outcome_line(choice: dict[str, Any]) -> str:
    kept, candidates = len(choice["kept"]), choice["candidates"]
    if choice["everything_kept"]:
        head = f"the budget keeps every one of the {candidates} modules: nothing is left to quantize"
    elif not kept:
        head = f"no module kept ({candidates} candidates): the output is the uniform one"
    else:
        head = f"{kept} of {candidates} modules kept"
    bound = choice["near_optimal_bound"]
    tail = f"; at least {100 * bound:.1f}% of the best possible choice's error saved" if bound is not None else ""
    size = f"; weight files {human_bytes(choice['file_bytes'])}" if "file_bytes" in choice else ""
    return (
        f"{head}; {human_bytes(choice['spent'])} of {human_bytes(choice['allowance'])} spent (at most){size} "
        f"({human_bytes(choice['uniform_bytes'])} with every module quantized); "
        f"{100 * choice['saved_share']:.1f}% of the total error score saved{tail}"
    )
