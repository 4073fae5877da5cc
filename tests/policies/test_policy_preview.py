"""`mailmeter plan preview`: one simulated period, fast at millions of emails."""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import date, datetime, timezone

import pytest

from mailmeter.policies.account import Standing
from mailmeter.policies.decision import Refusal
from mailmeter.policies.parts import Funding
from mailmeter.policies.plans import Plan
from mailmeter.policies.preview import ScriptEvent, preview

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


# -- a preview from a balance, through scripted events ----------------------------------


def test_model_b_preview_from_a_balance_with_a_top_up_after_the_refusals(plan_b: Plan) -> None:
    """The month's $100.00 payment, credited as the period starts, is good for 100,000 emails:
    100,000 accepted, 100,001 refused, until a $10.00 top-up after 120,000 attempts buys
    12,500 more (at the next tier's $0.80 per 1,000)."""
    events = [ScriptEvent(at=120_000, kind="top_up", value=10 * USD)]
    result = preview(plan_b, 150_000, APRIL_1, standing=Standing(prepaid_balance=0), events=events)
    assert [(run.first, run.last, run.reason) for run in result.refusals] == [
        (100_001, 120_000, Refusal.BALANCE_EXHAUSTED),
        (132_501, 150_000, Refusal.BALANCE_EXHAUSTED),
    ]
    assert (result.accepted, result.refused, result.refusal) == (112_500, 37_500, Refusal.BALANCE_EXHAUSTED)
    assert result.standing.prepaid_balance == 110 * USD
    assert (result.invoice.prepaid_applied, result.invoice.prepaid_balance_after) == (110 * USD, 0)


def test_model_e_preview_of_a_raise_a_failed_payment_and_an_upgrade(plan_e: Plan, plan_e100: Plan) -> None:
    events = [
        ScriptEvent(at=52_000, kind="limit", limit="included", value=60_000),
        ScriptEvent(at=56_000, kind="payment", ok=False),
        ScriptEvent(at=58_000, kind="payment", ok=True),
        ScriptEvent(at=66_000, kind="plan", plan=plan_e100),
    ]
    result = preview(plan_e, 110_000, APRIL_1, events=events)
    assert [(run.first, run.last, run.reason) for run in result.refusals] == [(56_001, 58_000, Refusal.PAYMENT_FAILED)]
    # 50,001-52,000 over the first limit; 60,001-64,000 over the raised one (block 1 covers
    # 5,000, block 2 opens at overage email 5,001 = email 63,001); after the upgrade at
    # 64,000 accepted, 100,000 are included: 100,001-108,000 open blocks 3 and 4.
    assert [(t.charge.key, t.charge.trigger_email) for t in result.charges] == [
        ("block/1", 50_001),
        ("block/2", 63_001),
        ("block/3", 100_001),
        ("block/4", 105_001),
    ]
    assert [t.at for t in result.charges] == sorted(t.at for t in result.charges if t.at)
    assert result.events[3].switch is not None and result.events[3].switch.kind == "upgrade"
    assert [(line.kind, line.description, line.amount) for line in result.invoice.lines] == [
        ("plan_part", "50,000 a month, Apr 1 - Apr 18: emails 1 to 64,000", 0),
        ("usage", "Email overage: 6,000 emails. Cost: $2", 2 * USD),
        ("in_period_charges", "Charged during the period: 2 usage charges", -2 * USD),
        ("plan_part", "100,000 a month, Apr 18 - Apr 30: emails 64,001 to 108,000", 0),
        ("usage", "Email overage: 8,000 emails. Cost: $2", 2 * USD),
        ("in_period_charges", "Charged during the period: 2 usage charges", -2 * USD),
    ]
    assert (result.plan, result.accepted, result.invoice.total) == ("100,000 a month", 108_000, 0)


def test_a_downgrade_in_a_preview_waits_for_the_period_end(plan_d: Plan, plan_d200: Plan) -> None:
    start = datetime(2025, 12, 6, tzinfo=timezone.utc)
    result = preview(plan_d200, 1_000, start, events=[ScriptEvent(at=500, kind="plan", plan=plan_d)])
    assert result.pending is not None and result.pending.plan == "included-capped"
    assert result.pending.effective == result.period.end and result.plan == "Pro 200k"


def test_a_spending_limit_script_pauses_and_resumes_model_d(plan_d: Plan) -> None:
    events = [
        ScriptEvent(at=0, kind="limit", limit="spending", value=10 * USD),
        ScriptEvent(at=120_000, kind="limit", limit="spending", value=None),
    ]
    result = preview(plan_d, 130_000, datetime(2025, 12, 6, tzinfo=timezone.utc), events=events)
    # $10 buys 10 x 167 = 1,670 extra emails: 101,670; the rest of the attempts to 120,000 wait.
    assert [(run.first, run.last, run.reason) for run in result.refusals] == [
        (101_671, 120_000, Refusal.SPENDING_LIMIT)
    ]
    assert result.accepted == 101_670 + 10_000


@pytest.mark.parametrize(
    ("event", "message"),
    [
        (ScriptEvent(at=51, kind="payment", ok=False), "events[0].at: 51 is not between 0 and the 50 emails"),
        (ScriptEvent(at=1, kind="top_up", value=0), "events[0].amount: a top-up must be positive"),
        (ScriptEvent(at=1, kind="limit", limit="included", value=-1), "events[0].emails"),
    ],
)
def test_a_script_that_cannot_be_applied_is_refused_naming_the_event(
    plan_e: Plan, event: ScriptEvent, message: str
) -> None:
    with pytest.raises(ValueError) as refused:
        preview(plan_e, 50, APRIL_1, events=[event])
    assert message in str(refused.value)


def test_a_plan_change_the_relay_would_refuse_is_refused_in_a_preview(plan_e: Plan, plan_d: Plan) -> None:
    with pytest.raises(ValueError) as refused:
        preview(plan_e, 50, APRIL_1, events=[ScriptEvent(at=10, kind="plan", plan=plan_d)])
    assert "a plan change keeps the account's billing periods" in str(refused.value)
