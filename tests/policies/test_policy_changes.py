"""Limit and plan changes mid-period: prices fixed when sent, charges final, parts shown.

Worked examples of models A, D and E across a limit raise and across an upgrade, each
reproduced to the email and the cent with the functions the meter calls.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import date, datetime, timezone

import pytest

from mailmeter.policies.account import Standing, Usage
from mailmeter.policies.changes import (
    PlanChangeRefused,
    change_limit,
    is_upgrade,
    switch_plan,
    without_own_limits,
)
from mailmeter.policies.charges import Charge, charges_due, unbilled
from mailmeter.policies.dashboard import usage_alerts_due, usage_screen
from mailmeter.policies.decision import Refusal, admit, headroom
from mailmeter.policies.invoice import Invoice, close_period
from mailmeter.policies.parts import Funding
from mailmeter.policies.periods import Period, period_containing
from mailmeter.policies.plans import Plan, parse_plan

USD = 1_000_000
MID_APRIL = datetime(2026, 4, 15, tzinfo=timezone.utc)


def lines(invoice: Invoice) -> list[tuple[str, str, int]]:
    return [(line.kind, line.description, line.amount) for line in invoice.lines]


def april(plan: Plan) -> Period:
    return period_containing(plan.period, MID_APRIL)


# -- model E: the limit raised after an overage was charged ---------------------------


def test_e_limit_raised_after_the_overage_was_charged_keeps_the_charge_and_shows_it(plan_e: Plan) -> None:
    """The issue's case: 50,000 limit, 52,000 sent ($1 charged at once), then 60,000."""
    period = april(plan_e)
    sent = Usage(accepted=52_000)
    charged = charges_due(plan_e, Standing(), sent)
    assert [(c.key, c.amount, c.trigger_email) for c in charged] == [("block/1", USD, 50_001)]
    raised = change_limit(plan_e, Standing(), sent, "included", 60_000, MID_APRIL, period)
    assert raised.standing.included_emails_override == 60_000
    after = replace(sent, history=raised.history)
    assert charges_due(plan_e, raised.standing, after, after_index=1) == []
    invoice = close_period(plan_e, raised.standing, after, period, charged)
    assert lines(invoice) == [
        ("usage", "Email overage: 2,000 emails. Cost: $1", USD),
        ("in_period_charges", "Charged during the period: 1 usage charge", -USD),
    ]
    assert (invoice.total, invoice.amount_due) == (0, 0)  # was -1.00 when the raise repriced the period


def test_e_overage_keeps_adding_up_across_the_raise(plan_e: Plan) -> None:
    """After the raise, emails 52,001-60,000 are within the limit; the $1 block still
    covers 3,000 more overage emails, so the second $1 opens at overage email 5,001."""
    period = april(plan_e)
    raised = change_limit(plan_e, Standing(), Usage(accepted=52_000), "included", 60_000, MID_APRIL, period)
    standing, history = raised.standing, raised.history
    assert charges_due(plan_e, standing, Usage(accepted=63_000, history=history), after_index=1) == []
    [second] = charges_due(plan_e, standing, Usage(accepted=63_001, history=history), after_index=1)
    assert (second.key, second.trigger_email) == ("block/2", 63_001)
    assert second.description == "Usage charge 2: $1 for 5,000 more emails (emails 63,001 to 68,000 of the period)"
    at_66k = Usage(accepted=66_000, history=history)
    screen = usage_screen(plan_e, standing, Usage(accepted=52_000, history=history), period)
    assert (screen.total_allowed, screen.remaining, screen.extra_emails) == (63_000, 11_000, 5_000)
    charged = charges_due(plan_e, Standing(), Usage(accepted=52_000)) + [second]
    invoice = close_period(plan_e, standing, at_66k, period, charged)
    assert lines(invoice) == [
        ("usage", "Email overage: 8,000 emails. Cost: $2", 2 * USD),
        ("in_period_charges", "Charged during the period: 2 usage charges", -2 * USD),
    ]
    assert invoice.total == 0


