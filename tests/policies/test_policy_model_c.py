"""Model C (seeds/002): billed on delivery results, months cut at UTC+8 midnights, overdraft.

Result prices are illustrative (five_plans.yaml): delivered $0.30, soft bounce $0.10,
invalid $0.05 per 1,000; overdraft allowance $200.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

from mailmeter.policies.account import Standing, Usage
from mailmeter.policies.decision import Refusal, admit, headroom
from mailmeter.policies.invoice import close_period
from mailmeter.policies.periods import period_containing
from mailmeter.policies.plans import Plan
from mailmeter.policies.usage_cost import exposure, priced_usage

USD = 1_000_000
MAY_STARTS = datetime(2026, 4, 30, 16, 0, tzinfo=timezone.utc)  # 2026-05-01 00:00 UTC+8


def test_month_boundary_is_midnight_utc_plus_8(plan_c: Plan) -> None:
    may = period_containing(plan_c.period, MAY_STARTS)
    assert may.start == MAY_STARTS
    assert may.end == datetime(2026, 5, 31, 16, 0, tzinfo=timezone.utc)
    april = period_containing(plan_c.period, MAY_STARTS - timedelta(microseconds=1))
    assert april.end == MAY_STARTS
    assert april.start == datetime(2026, 3, 31, 16, 0, tzinfo=timezone.utc)


def test_usage_is_billed_by_result_category(plan_c: Plan) -> None:
    usage = Usage(accepted=13_000, delivered=10_000, soft_bounced=2_000, hard_bounced=1_000)
    # 10,000 x 300 + 2,000 x 100 + 1,000 x 50 micros
    assert priced_usage(plan_c, Standing(), usage) == 3_250_000
    april = period_containing(plan_c.period, MAY_STARTS - timedelta(days=3))
    invoice = close_period(plan_c, Standing(), usage, april)
    assert [(line.description, line.quantity, line.amount) for line in invoice.lines] == [
        ("Delivered: 10,000 emails at $0.0003", 10_000, 3 * USD),
        ("Soft bounce: 2,000 emails at $0.0001", 2_000, 200_000),
        ("Invalid email: 1,000 emails at $0.00005", 1_000, 50_000),
    ]
    assert invoice.total == invoice.amount_due == 3_250_000


def test_bill_exists_from_15_00_utc_plus_8_on_the_1st_and_the_email_goes_on_the_5th(plan_c: Plan) -> None:
    april = period_containing(plan_c.period, MAY_STARTS - timedelta(days=3))
    invoice = close_period(plan_c, Standing(), Usage(), april)
    assert invoice.period_label == "Apr 1 - Apr 30"
    assert invoice.invoice_date == date(2026, 5, 1)
    assert invoice.issued_at == datetime(2026, 5, 1, 7, 0, tzinfo=timezone.utc)  # 15:00 UTC+8
    assert invoice.statement_date == date(2026, 5, 5)
    assert invoice.due_date == date(2026, 5, 1)


def test_usage_before_results_is_admitted_at_the_highest_result_price(plan_c: Plan) -> None:
    # $200 allowance / 300 micros (delivered, the highest price) = 666,666 unresolved emails
    assert headroom(plan_c, Standing(), Usage()) == (666_666, Refusal.OVERDRAFT_LIMIT)
    last = admit(plan_c, Standing(), Usage(accepted=666_000, reserved=665), 2)
    assert (last.granted, last.refusal) == (1, Refusal.OVERDRAFT_LIMIT)
    assert exposure(plan_c, Standing(), Usage(accepted=666_666)) <= 200 * USD


def test_cheaper_results_free_allowance_for_more_sending(plan_c: Plan) -> None:
    # 500,000 accepted, all invalid ($25 known); $175 left at 300 micros = 583,333 more
    usage = Usage(accepted=500_000, hard_bounced=500_000)
    room, refusal = headroom(plan_c, Standing(), usage)
    assert (room, refusal) == (583_333, Refusal.OVERDRAFT_LIMIT)


def test_unpaid_debt_and_credit_move_the_overdraft_cap(plan_c: Plan) -> None:
    assert headroom(plan_c, Standing(outstanding_debt=150 * USD), Usage())[0] == 166_666
    assert headroom(plan_c, Standing(outstanding_debt=250 * USD), Usage()) == (0, Refusal.OVERDRAFT_LIMIT)
    # "repay overdrawn": once the old bill is paid the full allowance is back
    assert headroom(plan_c, Standing(outstanding_debt=0), Usage())[0] == 666_666
    assert headroom(plan_c, Standing(prepaid_balance=100 * USD), Usage())[0] == 1_000_000


def test_postpaid_runs_into_debt_up_to_the_allowance(plan_c: Plan) -> None:
    usage = Usage(accepted=666_666, delivered=666_666)
    april = period_containing(plan_c.period, MAY_STARTS - timedelta(days=3))
    invoice = close_period(plan_c, Standing(), usage, april)
    assert invoice.amount_due == 200 * USD  # 199.9998 rounded half-up on the line
    assert admit(plan_c, Standing(), usage, 1).refusal is Refusal.OVERDRAFT_LIMIT


def test_results_of_last_months_emails_are_billed_this_month_and_priced_until_known(plan_c: Plan) -> None:
    # May 1: nothing accepted in May yet, but 1,000 April emails got their result in May
    # and 500 April emails are still deferred: all 1,500 may be billed in May.
    may = Usage(accepted=0, delivered=1_000, awaiting_results=500)
    assert exposure(plan_c, Standing(), may) == 1_500 * 300
    assert headroom(plan_c, Standing(), may)[0] == 666_666 - 1_500
    # without the meter's count the policy could only assume results land in their own period
    assert exposure(plan_c, Standing(), Usage(accepted=0, delivered=1_000)) == 1_000 * 300
