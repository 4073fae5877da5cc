"""Billing periods: calendar months in an IANA time zone, or subscription anniversaries.

A period is a half-open interval [start, end) of aware UTC datetimes. Anniversary
periods start on the subscription day of each month, clamped to the month's last
day for days 29-31 (a subscription on Jan 31 renews on Feb 28 or 29, then Mar 31).
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from functools import cached_property
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

PeriodKind = Literal["calendar_month", "anniversary"]


@dataclass(frozen=True)
class PeriodSpec:
    """How a plan cuts time into billing periods."""

    kind: PeriodKind = "calendar_month"
    timezone: str = "UTC"

    def zone(self) -> ZoneInfo:
        try:
            return ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown IANA time zone {self.timezone!r}") from None


@dataclass(frozen=True)
class Period:
    """One billing period: [start, end) in UTC, and a stable key for storage."""

    start: datetime
    end: datetime

    @cached_property  # a period is asked for its key on every message
    def key(self) -> str:
        return self.start.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

    def contains(self, instant: datetime) -> bool:
        return self.start <= instant < self.end


def _clamped(year: int, month: int, day: int) -> date:
    last = calendar.monthrange(year, month)[1]
    return date(year, month, min(day, last))


def _add_months(year: int, month: int, delta: int) -> tuple[int, int]:
    index = year * 12 + (month - 1) + delta
    return index // 12, index % 12 + 1


def _local_midnight(day: date, zone: ZoneInfo) -> datetime:
    return datetime.combine(day, time(0, 0), tzinfo=zone).astimezone(timezone.utc)


def period_containing(spec: PeriodSpec, instant: datetime, anchor: date | None = None) -> Period:
    """The period that contains `instant` (aware). `anchor` is the subscription day,
    needed for anniversary periods."""
    if instant.tzinfo is None:
        raise ValueError("instant must be timezone-aware")
    zone = spec.zone()
    local = instant.astimezone(zone)
    if spec.kind == "calendar_month":
        start_day = date(local.year, local.month, 1)
        ny, nm = _add_months(local.year, local.month, 1)
        return Period(_local_midnight(start_day, zone), _local_midnight(date(ny, nm, 1), zone))
    if anchor is None:
        raise ValueError("anniversary periods need the subscription day (anchor)")
    day = anchor.day
    start_day = _clamped(local.year, local.month, day)
    y, m = local.year, local.month
    if local.date() < start_day:
        y, m = _add_months(local.year, local.month, -1)
        start_day = _clamped(y, m, day)
    ny, nm = _add_months(y, m, 1)
    return Period(_local_midnight(start_day, zone), _local_midnight(_clamped(ny, nm, day), zone))


def next_period(spec: PeriodSpec, period: Period, anchor: date | None = None) -> Period:
    return period_containing(spec, period.end, anchor)


def period_label(spec: PeriodSpec, period: Period) -> str:
    """Human label like 'Dec 6 - Jan 5' in the plan's zone (the end day is inclusive)."""
    zone = spec.zone()
    first = period.start.astimezone(zone)
    last = (period.end - timedelta(microseconds=1)).astimezone(zone)
    return f"{first:%b} {first.day} - {last:%b} {last.day}"
