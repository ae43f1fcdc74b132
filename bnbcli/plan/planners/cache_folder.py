"""Where the plan cache lives and whether it is on: without torch, so that `bnb env` can say it at once."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import platformdirs


def enabled() -> bool:
    return os.environ.get("BNB_PLAN_CACHE", "").strip().lower() not in ("0", "off", "false", "no")


def folder() -> Path:
    root = os.environ.get("BNB_CACHE_DIR")
    if root:
        return Path(root) / "plans"
    return Path(platformdirs.user_cache_dir("bnbcli", appauthor=False)) / "plans"


def status() -> dict[str, Any]:
    """Where the cache is, whether it is on, and how many answers it holds (for `bnb env`)."""
    try:
        plans = sum(1 for _ in folder().glob("*.json"))
    except OSError:
        plans = 0
    return {"folder": str(folder()), "enabled": enabled(), "plans": plans}