def test_e_alerts_of_the_raised_limit_are_new_notices_only_past_the_raise(plan_e: Plan) -> None:
    period = april(plan_e)
    raised = change_limit(plan_e, Standing(), Usage(accepted=52_000), "included", 60_000, MID_APRIL, period)
    due = usage_alerts_due(plan_e, raised.standing, Usage(accepted=60_000, history=raised.history))
    # 75% of 60,000 (45,000) was passed before the raise; 90% and 100% are crossed after it.
    assert [alert.key for alert in due] == ["alert/90@60000", "alert/100@60000"]
    assert [alert.key for alert in usage_alerts_due(plan_e, Standing(), Usage(accepted=52_000))] == [
        "alert/75",
        "alert/90",
        "alert/100",
    ]


def test_e_decrease_changes_nothing_this_period(plan_e: Plan) -> None:
    period = april(plan_e)
    lowered = change_limit(plan_e, Standing(), Usage(accepted=30_000), "included", 40_000, MID_APRIL, period)
    assert (lowered.standing.included_emails_override, lowered.history) == (50_000, None)
    assert lowered.change is not None and lowered.change.value_during(period) == 50_000


def test_e_a_raise_before_anything_was_sent_keeps_no_history(plan_e: Plan) -> None:
    raised = change_limit(plan_e, Standing(), Usage(), "included", 60_000, MID_APRIL, april(plan_e))
    assert raised.history is None and raised.standing.included_emails_override == 60_000


# -- models A and D: thresholds and $1 increments are final too ------------------------


def test_a_threshold_charges_stay_when_included_emails_are_raised(plan_a: Plan) -> None:
    """A's $250 charge at 1,250,000 emails stays when the account's included emails go up
    to 2,000,000 at 1,300,000 sent: emails 1,300,001-2,000,000 are then free."""
    period = april(plan_a)
    sent = Usage(accepted=1_300_000)
    charged = charges_due(plan_a, Standing(), sent)
    assert [(c.key, c.amount) for c in charged] == [("threshold/1", 250 * USD)]
    raised = change_limit(plan_a, Standing(), sent, "included", 2_000_000, MID_APRIL, period)
    end = Usage(accepted=2_100_000, history=raised.history)
    assert unbilled(plan_a, raised.standing, end) == 30 * USD  # $260 + $20 - $250
    assert charges_due(plan_a, raised.standing, end, after_index=1) == []
    invoice = close_period(plan_a, raised.standing, end, period, charged)
    assert lines(invoice) == [
        ("usage", "Emails: 2,100,000 (700,000 included; 1,400,000 at $0.0002)", 280 * USD),
        ("in_period_charges", "Charged during the period: 1 usage charge", -250 * USD),
    ]
    assert invoice.total == 30 * USD


def test_d_spending_limit_lowered_below_what_was_spent_keeps_the_charges(plan_d: Plan) -> None:
    period = period_containing(plan_d.period, datetime(2025, 12, 20, tzinfo=timezone.utc), date(2025, 12, 6))
    sent = Usage(accepted=135_640)
    charged = charges_due(plan_d, Standing(), sent)
    lowered = change_limit(plan_d, Standing(), sent, "spending", 100 * USD, MID_APRIL, period)
    assert admit(plan_d, lowered.standing, sent, 1).refusal is Refusal.SPENDING_LIMIT
    invoice = close_period(plan_d, lowered.standing, sent, period, charged)
    assert lines(invoice)[1:] == [
        ("usage", "Email overage: 35,640 emails. Cost: $214", 214 * USD),
        ("in_period_charges", "Charged during the period: 214 usage charges", -214 * USD),
    ]
    assert invoice.total == 99 * USD  # the plan fee, never less


def test_d_included_emails_raised_mid_period_keep_the_214_increments(plan_d: Plan) -> None:
    period = period_containing(plan_d.period, datetime(2025, 12, 20, tzinfo=timezone.utc), date(2025, 12, 6))
    sent = Usage(accepted=135_640)
    raised = change_limit(
        plan_d, Standing(), sent, "included", 150_000, datetime(2025, 12, 21, tzinfo=timezone.utc), period
    )
    history = raised.history
    screen = usage_screen(plan_d, raised.standing, replace(sent, history=history), period)
    # 35,640 overage emails in 214 blocks of 167 (35,738): 98 left in them, plus 150,000 - 135,640.
    assert (screen.extra_emails, screen.remaining, screen.total_allowed) == (35_738, 14_458, 150_098)
    [charge] = charges_due(plan_d, raised.standing, Usage(accepted=150_099, history=history), after_index=214)
    assert (charge.key, charge.trigger_email) == ("block/215", 150_099)


# -- plan changes: upgrades at once, everything else at period end ----------------------


