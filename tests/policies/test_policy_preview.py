"""`mailmeter plan preview`: one simulated period, fast at millions of emails."""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import date, datetime, timezone

import pytest

from policies.account import Standing
from policies.decision import Refusal
from policies.parts import Funding
from policies.plans import Plan
from policies.preview import preview

USD = 1_000_000
APRIL_1 = datetime(2026, 4, 1, tzinfo=timezone.utc)


def test_model_a_april_preview(plan_a: Plan) -> None:
    result = preview(plan_a, 4_150_000, APRIL_1)
    assert (result.accepted, result.refused, result.refusal) == (4_150_000, 0, None)
    assert [(t.charge.amount, t.charge.trigger_email) for t in result.charges] == [
        (250 * USD, 1_250_000),
        (250 * USD, 2_500_000),
        (250 * USD, 3_750_000),
    ]
    # 30 days spread over 4,150,000 emails: the first $250 falls on April 10
    assert [t.at.date() for t in result.charges if t.at] == [date(2026, 4, 10), date(2026, 4, 19), date(2026, 4, 28)]
    assert result.invoice.total == 80 * USD and result.invoice.invoice_date == date(2026, 5, 1)


def test_model_b_preview_credits_the_monthly_payment_and_stops_at_the_balance(plan_b: Plan) -> None:
    result = preview(plan_b, 150_000, APRIL_1)  # the $100 monthly payment: 100,000 emails
    assert (result.accepted, result.refused, result.refusal) == (100_000, 50_000, Refusal.BALANCE_EXHAUSTED)
    assert result.first_refused_at is not None and result.period.contains(result.first_refused_at)
    assert result.invoice.prepaid_applied == 100 * USD and result.invoice.prepaid_balance_after == 0
    assert result.invoice.amount_due == 0
    carried = preview(plan_b, 150_001, APRIL_1, standing=Standing(prepaid_balance=40 * USD))  # + $100 = $140
    assert (carried.accepted, carried.refused) == (150_000, 1)  # 100,000 at $1.00 and 50,000 at $0.80 per 1,000


def test_model_c_preview_splits_results(plan_c: Plan) -> None:
    result = preview(plan_c, 100_000, APRIL_1, soft_bounced=2_000, invalid=1_000)
    assert (result.usage.delivered, result.usage.soft_bounced, result.usage.hard_bounced) == (97_000, 2_000, 1_000)
    assert result.invoice.total == 29_100_000 + 200_000 + 50_000
    assert result.period_label == "Apr 1 - Apr 30"


def test_model_d_preview_runs_to_the_spending_limit(plan_d: Plan) -> None:
    result = preview(plan_d, 250_000, datetime(2025, 12, 6, tzinfo=timezone.utc))
    assert result.period_label == "Dec 6 - Jan 5"
    assert (result.accepted, result.refusal) == (200_033, Refusal.SPENDING_LIMIT)
    assert len(result.charges) == 599
    assert all(t.charge.emails_unlocked == 167 for t in result.charges)
    assert result.invoice.total == 99 * USD


def test_model_e_preview(plan_e: Plan) -> None:
    result = preview(plan_e, 51_200, APRIL_1)
    assert [(t.charge.key, t.charge.amount) for t in result.charges] == [("block/1", USD)]
    assert result.invoice.lines[0].description == "Email overage: 1,200 emails. Cost: $1"


def test_threshold_charges_free_overdraft_room_so_the_preview_steps_between_them(plan_a: Plan) -> None:
    # A postpaid account with a $300 overdraft: each $250 paid in the month frees room.
    capped = replace(plan_a, funding=Funding(kind="postpaid", overdraft_allowance=300 * USD))
    result = preview(capped, 4_150_000, APRIL_1)
    assert (result.accepted, result.refusal) == (4_150_000, None)
    tight = replace(plan_a, funding=Funding(kind="postpaid", overdraft_allowance=100 * USD))
    stuck = preview(tight, 4_150_000, APRIL_1)
    assert (stuck.accepted, stuck.refusal, stuck.charges) == (500_000, Refusal.OVERDRAFT_LIMIT, ())


@pytest.mark.parametrize(
    "name", ["per-email-threshold", "prepaid-tiered", "delivery-results", "included-capped", "limit-overage"]
)
def test_millions_of_emails_preview_in_well_under_a_second(five_plans: dict[str, Plan], name: str) -> None:
    started = time.perf_counter()
    result = preview(
        five_plans[name], 20_000_000, APRIL_1, standing=Standing(prepaid_balance=10_000 * USD), soft_bounced=100_000
    )
    assert time.perf_counter() - started < 1.0
    assert result.accepted + result.refused == 20_000_000
