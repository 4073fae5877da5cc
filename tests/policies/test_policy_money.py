"""Money: exact parsing into micros, half-up rounding to the currency's minor unit once
per line, formatting and display in USD (cents), JPY (no minor unit) and BHD (fils)."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailmeter.policies.currency import USD, Currency, currency_for
from mailmeter.policies.money import (
    MoneyError,
    display_money,
    floor_to_minor,
    format_money,
    is_whole_minor,
    parse_money,
    round_half_up,
)

JPY = currency_for("JPY")
BHD = currency_for("BHD")
CURRENCIES = st.sampled_from([USD, JPY, BHD, currency_for("CLF")])


def test_minor_units_come_from_iso_4217() -> None:
    assert [(c.code, c.minor_units, c.minor, c.smallest) for c in (USD, JPY, BHD)] == [
        ("USD", 2, 10_000, "0.01"),
        ("JPY", 0, 1_000_000, "1"),
        ("BHD", 3, 1_000, "0.001"),
    ]
    assert currency_for("eur").code == "EUR" and currency_for("KWD").minor_units == 3
    for bad in ("US", "XYZ", "dollar", ""):
        with pytest.raises(ValueError, match="not an ISO 4217 currency code"):
            currency_for(bad)


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
    ("currency", "good", "bad"),
    [
        (USD, {"25": 25_000_000, "25.5": 25_500_000, "25.01": 25_010_000}, ["25.001", "0.0002"]),
        (JPY, {"2500": 2_500_000_000, "1,000": 1_000_000_000}, ["2500.0", "25.5", "0.5"]),
        (BHD, {"25.125": 25_125_000, "25.12": 25_120_000, "7": 7_000_000}, ["25.0001", "0.0005"]),
    ],
)
def test_an_amount_of_a_currency_has_at_most_its_minor_digits(
    currency: Currency, good: dict[str, int], bad: list[str]
) -> None:
    for text, micros in good.items():
        assert parse_money(text, currency) == micros
    for text in bad:
        with pytest.raises(MoneyError, match=f"more decimals than {currency.code} has"):
            parse_money(text, currency)


@pytest.mark.parametrize(
    ("micros", "cents"),
    [(5_000, 1), (4_999, 0), (15_000, 2), (25_000, 3), (-5_000, -1), (-4_999, 0), (199_999_800, 20_000), (0, 0)],
)
def test_round_half_up_to_cents(micros: int, cents: int) -> None:
    # half-up (away from zero), not Decimal's default half-even: 0.025 -> 0.03
    assert round_half_up(micros, USD) == cents * 10_000


@pytest.mark.parametrize(
    ("currency", "micros", "rounded"),
    [
        (JPY, 500_000, 1_000_000),  # ¥0.5 -> ¥1
        (JPY, 2_499_999, 2_000_000),
        (JPY, -1_500_000, -2_000_000),
        (BHD, 1_500, 2_000),  # 1.5 fils -> 2 fils
        (BHD, 1_499, 1_000),
        (BHD, 25_125_400, 25_125_000),
    ],
)
def test_round_half_up_to_the_minor_unit(currency: Currency, micros: int, rounded: int) -> None:
    assert round_half_up(micros, currency) == rounded
    assert is_whole_minor(rounded, currency) and (rounded == micros or not is_whole_minor(micros, currency))


@given(st.integers(min_value=-(10**15), max_value=10**15), CURRENCIES)
def test_round_half_up_matches_decimal_round_half_up(micros: int, currency: Currency) -> None:
    expected = (Decimal(micros) / currency.minor).quantize(Decimal(1), rounding=ROUND_HALF_UP) * currency.minor
    assert round_half_up(micros, currency) == int(expected)
    assert abs(round_half_up(micros, currency) - micros) <= currency.minor // 2


@given(st.integers(min_value=-(10**15), max_value=10**15), CURRENCIES)
def test_floor_to_minor_never_exceeds(micros: int, currency: Currency) -> None:
    floored = floor_to_minor(micros, currency)
    assert floored <= micros < floored + currency.minor and floored % currency.minor == 0


@pytest.mark.parametrize(
    ("currency", "micros", "text"),
    [
        (USD, 25_000_000, "25.00"),
        (USD, 200, "0.0002"),
        (USD, -1_500_000, "-1.50"),
        (JPY, 2_500_000_000, "2500"),
        (JPY, 500_000, "0.5"),
        (BHD, 25_000_000, "25.000"),
        (BHD, 1_250_000, "1.250"),
        (BHD, 100, "0.0001"),
    ],
)
def test_format_money_writes_the_minor_digits(currency: Currency, micros: int, text: str) -> None:
    assert format_money(micros, currency) == text


@pytest.mark.parametrize(
    ("currency", "micros", "text"),
    [
        (USD, 1_000_000, "$1"),
        (USD, 214_000_000, "$214"),
        (USD, 1_250_000_000, "$1,250"),
        (USD, 9_990_000, "$9.99"),
        (USD, 1_500_000, "$1.50"),
        (USD, 200, "$0.0002"),
        (USD, 50, "$0.00005"),
        (USD, -750_000_000, "-$750"),
        (JPY, 2_500_000_000, "¥2,500"),
        (JPY, 30_000, "¥0.03"),
        (BHD, 25_000_000, "BHD 25"),
        (BHD, 1_250_000, "BHD 1.250"),
        (BHD, 1_255_500, "BHD 1.2555"),
        (currency_for("EUR"), 9_990_000, "€9.99"),
        (currency_for("CAD"), 9_990_000, "CAD 9.99"),
    ],
)
def test_display_money(currency: Currency, micros: int, text: str) -> None:
    assert display_money(micros, currency) == text


def test_display_money_can_keep_the_minor_digits_of_whole_amounts() -> None:
    assert display_money(80_000_000, USD, short_whole=False) == "$80.00"
    assert display_money(2_500_000_000, JPY, short_whole=False) == "¥2,500"
    assert display_money(25_000_000, BHD, short_whole=False) == "BHD 25.000"


@given(st.integers(min_value=-(10**12), max_value=10**12), CURRENCIES)
def test_format_and_display_round_trip(micros: int, currency: Currency) -> None:
    assert parse_money(format_money(micros, currency)) == micros
    shown = display_money(micros, currency).replace(currency.symbol.strip(), "").replace(" ", "")
    assert parse_money(shown) == micros
    if is_whole_minor(micros, currency):  # what an API client may send back is what it was given
        assert parse_money(format_money(micros, currency), currency) == micros


def test_money_text_must_be_plain_decimal() -> None:
    assert parse_money("$1,000.50") == 1_000_500_000
    for text in ("1.5e3", "NaN", "Infinity", "1.", ".5", "12,34.5.6", ""):
        with pytest.raises(MoneyError):
            parse_money(text)
