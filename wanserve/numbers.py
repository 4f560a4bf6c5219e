"""Whole numbers from text that a client or another process wrote (headers, query values, file names)."""

from __future__ import annotations

# Every number read this way is seconds, bytes, a count or a process id: 18 digits hold any of them (and any int64).
# Longer text is no such number; Python's int() would even refuse it past 4,300 digits (a ValueError: a 500).
MAX_DIGITS = 18


def ascii_int(text: str | None) -> int | None:
    """`text` as a whole number if it is at most MAX_DIGITS ASCII digits, else None. `str.isdigit()` alone also
    accepts '①' or '²', which int() then refuses: a 500 where a clear 4xx (or "not a number") was meant."""
    if text is None or not (text.isascii() and text.isdigit()) or len(text) > MAX_DIGITS:
        return None
    return int(text)
