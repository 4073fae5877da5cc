"""Periods: calendar months in an IANA zone, anniversaries clamped to short months."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

from mailmeter.policies.periods import PeriodSpec, next_period, period_containing, period_label

UTC = timezone.utc
ANNIVERSARY = PeriodSpec(kind="anniversary", timezone="UTC")


def test_subscribed_on_the_31st_renews_on_the_last_day_of_short_months() -> None:
    anchor = date(2026, 1, 31)
    january = period_containing(ANNIVERSARY, datetime(2026, 2, 10, tzinfo=UTC), anchor)
    assert (january.start, january.end) == (datetime(2026, 1, 31, tzinfo=UTC), datetime(2026, 2, 28, tzinfo=UTC))
    february = next_period(ANNIVERSARY, january, anchor)
    assert (february.start, february.end) == (datetime(2026, 2, 28, tzinfo=UTC), datetime(2026, 3, 31, tzinfo=UTC))
    march = next_period(ANNIVERSARY, february, anchor)
    assert (march.start, march.end) == (datetime(2026, 3, 31, tzinfo=UTC), datetime(2026, 4, 30, tzinfo=UTC))
    assert period_label(ANNIVERSARY, january) == "Jan 31 - Feb 27"
    assert period_label(ANNIVERSARY, february) == "Feb 28 - Mar 30"


def test_leap_february_clamps_to_the_29th() -> None:
    period = period_containing(ANNIVERSARY, datetime(2028, 2, 29, 12, tzinfo=UTC), date(2027, 10, 31))
    assert (period.start, period.end) == (datetime(2028, 2, 29, tzinfo=UTC), datetime(2028, 3, 31, tzinfo=UTC))


def test_model_d_label_dec_6_to_jan_5() -> None:
    period = period_containing(ANNIVERSARY, datetime(2025, 12, 31, 23, tzinfo=UTC), date(2025, 6, 6))
    assert period_label(ANNIVERSARY, period) == "Dec 6 - Jan 5"
    assert period.contains(datetime(2026, 1, 5, 23, 59, tzinfo=UTC))
    assert not period.contains(datetime(2026, 1, 6, tzinfo=UTC))


def test_calendar_month_in_utc_plus_8() -> None:
    spec = PeriodSpec(timezone="Asia/Shanghai")
    boundary = datetime(2026, 4, 30, 16, 0, tzinfo=UTC)
    assert period_containing(spec, boundary).start == boundary
    assert period_containing(spec, boundary - timedelta(seconds=1)).end == boundary
    assert period_label(spec, period_containing(spec, boundary)) == "May 1 - May 31"
