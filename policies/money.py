"""Money as integer micro-units (1 unit of currency = 1,000,000 micros).

Floats never touch money: parsing goes through Decimal from the text and
rounding is explicit half-up (Decimal's default is half-even).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

MICROS_PER_UNIT = 1_000_000
MICROS_PER_CENT = 10_000
_PLAIN_DECIMAL = re.compile(r"-?[0-9]+(\.[0-9]+)?")


class MoneyError(ValueError):
    """A money amount that cannot be represented exactly in micro-units."""


def parse_money(text: str | int) -> int:
    """Parse "12.34", "0.0002" or an int of whole units into micros, exactly.

    Raises MoneyError for floats, garbage, or more precision than one micro.
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
    micros = amount * MICROS_PER_UNIT
    if micros != micros.to_integral_value():
        raise MoneyError(f"{text!r} has more precision than one micro-unit (0.000001)")
    return int(micros)


def round_half_up_to_cents(micros: int) -> int:
    """Round micros to whole cents, half away from zero (the invoice-line rule)."""
    sign = -1 if micros < 0 else 1
    magnitude = abs(micros)
    cents, remainder = divmod(magnitude, MICROS_PER_CENT)
    if remainder * 2 >= MICROS_PER_CENT:
        cents += 1
    return sign * cents * MICROS_PER_CENT


def format_money(micros: int, places: int = 2) -> str:
    """Format micros as a decimal string; exact (no rounding) unless places cuts digits.

    With places=2 the amount must already be whole cents, or the full precision is shown.
    """
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), MICROS_PER_UNIT)
    frac_text = f"{frac:06d}"
    trimmed = frac_text.rstrip("0")
    if len(trimmed) < places:
        trimmed = trimmed.ljust(places, "0")
    if not trimmed:
        return f"{sign}{whole}"
    return f"{sign}{whole}.{trimmed}"


def floor_to_cents(micros: int) -> int:
    """Round micros down (toward minus infinity) to whole cents.

    Used where a sub-cent remainder must stay put rather than be spent, e.g. the part
    of a prepaid balance that can settle an invoice line (lines are whole cents).
    """
    return (micros // MICROS_PER_CENT) * MICROS_PER_CENT


def is_whole_cents(micros: int) -> bool:
    """True when an amount can be charged to a card as it is (no fraction of a cent)."""
    return micros % MICROS_PER_CENT == 0


def display_money(micros: int, symbol: str = "$") -> str:
    """Money as people read it on an invoice or a dashboard: "$1", "$1,250", "$9.99", "$0.0002".

    Whole amounts drop the cents (the documents write "Cost: $1", "$214 spent"); other
    amounts show at least two decimals and as many more as needed to stay exact, so
    a per-email price like $0.0002 is never shown rounded to $0.00.
    """
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), MICROS_PER_UNIT)
    if frac == 0:
        return f"{sign}{symbol}{whole:,}"
    digits = f"{frac:06d}".rstrip("0").ljust(2, "0")
    return f"{sign}{symbol}{whole:,}.{digits}"
