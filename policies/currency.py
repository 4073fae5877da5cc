"""The billing currency: its ISO 4217 code, minor units and the symbol people read.

One currency for all plans (`billing.currency`). Its minor units say how amounts are
written and rounded: USD has cents (2 digits), JPY none, BHD three (fils). Money
stays integer micros (1 unit = 1,000,000) whatever the currency, so every minor unit
of every ISO 4217 currency is a whole number of micros.
"""

from __future__ import annotations

from dataclasses import dataclass

MICROS_PER_UNIT = 1_000_000


@dataclass(frozen=True)
class Currency:
    """code: ISO 4217 ("USD"); minor_units: digits after the decimal point (USD 2, JPY 0,
    BHD 3); symbol: what amounts are prefixed with when people read them ("$", or the
    code and a space for currencies whose symbol is shared or not plain text)."""

    code: str
    minor_units: int
    symbol: str

    @property
    def minor(self) -> int:
        """Micros in one minor unit: 10,000 for USD's cent, 1,000,000 for JPY, 1,000 for BHD."""
        micros: int = 10 ** (6 - self.minor_units)
        return micros

    @property
    def smallest(self) -> str:
        """The minor unit as a decimal: "0.01", "1", "0.001"."""
        return "1" if self.minor_units == 0 else "0." + "0" * (self.minor_units - 1) + "1"


# ISO 4217 active codes (2025). Most have two minor digits; these have others.
_MINOR_UNITS = {
    **dict.fromkeys("BIF CLP DJF GNF ISK JPY KMF KRW PYG RWF UGX UYI VND VUV XAF XOF XPF".split(), 0),
    **dict.fromkeys("BHD IQD JOD KWD LYD OMR TND".split(), 3),
    **dict.fromkeys("CLF UYW".split(), 4),
}
_TWO_DIGITS = (
    "AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BMD BND BOB BOV BRL BSD BTN BWP BYN BZD"
    " CAD CDF CHE CHF CHW CNY COP COU CRC CUP CVE CZK DKK DOP DZD EGP ERN ETB EUR FJD FKP GBP GEL GHS"
    " GIP GMD GTQ GYD HKD HNL HTG HUF IDR ILS INR IRR JMD KES KGS KHR KPW KYD KZT LAK LBP LKR LRD LSL"
    " MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MXV MYR MZN NAD NGN NIO NOK NPR NZD PAB PEN PGK"
    " PHP PKR PLN QAR RON RSD RUB SAR SBD SCR SDG SEK SGD SHP SLE SOS SRD SSP STN SVC SYP SZL THB TJS"
    " TMT TOP TRY TTD TWD TZS UAH USD USN UYU UZS VED VES WST XCD XCG YER ZAR ZMW ZWG"
)
MINOR_UNITS: dict[str, int] = {**dict.fromkeys(_TWO_DIGITS.split(), 2), **_MINOR_UNITS}

# Symbols only where one currency owns them in practice; others show their code.
_SYMBOLS = {"USD": "$", "EUR": "€", "GBP": "£", "JPY": "¥"}


def currency_for(code: str) -> Currency:
    """The currency of an ISO 4217 code (any case); ValueError for a code that is not one."""
    normalized = code.strip().upper()
    minor_units = MINOR_UNITS.get(normalized)
    if minor_units is None:
        raise ValueError(f"{code!r} is not an ISO 4217 currency code (like USD, EUR, JPY, BHD)")
    return Currency(normalized, minor_units, _SYMBOLS.get(normalized, normalized + " "))


USD = currency_for("USD")

__all__ = ["MINOR_UNITS", "USD", "Currency", "currency_for"]
