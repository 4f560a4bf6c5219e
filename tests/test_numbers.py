"""Whole numbers from untrusted text."""

from __future__ import annotations

import pytest

from wanserve.numbers import ascii_int


@pytest.mark.parametrize(("text", "want"), [("0", 0), ("120", 120), ("007", 7), ("9" * 18, int("9" * 18))])
def test_ascii_digits_are_numbers(text: str, want: int) -> None:
    assert ascii_int(text) == want


@pytest.mark.parametrize(
    "text",
    [None, "", "-1", "1.5", " 1", "1e3", "①", "²", "١٢", "0x10", "1" * 19, "9" * 5000],  # past int()'s 4,300 digits too
)
def test_anything_else_is_none_never_an_error(text: str | None) -> None:
    assert ascii_int(text) is None
