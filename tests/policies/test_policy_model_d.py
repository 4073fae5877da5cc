"""Model D (seeds/003): "Pro 100k": 100,000 included, each $1 unlocks 167, $599 spending limit."""

from __future__ import annotations

from datetime import date, datetime, timezone

from mailmeter.policies.account import Standing, Usage
from mailmeter.policies.charges import charges_due
from mailmeter.policies.dashboard import usage_screen
from mailmeter.policies.decision import Refusal, admit, headroom
from mailmeter.policies.invoice import close_period
from mailmeter.policies.periods import period_containing
from mailmeter.policies.plans import Plan

USD = 1_000_000
SUBSCRIBED = date(2025, 12, 6)
IN_PERIOD = datetime(2025, 12, 20, 12, 0, tzinfo=timezone.utc)
AT_135_640 = Usage(accepted=135_640, delivered=135_640)


def test_the_usage_screen_reads_exactly_as_the_document(plan_d: Plan) -> None:
    period = period_containing(plan_d.period, IN_PERIOD, SUBSCRIBED)
    screen = usage_screen(plan_d, Standing(), AT_135_640, period)
    assert screen.rows() == (
        "Pro 100k",
        "Dec 6 - Jan 5",
        "35,738 extra emails",
        "135,640 emails sent",
        "135,738 total allowed",
        "$214 spent",
        "$599 spending limit",
        "98 emails remaining",
    )
    assert (screen.extra_emails, screen.total_allowed, screen.remaining) == (35_738, 135_738, 98)
    assert (screen.spent, screen.spending_limit) == (214 * USD, 599 * USD)


def test_214_charges_of_1_dollar_each_unlocking_167(plan_d: Plan) -> None:
    charges = charges_due(plan_d, Standing(), AT_135_640)
    assert len(charges) == 214
    assert [c.index for c in charges] == list(range(1, 215))
    assert len({c.key for c in charges}) == 214
    assert all(c.amount == USD and c.emails_unlocked == 167 for c in charges)
    assert charges[0].trigger_email == 100_001
    assert charges[-1].trigger_email == 100_000 + 213 * 167 + 1


def test_email_135_739_triggers_charge_215(plan_d: Plan) -> None:
    assert len(charges_due(plan_d, Standing(), Usage(accepted=135_738))) == 214
    after = charges_due(plan_d, Standing(), Usage(accepted=135_739), after_index=214)
    assert [(c.key, c.amount, c.trigger_email) for c in after] == [("block/215", USD, 135_739)]
    assert after[0].description == "Usage charge 215: $1 for 167 more emails (emails 135,739 to 135,905 of the period)"


def test_the_spending_limit_allows_at_most_599_x_167_extra_then_refuses(plan_d: Plan) -> None:
    assert 599 * 167 == 100_033
    assert headroom(plan_d, Standing(), Usage()) == (200_033, Refusal.SPENDING_LIMIT)
    last = admit(plan_d, Standing(), Usage(accepted=200_032), 1)
    assert (last.granted, last.refusal, last.remaining) == (1, None, 0)
    paused = admit(plan_d, Standing(), Usage(accepted=200_033), 1)
    assert (paused.granted, paused.refusal) == (0, Refusal.SPENDING_LIMIT)
    assert len(charges_due(plan_d, Standing(), Usage(accepted=200_033))) == 599


def test_raising_the_spending_limit_resumes_sending(plan_d: Plan) -> None:
    raised = Standing(spending_limit_override=700 * USD)
    resumed = admit(plan_d, raised, Usage(accepted=200_033), 10)
    assert (resumed.granted, resumed.refusal) == (10, None)
    assert headroom(plan_d, raised, Usage(accepted=200_033))[0] == 101 * 167


def test_the_period_invoice_is_the_fee_with_the_increments_already_paid(plan_d: Plan) -> None:
    period = period_containing(plan_d.period, IN_PERIOD, SUBSCRIBED)
    invoice = close_period(plan_d, Standing(), AT_135_640, period)
    assert [(line.description, line.amount) for line in invoice.lines] == [
        ("Plan fee: Pro 100k", 99 * USD),
        ("Email overage: 35,640 emails. Cost: $214", 214 * USD),
        ("Charged during the period: 214 usage charges", -214 * USD),
    ]
    assert invoice.total == 99 * USD
    assert invoice.invoice_date == date(2026, 1, 6)
