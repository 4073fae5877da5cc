"""Model B (seeds/001): the monthly payment is prepaid credit, graduated discount, carry-over, postpay.

The amount and tiers are illustrative (see five_plans.yaml): a $100.00 monthly payment and
$1.00 / 1,000 up to the month's 100,000th email, so one month's payment is good for exactly
100,000 emails; then $0.80 and $0.50 per 1,000.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import date, datetime, timezone

import pytest

from mailmeter.policies.account import Standing, Usage
from mailmeter.policies.decision import Refusal, admit, headroom
from mailmeter.policies.invoice import close_period
from mailmeter.policies.parts import Funding
from mailmeter.policies.periods import next_period, period_containing
from mailmeter.policies.plans import Plan, PlanError, parse_plan
from mailmeter.policies.prepaid import PaymentChange, monthly_credit, monthly_payment, unsettled_usage, with_change
from mailmeter.policies.usage_cost import priced_usage

USD = 1_000_000
APRIL = datetime(2026, 4, 10, tzinfo=timezone.utc)


def credited(plan: Plan, carried_in: int = 0) -> Standing:
    """What a period may spend: the balance carried in plus the period's monthly payment."""
    period = period_containing(plan.period, APRIL)
    return Standing(prepaid_balance=carried_in + monthly_payment(plan, (), period))


def test_the_monthly_payment_is_good_for_exactly_100_000_emails(plan_b: Plan) -> None:
    assert monthly_payment(plan_b, (), period_containing(plan_b.period, APRIL)) == 100 * USD
    assert priced_usage(plan_b, Standing(), Usage(accepted=100_000)) == 100 * USD
    assert headroom(plan_b, credited(plan_b), Usage()) == (100_000, Refusal.BALANCE_EXHAUSTED)


def test_email_100_000_is_admitted_and_100_001_refused(plan_b: Plan) -> None:
    email_100_000 = admit(plan_b, credited(plan_b), Usage(accepted=99_999), 1)
    assert (email_100_000.granted, email_100_000.refusal) == (1, None)
    email_100_001 = admit(plan_b, credited(plan_b), Usage(accepted=100_000), 1)
    assert (email_100_001.granted, email_100_001.refusal) == (0, Refusal.BALANCE_EXHAUSTED)


def test_nothing_is_free_without_a_balance(plan_b: Plan) -> None:
    assert headroom(plan_b, Standing(prepaid_balance=0), Usage()) == (0, Refusal.BALANCE_EXHAUSTED)


def test_reserved_emails_count_so_a_batch_is_cut_at_the_balance(plan_b: Plan) -> None:
    admission = admit(plan_b, credited(plan_b), Usage(accepted=99_000, reserved=500), 1_000)
    assert (admission.granted, admission.refusal, admission.remaining) == (500, Refusal.BALANCE_EXHAUSTED, 0)


def test_a_top_up_resumes_sending_at_the_next_tiers_price(plan_b: Plan) -> None:
    topped_up = credited(plan_b, carried_in=10 * USD)
    admission = admit(plan_b, topped_up, Usage(accepted=100_000), 20_000)
    # emails 100,001+ cost $0.80 per 1,000: $10 buys 12,500 more
    assert (admission.granted, admission.refusal) == (12_500, Refusal.BALANCE_EXHAUSTED)


def test_graduated_discount_prices_each_email_by_its_tier(plan_b: Plan) -> None:
    # 100,000 x $0.001 + 900,000 x $0.0008 + 100,000 x $0.0005
    assert priced_usage(plan_b, Standing(), Usage(accepted=1_100_000)) == (100 + 720 + 50) * USD


def test_the_receipt_pays_the_month_from_the_balance_and_the_rest_carries_over(plan_b: Plan) -> None:
    april = period_containing(plan_b.period, APRIL)
    invoice = close_period(plan_b, credited(plan_b), Usage(accepted=60_000), april)
    assert [(line.description, line.amount) for line in invoice.lines] == [("Emails: 60,000 at $0.001", 60 * USD)]
    assert (invoice.total, invoice.prepaid_applied, invoice.amount_due) == (60 * USD, 60 * USD, 0)
    assert invoice.prepaid_balance_after == 40 * USD  # carried into May
    assert invoice.invoice_date == date(2026, 5, 1)  # Europe/Amsterdam month
    assert invoice.issued_at == datetime(2026, 4, 30, 22, 0, tzinfo=timezone.utc)  # midnight CEST
    # May: $40 carried over + May's $100 = $140 = 100,000 at $1.00 and 50,000 at $0.80 per 1,000.
    may = Standing(
        prepaid_balance=invoice.prepaid_balance_after + monthly_payment(plan_b, (), next_period(plan_b.period, april))
    )
    assert headroom(plan_b, may, Usage()) == (150_000, Refusal.BALANCE_EXHAUSTED)
    assert admit(plan_b, may, Usage(accepted=149_999), 1).granted == 1
    assert admit(plan_b, may, Usage(accepted=150_000), 1).refusal == Refusal.BALANCE_EXHAUSTED


