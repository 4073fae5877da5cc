"""Model B (seeds/001): prepaid balance, graduated volume discount, carry-over, postpay option.

The tiers are illustrative (see five_plans.yaml): 10,000 included, then $1.00 / 1,000
up to the month's 100,000th email, so a $90 balance is good for exactly 100,000 emails.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import date, datetime, timezone

from policies.account import Standing, Usage
from policies.decision import Refusal, admit, headroom
from policies.invoice import close_period
from policies.parts import Funding
from policies.periods import period_containing
from policies.plans import Plan
from policies.usage_cost import priced_usage

USD = 1_000_000
GOOD_FOR_100_000 = Standing(prepaid_balance=90 * USD)


def test_the_balance_is_good_for_exactly_100_000_emails(plan_b: Plan) -> None:
    assert priced_usage(plan_b, Standing(), Usage(accepted=100_000)) == 90 * USD
    assert headroom(plan_b, GOOD_FOR_100_000, Usage()) == (100_000, Refusal.BALANCE_EXHAUSTED)


def test_email_100_000_is_admitted_and_100_001_refused(plan_b: Plan) -> None:
    email_100_000 = admit(plan_b, GOOD_FOR_100_000, Usage(accepted=99_999), 1)
    assert (email_100_000.granted, email_100_000.refusal) == (1, None)
    email_100_001 = admit(plan_b, GOOD_FOR_100_000, Usage(accepted=100_000), 1)
    assert (email_100_001.granted, email_100_001.refusal) == (0, Refusal.BALANCE_EXHAUSTED)


def test_reserved_emails_count_so_a_batch_is_cut_at_the_balance(plan_b: Plan) -> None:
    admission = admit(plan_b, GOOD_FOR_100_000, Usage(accepted=99_000, reserved=500), 1_000)
    assert (admission.granted, admission.refusal, admission.remaining) == (500, Refusal.BALANCE_EXHAUSTED, 0)


def test_a_top_up_resumes_sending_at_the_next_tiers_price(plan_b: Plan) -> None:
    topped_up = replace(GOOD_FOR_100_000, prepaid_balance=GOOD_FOR_100_000.prepaid_balance + 10 * USD)
    admission = admit(plan_b, topped_up, Usage(accepted=100_000), 20_000)
    # emails 100,001+ cost $0.80 per 1,000: $10 buys 12,500 more
    assert (admission.granted, admission.refusal) == (12_500, Refusal.BALANCE_EXHAUSTED)


def test_included_emails_are_free_even_without_balance(plan_b: Plan) -> None:
    assert headroom(plan_b, Standing(prepaid_balance=0), Usage()) == (10_000, Refusal.BALANCE_EXHAUSTED)


def test_graduated_discount_prices_each_email_by_its_tier(plan_b: Plan) -> None:
    # 10,000 free + 90,000 x $0.001 + 900,000 x $0.0008 + 100,000 x $0.0005
    assert priced_usage(plan_b, Standing(), Usage(accepted=1_100_000)) == (90 + 720 + 50) * USD


def test_month_end_receipt_and_unused_credit_carries_over(plan_b: Plan) -> None:
    period = period_containing(plan_b.period, datetime(2026, 4, 10, tzinfo=timezone.utc))
    standing = Standing(prepaid_balance=100 * USD)
    invoice = close_period(plan_b, standing, Usage(accepted=100_000), period)
    assert [(line.description, line.amount) for line in invoice.lines] == [
        ("Plan fee: Prepaid, volume discount", 5 * USD),
        ("Emails: 100,000 (10,000 included; 90,000 at $0.001)", 90 * USD),
    ]
    assert invoice.total == 95 * USD
    assert invoice.prepaid_applied == 90 * USD
    assert invoice.amount_due == 5 * USD  # the fee
    assert invoice.prepaid_balance_after == 10 * USD  # carried into May
    assert invoice.invoice_date == date(2026, 5, 1)  # Europe/Amsterdam month
    assert invoice.issued_at == datetime(2026, 4, 30, 22, 0, tzinfo=timezone.utc)  # midnight CEST


def test_postpay_has_no_balance_check_same_discount_due_in_14_days(plan_b: Plan) -> None:
    postpay = replace(plan_b, funding=Funding(kind="postpaid", net_days=14))
    admission = admit(postpay, Standing(prepaid_balance=0), Usage(accepted=5_000_000), 1_000)
    assert (admission.granted, admission.refusal, admission.remaining) == (1_000, None, None)
    period = period_containing(postpay.period, datetime(2026, 4, 10, tzinfo=timezone.utc))
    invoice = close_period(postpay, Standing(), Usage(accepted=100_000), period)
    assert invoice.total == invoice.amount_due == 95 * USD
    assert invoice.prepaid_balance_after is None
    assert invoice.due_date == date(2026, 5, 15)
