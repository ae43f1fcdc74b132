"""What `--keep-budget` and `--target-size` ask for, parsed and checked before anything is read.

A budget is the bytes the output may grow by when modules stay unquantized: a share of the quantizable
Linear weights' unquantized bytes (``10%``), a size (``600MB``), or, with ``--target-size``, what is left
between the output with every module quantized and the size the whole output may take.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from bnbcli.errors import UsageError
from bnbcli.units import human_bytes, parse_size

_SHARE = re.compile(r"\s*([+-]?\d+(?:\.\d+)?)\s*%\s*")
_HINT = "use --keep-budget 10% (a share of the Linear weights' 16-bit bytes) or a size such as --keep-budget 600MB"


@dataclass(frozen=True)
class KeepBudget:
    """One of: ``share`` of the Linear weights' unquantized bytes, ``size`` extra bytes, or the whole
    output's ``target`` bytes."""

    share: float | None = None
    size: int | None = None
    target: int | None = None

    @property
    def flag(self) -> str:
        if self.target is not None:
            return f"--target-size {self.target}B"
        if self.share is not None:
            return f"--keep-budget {self.share * 100:g}%"
        return f"--keep-budget {self.size}B"

    def allowance(self, linear_bytes: int, uniform_file_bytes: int) -> int:
        """The extra bytes this budget allows, given the quantizable Linear weights' unquantized bytes and
        the output's file bytes with every module quantized (the smallest output)."""
        if self.share is not None:
            return math.floor(self.share * linear_bytes)
        if self.size is not None:
            return self.size
        assert self.target is not None
        if self.target < uniform_file_bytes:
            raise UsageError(
                f"--target-size {human_bytes(self.target)} is smaller than the smallest output, "
                f"{human_bytes(uniform_file_bytes)} ({uniform_file_bytes} bytes, every module quantized)",
                hint=f"use --target-size {uniform_file_bytes}B or more",
            )
        return self.target - uniform_file_bytes

    def as_dict(self) -> dict[str, float | int | None]:
        return {"share": self.share, "size": self.size, "target_size": self.target}


def parse_keep_budget(text: str) -> KeepBudget:
    """``10%`` (0 to 100) or a size with its unit (``600MB``)."""
    share = _SHARE.fullmatch(text)
    if share is not None:
        value = float(share.group(1))
        if value < 0:
            raise UsageError(f"{text!r} is negative", hint=_HINT)
        if value > 100:
            raise UsageError(
                f"{text!r} is over 100%",
                hint="use --keep-budget 100% to keep every module unquantized (the most it can mean)",
            )
        return KeepBudget(share=value / 100)
    if text.strip().startswith("-"):
        raise UsageError(f"{text!r} is negative", hint=_HINT)
    if re.fullmatch(r"\s*\d+(?:\.\d+)?\s*", text):
        raise UsageError(f"{text!r} has no unit", hint=_HINT)
    try:
        return KeepBudget(size=parse_size(text, "--keep-budget"))
    except UsageError:
        raise UsageError(f"cannot read {text!r}", hint=_HINT) from None


def parse_target_size(text: str) -> KeepBudget:
    return KeepBudget(target=parse_size(text, "--target-size"))


def one_budget(keep: KeepBudget | None, target: KeepBudget | None) -> KeepBudget | None:
    """--keep-budget or --target-size, never both."""
    if keep is not None and target is not None:
        raise UsageError("--keep-budget and --target-size both set the budget", hint="leave --target-size out")
    return keep or target
