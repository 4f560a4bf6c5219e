"""Whole numbers from untrusted text."""

from __future__ import annotations

import pytest

from wanserve.numbers import ascii_int


@pytest.mark.parametrize(("text", "want"), [("0", 0), ("120", 120), ("007", 7), ("9" * 30, int("9" * 30))])
def test_ascii_digits_are_numbers(text: str, want: int) -> None:
    assert ascii_int(text) == want


@pytest.mark.parametrize("text", [None, "", "-1", "1.5", " 1", "1e3", "①", "²", "١٢", "0x10"])
def test_anything_else_is_none_never_an_error(text: str | None) -> None:
    assert ascii_int(text) is None
