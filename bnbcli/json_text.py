"""``json.loads`` for documents that come from outside (checkpoints, caches, journals), and
``write_indented`` for the large documents bnb writes (a manifest with a record per tensor)."""

from __future__ import annotations

import json
from collections.abc import Callable
from json.encoder import encode_basestring_ascii
from typing import Any


def loads(text: str | bytes, **kwargs: Any) -> Any:
    """``json.loads``, except that a document nested too deeply to parse is malformed JSON like any
    other (ValueError): the parser recurses once per level, and 100,000 ``[`` raised RecursionError,
    which the callers' "not valid JSON" handlers did not catch."""
    try:
        return json.loads(text, **kwargs)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def write_indented(value: Any, write: Callable[[str], Any]) -> None:
    """``json.dumps(value, indent=2)``, byte for byte, handed to ``write`` in pieces of a few thousand parts.
    Faster: with ``indent`` the standard library falls back to its pure-Python encoder, which took seconds
    for a manifest of 50,000 tensors; and a large document never exists as one string (the manifest of
    200,000 tensors is 250 MB of text)."""
    parts: list[str] = []

    def out(part: str) -> None:
        parts.append(part)
        if len(parts) == 4096:
            write("".join(parts))
            parts.clear()

    _indented(value, "\n", out)
    write("".join(parts))


_CONSTANTS = {None: "null", True: "true", False: "false"}


def _indented(value: Any, newline: str, out: Callable[[str], None]) -> None:
    kind = type(value)
    if kind is dict and any(type(key) is not str for key in value):
        out(_by_json_dumps(value, newline))
    elif kind is dict or kind is list or kind is tuple:
        if not value:
            out("{}" if kind is dict else "[]")
            return
        inner = newline + "  "
        separator = "[" if kind is not dict else "{"
        for item in value:
            if kind is dict:
                out(separator + inner + encode_basestring_ascii(item) + ": ")
                item = value[item]
            else:
                out(separator + inner)
            separator = ","
            # strings, ints and finite floats, most of a manifest's or report's leaves, without a call of their own
            if type(item) is str:
                out(encode_basestring_ascii(item))
            elif type(item) is int:
                out(int.__repr__(item))
            elif type(item) is float and item - item == 0:
                out(float.__repr__(item))
            else:
                _indented(item, inner, out)
        out(newline + ("}" if kind is dict else "]"))
    else:
        out(_scalar(value, newline))


def _scalar(value: Any, newline: str) -> str:
    kind = type(value)
    if kind is str:
        return encode_basestring_ascii(value)
    if kind is int:
        return int.__repr__(value)
    if kind is float:
        return float.__repr__(value) if value - value == 0 else json.dumps(value)  # inf and NaN as json spells them
    if value is None or kind is bool:
        return _CONSTANTS[value]
    return _by_json_dumps(value, newline)


def _by_json_dumps(value: Any, newline: str) -> str:
    """What the fast path does not spell itself (keys other than str, subclasses of JSON's types), as
    json.dumps spells it, moved to this depth: its text has no other line breaks (strings escape theirs)."""
    return json.dumps(value, indent=2).replace("\n", newline)
