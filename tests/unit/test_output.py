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
