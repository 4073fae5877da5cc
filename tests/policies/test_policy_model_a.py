"""Model A (seeds/000): $0.20 per 1,000 accepted emails, a $250 charge at each $250, remainder on the 1st."""

from __future__ import annotations

from datetime import date, datetime, timezone

from mailmeter.policies.account import Standing, Usage
from mailmeter.policies.charges import charges_due, unbilled
from mailmeter.policies.decision import admit
from mailmeter.policies.invoice import close_period
from mailmeter.policies.periods import period_containing
from mailmeter.policies.plans import Plan
from mailmeter.policies.usage_cost import priced_usage

USD = 1_000_000
APRIL = datetime(2026, 4, 15, tzinfo=timezone.utc)


def test_price_is_200_micros_per_email_and_250_dollars_is_1_250_000_emails(plan_a: Plan) -> None:
    assert priced_usage(plan_a, Standing(), Usage(accepted=1)) == 200
    assert priced_usage(plan_a, Standing(), Usage(accepted=1_250_000)) == 250 * USD


def test_threshold_charges_fall_due_at_250_500_750_cumulative(plan_a: Plan) -> None:
    standing = Standing()
    assert charges_due(plan_a, standing, Usage(accepted=1_249_999)) == []
    first = charges_due(plan_a, standing, Usage(accepted=1_250_000))
    assert [(c.key, c.amount, c.trigger_email) for c in first] == [("threshold/1", 250 * USD, 1_250_000)]
    all_three = charges_due(plan_a, standing, Usage(accepted=4_150_000))
    assert [c.trigger_email for c in all_three] == [1_250_000, 2_500_000, 3_750_000]
    assert [c.index for c in all_three] == [1, 2, 3]
    assert all(c.amount == 250 * USD and c.emails_unlocked is None for c in all_three)


def test_the_documents_730_row_has_not_crossed_750(plan_a: Plan) -> None:
    # The seed's table shows the third charge at $730; the rule says $730 < $750.
    at_730 = Usage(accepted=3_650_000)
    assert priced_usage(plan_a, Standing(), at_730) == 730 * USD
    assert len(charges_due(plan_a, Standing(), at_730)) == 2
    assert unbilled(plan_a, Standing(), at_730) == 230 * USD


def test_april_830_dollars_is_three_250_charges_and_an_80_invoice_on_may_1(plan_a: Plan) -> None:
    standing = Standing()
    april_usage = Usage(accepted=4_150_000)  # $830
    period = period_containing(plan_a.period, APRIL)
    charges = charges_due(plan_a, standing, april_usage)
    invoice = close_period(plan_a, standing, april_usage, period, charges)

    assert sum(c.amount for c in charges) == 750 * USD
    assert invoice.total == 80 * USD
    assert invoice.amount_due == 80 * USD
    assert invoice.invoice_date == date(2026, 5, 1)
    assert invoice.due_date == date(2026, 5, 1)
    assert invoice.period_label == "Apr 1 - Apr 30"
    assert [(line.description, line.amount) for line in invoice.lines] == [
        ("Emails: 4,150,000 at $0.0002", 830 * USD),
        ("Charged during the period: 3 usage charges", -750 * USD),
    ]
    assert sum(c.amount for c in charges) + invoice.total == 830 * USD


def test_live_unbilled_balance(plan_a: Plan) -> None:
    # "Live usage and the current unbilled balance are visible at any time."
    assert unbilled(plan_a, Standing(), Usage(accepted=4_150_000)) == 80 * USD
    assert unbilled(plan_a, Standing(), Usage(accepted=1_250_001)) == 200


def test_no_cap_so_every_email_is_admitted(plan_a: Plan) -> None:
    admission = admit(plan_a, Standing(), Usage(accepted=10_000_000), 500)
    assert (admission.granted, admission.refusal, admission.remaining) == (500, None, None)