def test_e_worked_example_across_an_upgrade_to_100k(plan_e: Plan, plan_e100: Plan) -> None:
    """51,200 sent on the 50,000 plan ($1 for 1,200 overage), then an upgrade to 100,000 a
    month on April 15: emails 51,201-100,000 are free, 100,001-101,200 are 1,200 over: $1."""
    period = april(plan_e)
    sent = Usage(accepted=51_200)
    first = charges_due(plan_e, Standing(), sent)
    switch = switch_plan(plan_e, plan_e100, Standing(), sent, period, MID_APRIL)
    assert (switch.kind, switch.at_once, switch.effective) == ("upgrade", True, MID_APRIL)
    standing = without_own_limits(Standing())
    assert headroom(plan_e100, standing, replace(sent, history=switch.history)) == (None, None)
    assert charges_due(plan_e100, standing, Usage(accepted=100_000, history=switch.history), after_index=1) == []
    end = Usage(accepted=101_200, history=switch.history)
    second = charges_due(plan_e100, standing, end, after_index=1)
    assert [(c.key, c.trigger_email) for c in second] == [("block/2", 100_001)]
    invoice = close_period(plan_e100, standing, end, period, first + second)
    assert lines(invoice) == [
        ("plan_part", "50,000 a month, Apr 1 - Apr 14: emails 1 to 51,200", 0),
        ("usage", "Email overage: 1,200 emails. Cost: $1", USD),
        ("in_period_charges", "Charged during the period: 1 usage charge", -USD),
        ("plan_part", "100,000 a month, Apr 15 - Apr 30: emails 51,201 to 101,200", 0),
        ("usage", "Email overage: 1,200 emails. Cost: $1", USD),
        ("in_period_charges", "Charged during the period: 1 usage charge", -USD),
    ]
    assert invoice.total == 0


def test_d_worked_example_across_an_upgrade_to_pro_200k(plan_d: Plan, plan_d200: Plan) -> None:
    """Pro 100k at 135,640 sent (214 x $1, the document's screen), upgraded on Dec 20 to
    Pro 200k ($199, 200,000 included, $1 per 250, $999 spending limit)."""
    period = period_containing(plan_d.period, datetime(2025, 12, 20, tzinfo=timezone.utc), date(2025, 12, 6))
    upgraded_at = datetime(2025, 12, 20, 12, tzinfo=timezone.utc)
    sent = Usage(accepted=135_640)
    first = charges_due(plan_d, Standing(), sent)
    assert usage_screen(plan_d, Standing(), sent, period).rows()[2:] == (
        "35,738 extra emails",
        "135,640 emails sent",
        "135,738 total allowed",
        "$214 spent",
        "$599 spending limit",
        "98 emails remaining",
    )
    switch = switch_plan(plan_d, plan_d200, Standing(), sent, period, upgraded_at)
    assert (switch.kind, switch.at_once) == ("upgrade", True)
    standing = without_own_limits(Standing())
    now = replace(sent, history=switch.history)
    assert usage_screen(plan_d200, standing, now, period).rows() == (
        "Pro 200k",
        "Dec 6 - Jan 5",
        "0 extra emails",
        "135,640 emails sent",
        "200,000 total allowed",
        "$214 spent",
        "$999 spending limit",
        "64,360 emails remaining",
    )
    # The $999 spending limit counts the $214 already spent: 785 more blocks of 250.
    assert headroom(plan_d200, standing, now) == (200_000 + 785 * 250 - 135_640, Refusal.SPENDING_LIMIT)
    end = Usage(accepted=200_250, history=switch.history)
    second = charges_due(plan_d200, standing, end, after_index=214)
    assert [(c.key, c.emails_unlocked, c.trigger_email) for c in second] == [("block/215", 250, 200_001)]
    assert second[0].description == "Usage charge 215: $1 for 250 more emails (emails 200,001 to 200,250 of the period)"
    invoice = close_period(plan_d200, standing, end, period, first + second)
    assert lines(invoice) == [
        ("fee", "Plan fee: Pro 200k", 199 * USD),
        ("plan_part", "Pro 100k, Dec 6 - Dec 20: emails 1 to 135,640", 0),
        ("usage", "Email overage: 35,640 emails. Cost: $214", 214 * USD),
        ("in_period_charges", "Charged during the period: 214 usage charges", -214 * USD),
        ("plan_part", "Pro 200k, Dec 20 - Jan 5: emails 135,641 to 200,250", 0),
        ("usage", "Email overage: 250 emails. Cost: $1", USD),
        ("in_period_charges", "Charged during the period: 1 usage charge", -USD),
    ]
    assert invoice.total == 199 * USD  # the fee of the plan the period ends on; usage all charged


