"""Sending rates: at most N recipients per second, minute, hour or day, for an account.

A rate is written `100/minute` (also `/second`, `/hour`, `/day`), on a plan (`sending_rate`)
or on one account (`mailmeter account rate`). It is counted in fixed windows aligned to the
Unix epoch (a minute starts at :00, a day at UTC midnight), as Postfix's anvil counts its
rates: every window admits at most `limit` recipients. The store keeps one counter per
account and window and decides in the same transaction as the hold (metering/), so the
count is exact however many processes or nodes share it.

Pure: `now` is given as seconds since the epoch.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

UNITS: dict[str, int] = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}

# An account's own setting besides a rate: the plan's rate applies (`none`), or no rate at all.
PLAN_RATE = "none"
UNLIMITED = "unlimited"

_RATE = re.compile(r"^\s*(\d{1,9})\s*/\s*(second|minute|hour|day)s?\s*$", re.IGNORECASE)


class RateError(ValueError):
    """Text that is not a sending rate; the message says how to write one."""


@dataclass(frozen=True)
class SendRate:
    """At most `limit` recipients per `unit` window."""

    limit: int
    unit: str

    @property
    def seconds(self) -> int:
        return UNITS[self.unit]

    def __str__(self) -> str:
        return f"{self.limit}/{self.unit}"

    def window_start(self, now: float) -> int:
        """The start (epoch seconds) of the window `now` is in."""
        return int(now // self.seconds) * self.seconds

    def retry_after(self, now: float) -> int:
        """Whole seconds until the next window starts (at least 1)."""
        return max(1, math.ceil(self.window_start(now) + self.seconds - now))


def parse_rate(text: str) -> SendRate:
    """`100/minute` -> SendRate(100, "minute"); raises RateError otherwise."""
    match = _RATE.match(text) if isinstance(text, str) else None
    if match is None or int(match.group(1)) < 1:
        raise RateError(
            f"{text!r} is not a sending rate; write it like 100/minute (a whole number of at least 1"
            " per second, minute, hour or day)"
        )
    return SendRate(int(match.group(1)), match.group(2).lower())


def check_account_rate(text: str) -> str:
    """An account's own rate setting, normalized: `N/unit`, `none` (the plan's) or `unlimited`."""
    word = text.strip().lower() if isinstance(text, str) else text
    if word in (PLAN_RATE, UNLIMITED):
        return str(word)
    try:
        return str(parse_rate(text))
    except RateError as error:
        raise RateError(f"{error}; or none (the plan's rate applies) or unlimited (no rate)") from None


def rate_in_force(plan_rate: SendRate | None, own: str | None) -> SendRate | None:
    """The rate that applies: the account's own (`unlimited`: none), else the plan's."""
    if own is None or own == PLAN_RATE:
        return plan_rate
    if own == UNLIMITED:
        return None
    return parse_rate(own)


def admit_rate(rate: SendRate, used: int, requested: int) -> int:
    """How many of `requested` recipients fit in the window, `used` of it already taken."""
    return max(0, min(requested, rate.limit - used))


__all__ = [
    "PLAN_RATE",
    "UNITS",
    "UNLIMITED",
    "RateError",
    "SendRate",
    "admit_rate",
    "check_account_rate",
    "parse_rate",
    "rate_in_force",
]
