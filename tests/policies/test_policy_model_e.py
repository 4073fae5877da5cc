"""Model E (seeds/004): 50,000 a month, $1 per started 5,000 over, charged at once."""

from __future__ import annotations

from datetime import datetime, timezone

from mailmeter.policies.account import Standing, Usage
from mailmeter.policies.charges import charges_due
from mailmeter.policies.dashboard import usage_alerts_due, usage_screen
from mailmeter.policies.decision import Refusal, admit, blocking_refusal
from mailmeter.policies.invoice import close_period
from mailmeter.policies.limits import LimitChange, limit_in_effect
from mailmeter.policies.periods import next_period, period_containing
from mailmeter.policies.plans import Plan

USD = 1_000_000
MID_APRIL = datetime(2026, 4, 15, tzinfo=timezone.utc)


def over(emails: int) -> Usage:
    return Usage(accepted=50_000 + emails)


def test_51_200_of_50_000_is_one_dollar_and_the_invoice_line_reads_as_the_document(plan_e: Plan) -> None:
    charges = charges_due(plan_e, Standing(), Usage(accepted=51_200))
    assert [(c.key, c.amount, c.trigger_email) for c in charges] == [("block/1", USD, 50_001)]
    period = period_containing(plan_e.period, MID_APRIL)
    invoice = close_period(plan_e, Standing(), Usage(accepted=51_200), period, charges)
    assert invoice.lines[0].description == "Email overage: 1,200 emails. Cost: $1"
    assert invoice.lines[0].amount == USD
    assert invoice.total == 0  # the $1 was charged immediately; overage does not roll over


def test_started_blocks_of_5_000(plan_e: Plan) -> None:
    def dollars(emails_over: int) -> int:
        return sum(c.amount for c in charges_due(plan_e, Standing(), over(emails_over))) // USD

    assert [dollars(n) for n in (0, 1, 5_000, 5_001, 10_000, 10_001, 15_000)] == [0, 1, 1, 2, 2, 3, 3]


def test_overage_never_stops_sending(plan_e: Plan) -> None:
    admission = admit(plan_e, Standing(), over(1_000_000), 1_000)
    assert (admission.granted, admission.refusal) == (1_000, None)


def test_failed_payment_blocks_at_once_and_an_update_releases_at_once(plan_e: Plan) -> None:
    failed = Standing(payment_ok=False)
    assert blocking_refusal(failed) is Refusal.PAYMENT_FAILED
    assert admit(plan_e, failed, Usage(accepted=10), 1).refusal is Refusal.PAYMENT_FAILED
    fixed = Standing(payment_ok=True)
    assert blocking_refusal(fixed) is None
    assert admit(plan_e, fixed, Usage(accepted=10), 1).granted == 1


def test_limit_increase_applies_at_once(plan_e: Plan) -> None:
    april = period_containing(plan_e.period, MID_APRIL)
    change = LimitChange(previous=50_000, new=60_000, changed_at=MID_APRIL)
    assert change.value_during(april) == 60_000
    assert change.value_during(next_period(plan_e.period, april)) == 60_000
    raised = Standing(included_emails_override=change.value_during(april))
    assert charges_due(plan_e, raised, Usage(accepted=59_000)) == []
    assert len(charges_due(plan_e, raised, Usage(accepted=60_001))) == 1


def test_limit_decrease_keeps_the_higher_limit_until_the_period_ends(plan_e: Plan) -> None:
    april = period_containing(plan_e.period, MID_APRIL)
    may = next_period(plan_e.period, april)
    change = LimitChange(previous=50_000, new=40_000, changed_at=MID_APRIL)
    assert change.value_during(april) == 50_000
    assert change.value_during(may) == 40_000
    before = period_containing(plan_e.period, datetime(2026, 3, 10, tzinfo=timezone.utc))
    assert change.value_during(before) == 50_000
    assert limit_in_effect(50_000, 40_000, changed_in_this_period=True) == 50_000
    assert limit_in_effect(50_000, 40_000, changed_in_this_period=False) == 40_000
    assert limit_in_effect(50_000, None, changed_in_this_period=True) is None  # None = unlimited
    kept = Standing(included_emails_override=change.value_during(april))
    assert charges_due(plan_e, kept, Usage(accepted=45_000)) == []


def test_usage_alerts_at_75_90_100_percent_each_once(plan_e: Plan) -> None:
    def alerts(sent: int) -> list[str]:
        return [a.key for a in usage_alerts_due(plan_e, Standing(), Usage(accepted=sent))]

    assert alerts(37_499) == []
    assert alerts(37_500) == ["alert/75"]
    assert alerts(45_000) == ["alert/75", "alert/90"]
    assert alerts(50_000) == ["alert/75", "alert/90", "alert/100"]


def test_dashboard_shows_limit_sent_and_remaining(plan_e: Plan) -> None:
    period = period_containing(plan_e.period, MID_APRIL)
    screen = usage_screen(plan_e, Standing(), Usage(accepted=30_000), period)
    assert (screen.total_allowed, screen.emails_sent, screen.remaining) == (50_000, 30_000, 20_000)
