"""Byte sizes: parsing "5GB"/"500MiB" the way transformers' max_shard_size does, and printing them."""

from __future__ import annotations

import re

from bnbcli.errors import UsageError

_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str, what: str = "size") -> int:
    """A size with its unit: "5GB", "500MiB", "2.5GB", "100B". A bare number is refused, never read as
    bytes (`--gpu-memory 24` meant 24 GB), and so is a size of zero bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if not match or match.group(2) not in (*_UNITS, ""):
        raise UsageError(f"cannot read {what} {text!r}", hint="write it like 5GB, 500MB or 2GiB")
    number, unit = match.groups()
    if unit and float(number) > 0:
        return positive_size(int(float(number) * _UNITS[unit]), what)
    positive_size(int(float(number)), what)  # zero is refused as zero, with or without a unit
    raise UsageError(f"{what} {text!r} has no unit", hint=f"write {number}GB or {number}GiB ({number}B for bytes)")


def positive_size(n: int, what: str) -> int:
    """``n`` bytes, refused unless positive: the one rule for --max-shard-size and --gpu-memory."""
    if n <= 0:
        raise UsageError(f"{what} must be more than 0 bytes, not {n}", hint="give a size like 5GB or 500MB")
    return n


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1000
    return f"{n} B"


def human_seconds(seconds: float) -> str:
    """A duration to the second: "45s", "1m10s", "2h03m"."""
    whole = max(0, round(seconds))
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
