"""Whole numbers from text that a client or another process wrote (headers, query values, file names)."""

from __future__ import annotations


def ascii_int(text: str | None) -> int | None:
    """`text` as a whole number if it is ASCII digits only, else None. `str.isdigit()` alone also accepts '①' or
    '²', which int() then refuses: a 500 where a clear 4xx (or "not a number") was meant."""
    if text is None or not (text.isascii() and text.isdigit()):
        return None
    return int(text)
