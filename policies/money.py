"""Money as integer micro-units (1 unit of currency = 1,000,000 micros), in one currency.

Floats never touch money: parsing goes through Decimal from the text and rounding is
explicit half-up (Decimal's default is half-even). Every function that rounds, checks
or writes an amount takes the currency (policies/currency.py), whose minor units say
how: USD rounds to the cent and writes "25.00", JPY to the yen and writes "2500", BHD
to the fils and writes "25.000".
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from mailmeter.policies.currency import MICROS_PER_UNIT, USD, Currency

_PLAIN_DECIMAL = re.compile(r"-?[0-9]+(\.[0-9]+)?")

__all__ = [
    "MICROS_PER_UNIT",
    "USD",
    "Currency",
    "MoneyError",
    "display_money",
    "floor_to_minor",
    "format_money",
    "is_whole_minor",
    "parse_money",
    "round_half_up",
]


class MoneyError(ValueError):
    """A money amount that cannot be represented exactly (in micros, or in the currency)."""


def parse_money(text: str | int, currency: Currency | None = None) -> int:
    """Parse "12.34", "0.0002" or an int of whole units into micros, exactly.

    With a currency, refuse more decimals than it has ("25.001" in USD, "25.5" in JPY):
    what an operator or API client writes is an amount of that currency. Without one,
    anything down to one micro. Raises MoneyError for floats, garbage, or more precision.
    """
    if isinstance(text, bool) or isinstance(text, float):
        raise MoneyError(f"money must be given as a string or integer, not {type(text).__name__}")
    if isinstance(text, int):
        return text * MICROS_PER_UNIT
    cleaned = str(text).strip().lstrip("$").replace(",", "").replace("_", "")
    if not _PLAIN_DECIMAL.fullmatch(cleaned):
        # Decimal would also take "1.5e3", "NaN" or "Infinity": an operator never means those.
        raise MoneyError(f"{text!r} is not an amount of money (write it like 12.34)")
    try:
        amount = Decimal(cleaned)
    except InvalidOperation:
        raise MoneyError(f"{text!r} is not an amount of money (write it like 12.34)") from None
    if not amount.is_finite():
        raise MoneyError(f"{text!r} is not a finite amount of money")
    decimals = len(cleaned.partition(".")[2])
    if currency is not None and decimals > currency.minor_units:
        raise MoneyError(
            f"{text!r} has more decimals than {currency.code} has ({currency.minor_units or 'none'}):"
            f" write it like {format_money(25 * MICROS_PER_UNIT, currency)}"
        )
    micros = amount * MICROS_PER_UNIT
    if micros != micros.to_integral_value():
        raise MoneyError(f"{text!r} has more precision than one micro-unit (0.000001)")
    return int(micros)


def round_half_up(micros: int, currency: Currency) -> int:
    """Round micros to whole minor units of the currency, half away from zero (the invoice-line rule)."""
    sign = -1 if micros < 0 else 1
    units, remainder = divmod(abs(micros), currency.minor)
    if remainder * 2 >= currency.minor:
        units += 1
    return sign * units * currency.minor


def floor_to_minor(micros: int, currency: Currency) -> int:
    """Round micros down (toward minus infinity) to whole minor units.

    Used where a remainder below the minor unit must stay put rather than be spent, e.g.
    the part of a prepaid balance that can settle an invoice line (lines are whole units).
    """
    return (micros // currency.minor) * currency.minor


def is_whole_minor(micros: int, currency: Currency) -> bool:
    """True when an amount can be charged as it is (no fraction of the minor unit)."""
    return micros % currency.minor == 0


def _digits(micros: int, currency: Currency) -> tuple[str, int, str]:
    """(sign, whole units, fraction digits): the minor units' digits, more only to stay exact."""
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), MICROS_PER_UNIT)
    fraction = f"{frac:06d}".rstrip("0").ljust(currency.minor_units, "0")
    return sign, whole, fraction


def format_money(micros: int, currency: Currency) -> str:
    """The amount as a plain decimal string in the currency's minor units: "25.00" (USD),
    "2500" (JPY), "25.000" (BHD); more digits only where the amount is finer (a
    per-email price "0.0002"), so it is always exact. For JSON, the API, CSV."""
    sign, whole, fraction = _digits(micros, currency)
    return f"{sign}{whole}.{fraction}" if fraction else f"{sign}{whole}"


def display_money(micros: int, currency: Currency, short_whole: bool = True) -> str:
    """Money as people read it on an invoice, a dashboard or a notice: "$1", "$1,250",
    "$9.99", "$0.0002", "¥2,500", "BHD 1.250".

    Whole amounts drop the minor digits (the documents write "Cost: $1", "$214 spent")
    unless `short_whole` is False ("$80.00", for statements); other amounts show the
    currency's minor digits and as many more as needed to stay exact, so a per-email
    price like $0.0002 is never shown rounded to $0.00.
    """
    sign, whole, fraction = _digits(micros, currency)
    if not fraction or (short_whole and not fraction.strip("0")):
        return f"{sign}{currency.symbol}{whole:,}"
    return f"{sign}{currency.symbol}{whole:,}.{fraction}"