def test_a_830_dollars_across_an_upgrade_continues_the_threshold_charges(plan_a: Plan) -> None:
    """Model A's April, upgraded after the first $250 to a plan with a $100 fee and
    $0.15 per 1,000: the new plan's part charges its own $250 as its usage reaches $250."""
    pro = parse_plan(
        "per-email-pro",
        {
            "display_name": "Per email, pro",
            "plan_fee": "100",
            "price": {"kind": "flat", "amount": "0.15", "per": 1000},
            "in_period_charge": {"kind": "threshold", "amount": "250"},
            "funding": {"kind": "postpaid"},
        },
    )
    period = april(plan_a)
    sent = Usage(accepted=1_250_000)
    first = charges_due(plan_a, Standing(), sent)
    switch = switch_plan(plan_a, pro, Standing(), sent, period, MID_APRIL)
    assert switch.kind == "upgrade" and switch.at_once
    end = Usage(accepted=3_250_000, history=switch.history)
    second = charges_due(pro, Standing(), end, after_index=1)
    # $250 at $0.00015 is 1,666,667 emails into the new part: email 2,916,667 of the period.
    assert [(c.key, c.trigger_email, c.description) for c in second] == [
        ("threshold/2", 2_916_667, "Usage charge 2: $250 as usage reached $250")
    ]
    invoice = close_period(pro, Standing(), end, period, first + second)
    assert lines(invoice) == [
        ("fee", "Plan fee: Per email, pro", 100 * USD),
        ("plan_part", "Per email, $250 threshold, Apr 1 - Apr 14: emails 1 to 1,250,000", 0),
        ("usage", "Emails: 1,250,000 at $0.0002", 250 * USD),
        ("in_period_charges", "Charged during the period: 1 usage charge", -250 * USD),
        ("plan_part", "Per email, pro, Apr 15 - Apr 30: emails 1,250,001 to 3,250,000", 0),
        ("usage", "Emails: 2,000,000 at $0.00015", 300 * USD),
        ("in_period_charges", "Charged during the period: 1 usage charge", -250 * USD),
    ]
    assert invoice.total == 150 * USD  # $100 fee + $50 left of the new part


def test_a_downgrade_waits_for_the_end_of_the_period(plan_d: Plan, plan_d200: Plan) -> None:
    period = period_containing(plan_d.period, datetime(2025, 12, 20, tzinfo=timezone.utc), date(2025, 12, 6))
    at = datetime(2025, 12, 21, tzinfo=timezone.utc)
    switch = switch_plan(plan_d200, plan_d, Standing(), Usage(accepted=10), period, at)
    assert (switch.kind, switch.at_once, switch.effective, switch.history) == ("downgrade", False, period.end, None)
    assert switch.pending is not None and switch.pending.plan == "included-capped"
    assert not switch.pending.due(period.end - (period.end - at)) and switch.pending.due(period.end)
    back = switch_plan(plan_d200, plan_d200, Standing(), Usage(), period, at, switch.pending)
    assert (back.kind, back.pending) == ("cancelled", None)
    assert switch_plan(plan_d200, plan_d200, Standing(), Usage(), period, at).kind == "unchanged"


def test_which_change_is_an_upgrade(plan_e: Plan, plan_e100: Plan, example_plans: dict[str, Plan]) -> None:
    starter = example_plans["starter"]
    assert is_upgrade(plan_e, plan_e100) and not is_upgrade(plan_e100, plan_e)  # more included emails
    assert is_upgrade(starter, plan_e) and not is_upgrade(plan_e, starter)  # same fee, 50,000 included > 0
    cheap_big = replace(plan_e, name="cheap", rank=9)
    assert not is_upgrade(replace(plan_e100, rank=10), cheap_big)  # both ranked: the rank decides
    assert is_upgrade(replace(plan_e100, rank=1), cheap_big)
    assert not is_upgrade(plan_e, replace(plan_e, name="twin"))  # the same size: not an upgrade