def test_a_new_monthly_payment_applies_from_the_period_it_starts(plan_b: Plan) -> None:
    april = period_containing(plan_b.period, APRIL)
    may = next_period(plan_b.period, april)
    june = next_period(plan_b.period, may)
    raised = with_change((), PaymentChange(may.start, 150 * USD))
    assert [monthly_payment(plan_b, raised, p) for p in (april, may, june)] == [100 * USD, 150 * USD, 150 * USD]
    lowered = with_change(raised, PaymentChange(june.start, 80 * USD))
    assert [monthly_payment(plan_b, lowered, p) for p in (april, may, june)] == [100 * USD, 150 * USD, 80 * USD]
    # A change replaces every change from its start on: raised twice for May, the last one counts.
    again = with_change(lowered, PaymentChange(may.start, 200 * USD))
    assert again == (PaymentChange(may.start, 200 * USD),)
    credit = monthly_credit(plan_b, again, may, "May 1 - May 31")
    assert credit is not None and (credit.key, credit.amount) == ("monthly/1", 200 * USD)
    assert credit.description == "Monthly payment for May 1 - May 31: $200 added to the prepaid balance"
    assert monthly_credit(plan_b, with_change((), PaymentChange(may.start, 0)), may, "May") is None


def test_an_ended_period_not_yet_invoiced_still_holds_its_usage(plan_b: Plan) -> None:
    # 60,000 committed and 500 still held when April ended: at most $60.50 will be deducted.
    assert unsettled_usage(plan_b, Standing(), Usage(accepted=60_000, reserved=500)) == 60_500_000
    # rounded half-up to cents, as the invoice's usage line is: $60.005 -> $60.01, $60.004 -> $60.00
    assert unsettled_usage(plan_b, Standing(), Usage(accepted=60_005)) == 60_010_000
    assert unsettled_usage(plan_b, Standing(), Usage(accepted=60_004)) == 60_000_000


def test_postpay_has_no_balance_check_same_discount_due_in_14_days(five_plans: dict[str, Plan]) -> None:
    postpay = five_plans["postpay-tiered"]
    admission = admit(postpay, Standing(prepaid_balance=0), Usage(accepted=5_000_000), 1_000)
    assert (admission.granted, admission.refusal, admission.remaining) == (1_000, None, None)
    period = period_containing(postpay.period, APRIL)
    assert monthly_payment(postpay, (), period) == 0
    invoice = close_period(postpay, Standing(), Usage(accepted=150_000), period)
    assert [(line.description, line.amount) for line in invoice.lines] == [
        ("Emails: 150,000 (100,000 at $0.001; 50,000 at $0.0008)", 140 * USD)
    ]
    assert invoice.total == invoice.amount_due == 140 * USD
    assert invoice.prepaid_balance_after is None
    assert invoice.due_date == date(2026, 5, 15)


@pytest.mark.parametrize(
    ("funding", "message"),
    [
        ({"kind": "postpaid", "monthly_payment": "100"}, "is credit added to a prepaid balance"),
        ({"kind": "prepaid", "monthly_payment": "100.001"}, "has more decimals than USD has (2)"),
        ({"kind": "prepaid", "monthly_payment": 100.5}, "never a float"),
    ],
)
def test_a_monthly_payment_is_prepaid_credit_in_whole_cents(funding: dict[str, object], message: str) -> None:
    with pytest.raises(PlanError) as caught:
        parse_plan("b", {"price": {"kind": "flat", "amount": "1.00", "per": 1000}, "funding": funding})
    assert caught.value.key == "plans.b.funding.monthly_payment" and message in caught.value.message


def test_funding_keeps_its_defaults() -> None:
    assert Funding() == Funding(kind="postpaid", net_days=0, overdraft_allowance=None, monthly_payment=0)
    assert replace(Funding(kind="prepaid"), monthly_payment=5 * USD).monthly_payment == 5 * USD
