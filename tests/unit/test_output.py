"""What the terminal side of bnbcli/output.py does with -q."""

from __future__ import annotations

from bnbcli import output


def test_a_plan_table_under_quiet_is_not_laid_out(capsys) -> None:
    """-q prints nothing on stdout; a plan's table is not even built (200,000 rows took 86 s to lay out and drop)."""
    described = []
    rows = [{"name": f"t{i}", "shape": [2, 2], "dtype": "bfloat16", "bytes_in": 8, "bytes_out": 8} for i in range(3)]
    try:
        output.set_quiet(True)
        output.emit_tensor_table("plan", None, rows, lambda t: described.append(t["name"]) or "keep", "total", 24, 24)
    finally:
        output.set_quiet(False)
    assert described == [] and capsys.readouterr().out == ""
    output.emit_tensor_table("plan", None, rows, lambda t: described.append(t["name"]) or "keep", "total", 24, 24)
    assert described == ["t0", "t1", "t2"]


def _tensor(name: str, shape: list[int], nbytes: int) -> dict:
    return {"name": name, "shape": shape, "dtype": "bfloat16", "bytes_in": nbytes, "bytes_out": nbytes // 2}


def test_alike_rows_fold_by_the_numbers_in_their_names() -> None:
    rows = [
        ("layers.0.experts.0.w", [4, 4], "bfloat16", "quantize", 32, 16),
        ("layers.0.experts.1.w", [4, 4], "bfloat16", "quantize", 32, 16),
        ("layers.1.experts.0.w", [4, 4], "bfloat16", "quantize", 32, 16),
        ("layers.1.experts.1.w", [8, 4], "bfloat16", "quantize", 64, 32),  # another shape
        ("layers.0.norm", [4], "bfloat16", "keep", 8, 8),
        ("lm_head", [4, 4], "bfloat16", "keep", 32, 32),
    ]
    assert output.fold_rows(rows) == [
        ("layers.*.experts.*.w ×3", [4, 4], "bfloat16", "quantize", 96, 48),
        ("layers.1.experts.1.w", [8, 4], "bfloat16", "quantize", 64, 32),  # a group of one keeps its name
        ("layers.0.norm", [4], "bfloat16", "keep", 8, 8),
        ("lm_head", [4, 4], "bfloat16", "keep", 32, 32),
    ]


def test_a_plan_table_lists_every_tensor_up_to_its_limit_then_folds(capsys) -> None:
    """Past FULL_TABLE_ROWS tensors (an MoE's tens of thousands of experts) a row stands for its group."""
    few = [_tensor(f"e.{i}.w", [2, 2], 8) for i in range(output.FULL_TABLE_ROWS)]
    output.emit_tensor_table("plan", None, few, lambda t: "quantize", "total", 8000, 4000)
    shown = capsys.readouterr().out
    assert "e.999.w" in shown and "e.*.w" not in shown
    many = [*few, _tensor("e.1000.w", [2, 2], 8), _tensor("e.0.bias", [2], 4)]
    output.emit_tensor_table("plan", None, many, lambda t: "quantize", "total", 8012, 4006)
    shown = capsys.readouterr().out
    assert f"e.*.w ×{output.FULL_TABLE_ROWS + 1}" in shown and "e.0.bias" in shown and "e.999.w" not in shown
    assert "--json lists every one" in shown


def test_a_plan_table_of_more_groups_than_its_limit_says_how_many_are_left_out(capsys) -> None:
    unlike = [_tensor(f"t.{i}", [i + 1], 2 * (i + 1)) for i in range(output.FULL_TABLE_ROWS + 5)]  # no two alike
    output.emit_tensor_table("plan", None, unlike, lambda t: "keep", "total", 0, 0)
    shown = capsys.readouterr().out
    assert f"t.{output.FULL_TABLE_ROWS - 1}" in shown and f"t.{output.FULL_TABLE_ROWS}" not in shown
    assert "… 5 more rows" in shown
