"""``json.loads`` for documents that come from outside (checkpoints, caches, journals)."""

from __future__ import annotations

import json
from typing import Any


def loads(text: str | bytes, **kwargs: Any) -> Any:
    """``json.loads``, except that a document nested too deeply to parse is malformed JSON like any
    other (ValueError): the parser recurses once per level, and 100,000 ``[`` raised RecursionError,
    which the callers' "not valid JSON" handlers did not catch."""
    try:
        return json.loads(text, **kwargs)
    except RecursionError:
        raise ValueError("nested too deeply") from None