def test_an_upgrade_between_prepaid_and_postpaid_waits_for_the_period_end(plan_e: Plan, plan_e100: Plan) -> None:
    prepaid = replace(plan_e100, name="prepaid-100k", funding=Funding(kind="prepaid"), in_period_charge=None)
    switch = switch_plan(plan_e, prepaid, Standing(), Usage(accepted=5), april(plan_e), MID_APRIL)
    assert (switch.kind, switch.at_once) == ("upgrade", False) and "funded one way" in switch.reason


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (
            "included-capped-200k",
            "plan 'limit-overage' bills calendar months in UTC and plan 'included-capped-200k'"
            " subscription anniversaries in UTC",
        ),
        ("delivery-results", "calendar months in Asia/Shanghai"),
    ],
)
def test_plans_that_cut_periods_differently_cannot_follow_each_other(
    plan_e: Plan, example_plans: dict[str, Plan], target: str, message: str
) -> None:
    with pytest.raises(PlanChangeRefused) as refused:
        switch_plan(plan_e, example_plans[target], Standing(), Usage(), april(plan_e), MID_APRIL)
    assert message in str(refused.value)


def test_plans_that_bill_different_things_cannot_follow_each_other(plan_c: Plan, plan_e: Plan) -> None:
    accepted_in_shanghai = replace(plan_e, name="e-cn", period=plan_c.period)
    with pytest.raises(PlanChangeRefused) as refused:
        switch_plan(plan_c, accepted_in_shanghai, Standing(), Usage(), april(plan_c), MID_APRIL)
    assert "bills delivery results and plan 'e-cn' accepted emails" in str(refused.value)


def test_an_upgrade_drops_the_accounts_own_limits_and_the_empty_old_part(plan_e: Plan, plan_e100: Plan) -> None:
    own = Standing(included_emails_override=70_000, spending_limit_override=5 * USD, prepaid_balance=3 * USD)
    switch = switch_plan(plan_e, plan_e100, own, Usage(), april(plan_e), MID_APRIL)
    assert switch.history is None  # nothing was sent under the old plan: no part to show
    assert without_own_limits(own) == Standing(prepaid_balance=3 * USD)


def test_results_billed_parts_price_each_result_under_the_plan_it_arrived_under(plan_c: Plan) -> None:
    dearer = replace(
        plan_c,
        name="results-pro",
        display_name="Results pro",
        plan_fee=10 * USD,
        result_prices=replace(plan_c.result_prices, delivered=400),
    )
    period = april(plan_c)
    before = Usage(accepted=1_000, delivered=600, soft_bounced=100, hard_bounced=100)
    switch = switch_plan(plan_c, dearer, Standing(), before, period, MID_APRIL)
    end = Usage(accepted=2_000, delivered=1_600, soft_bounced=200, hard_bounced=200, history=switch.history)
    invoice = close_period(dearer, Standing(), end, period, [])
    assert lines(invoice) == [
        ("fee", "Plan fee: Results pro", 10 * USD),
        ("plan_part", "Billed on delivery results, Apr 1 - Apr 15: emails 1 to 1,000", 0),
        ("usage", "Delivered: 600 emails at $0.0003", 180_000),
        ("usage", "Soft bounce: 100 emails at $0.0001", 10_000),
        ("usage", "Invalid email: 100 emails at $0.00005", 10_000),
        ("plan_part", "Results pro, Apr 15 - Apr 30: emails 1,001 to 2,000", 0),
        ("usage", "Delivered: 1,000 emails at $0.0004", 400_000),
        ("usage", "Soft bounce: 100 emails at $0.0001", 10_000),
        ("usage", "Invalid email: 100 emails at $0.00005", 10_000),
    ]


def test_charges_beyond_the_usage_are_kept_never_credited(plan_e: Plan) -> None:
    """Were a stored charge ever more than the usage it collected (the config's price
    edited mid-period), the invoice keeps it: a charge once made is final."""
    period = april(plan_e)
    charged = [Charge("block", 1, USD, 5_000, 50_001, "Usage charge 1"), Charge("block", 2, USD, 5_000, None, "2")]
    invoice = close_period(plan_e, Standing(), Usage(accepted=51_200), period, charged)
    assert lines(invoice) == [
        ("usage", "Email overage: 1,200 emails. Cost: $1", USD),
        ("in_period_charges", "Charged during the period: 2 usage charges", -2 * USD),
        ("charges_kept", "Usage charges kept (a charge once made is final)", USD),
    ]
    assert invoice.total == 0
