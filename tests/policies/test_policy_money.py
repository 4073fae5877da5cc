"""Money: exact parsing into micros, half-up rounding to cents once per line, display."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policies.money import MoneyError, display_money, floor_to_cents, parse_money, round_half_up_to_cents


@pytest.mark.parametrize(
    ("text", "micros"),
    [
        ("0.0002", 200),
        ("0.20", 200_000),
        ("250", 250_000_000),
        ("$1,250.50", 1_250_500_000),
        (599, 599_000_000),
        ("-1.5", -1_500_000),
    ],
)
def test_parse_money_is_exact(text: str | int, micros: int) -> None:
    assert parse_money(text) == micros


@pytest.mark.parametrize("bad", [0.2, True, "abc", "0.0000001", "nan", "inf"])
def test_parse_money_refuses_floats_garbage_and_sub_micro_precision(bad: object) -> None:
    with pytest.raises(MoneyError):
        parse_money(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("micros", "cents"),
    [(5_000, 1), (4_999, 0), (15_000, 2), (25_000, 3), (-5_000, -1), (-4_999, 0), (199_999_800, 20_000), (0, 0)],
)
def test_round_half_up_to_cents(micros: int, cents: int) -> None:
    # half-up (away from zero), not Decimal's default half-even: 0.025 -> 0.03
    assert round_half_up_to_cents(micros) == cents * 10_000


@given(st.integers(min_value=-(10**15), max_value=10**15))
def test_round_half_up_matches_decimal_round_half_up(micros: int) -> None:
    expected = (Decimal(micros) / 10_000).quantize(Decimal(1), rounding=ROUND_HALF_UP) * 10_000
    assert round_half_up_to_cents(micros) == int(expected)
    assert abs(round_half_up_to_cents(micros) - micros) <= 5_000


@given(st.integers(min_value=-(10**15), max_value=10**15))
def test_floor_to_cents_never_exceeds(micros: int) -> None:
    floored = floor_to_cents(micros)
    assert floored <= micros < floored + 10_000 and floored % 10_000 == 0


@pytest.mark.parametrize(
    ("micros", "text"),
    [
        (1_000_000, "$1"),
        (214_000_000, "$214"),
        (1_250_000_000, "$1,250"),
        (9_990_000, "$9.99"),
        (1_500_000, "$1.50"),
        (200, "$0.0002"),
        (50, "$0.00005"),
        (-750_000_000, "-$750"),
    ],
)
def test_display_money(micros: int, text: str) -> None:
    assert display_money(micros) == text


@given(st.integers(min_value=-(10**12), max_value=10**12))
def test_display_round_trips(micros: int) -> None:
    assert parse_money(display_money(micros).replace("$", "")) == micros


def test_money_text_must_be_plain_decimal() -> None:
    import pytest

    from policies.money import MoneyError, parse_money

    assert parse_money("$1,000.50") == 1_000_500_000
    for text in ("1.5e3", "NaN", "Infinity", "1.", ".5", "12,34.5.6", ""):
        with pytest.raises(MoneyError):
            parse_money(text)
