"""Plans in USD, JPY (no minor unit) and BHD (three): amounts they cannot express are
refused when the plan is read; invoice lines round half-up to the minor unit and every
description writes the currency as people read it."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pytest

from mailmeter.policies import Standing, Usage, charges_due, close_period, usage_screen
from mailmeter.policies.currency import USD, Currency, currency_for
from mailmeter.policies.periods import period_containing
from mailmeter.policies.plans import PlanError, parse_plan

JPY = currency_for("JPY")
BHD = currency_for("BHD")
APRIL = datetime(2026, 4, 10, tzinfo=timezone.utc)


def invoice(body: dict[str, Any], currency: Currency, usage: Usage) -> Any:
    plan = parse_plan("p", body, currency=currency)
    return plan, close_period(plan, Standing(), usage, period_containing(plan.period, APRIL, APRIL.date()))


@pytest.mark.parametrize(
    ("currency", "body", "key"),
    [
        (JPY, {"plan_fee": "9.99"}, "plans.p.plan_fee"),
        (JPY, {"price": {"kind": "flat", "amount": "0.20", "per": 1000}}, "plans.p.price.amount"),
        (JPY, {"price": {"kind": "per_block", "amount": "1.5", "block_emails": 10}}, "plans.p.price.amount"),
        (JPY, {"spending_limit": "599.50", "price": {"kind": "flat", "amount": "1"}}, "plans.p.spending_limit"),
        (USD, {"price": {"kind": "graduated", "tiers": [{"amount": "0.005"}]}}, "plans.p.price.tiers[0].amount"),
        (USD, {"funding": {"overdraft_allowance": "200.001"}}, "plans.p.funding.overdraft_allowance"),
        (BHD, {"billable": "results", "result_prices": {"delivered": "0.0005"}}, "plans.p.result_prices.delivered"),
        (
            BHD,
            {"in_period_charge": {"kind": "threshold", "amount": "250.0001"}, "price": {"kind": "flat", "amount": "1"}},
            "plans.p.in_period_charge.amount",
        ),
    ],
)
def test_a_plan_whose_amounts_the_currency_cannot_express_is_refused(
    currency: Currency, body: dict[str, Any], key: str
) -> None:
    with pytest.raises(PlanError) as raised:
        parse_plan("p", body, currency=currency)
    assert raised.value.key == key
    assert f"more decimals than {currency.code} has" in raised.value.message
    assert "per a number of emails" in raised.value.message  # the way to write a smaller price


def test_the_same_price_written_per_more_emails_is_accepted() -> None:
    plan = parse_plan("p", {"price": {"kind": "flat", "amount": "3", "per": 100}}, currency=JPY)
    assert plan.price.per_email == 30_000  # ¥0.03 an email


def test_jpy_invoice_lines_round_half_up_to_the_yen() -> None:
    plan, bill = invoice(
        {"plan_fee": "980", "price": {"kind": "flat", "amount": "3", "per": 100}}, JPY, Usage(accepted=150)
    )
    fee, usage = bill.lines
    assert (fee.description, fee.amount) == ("Plan fee: p", 980_000_000)
    assert usage.description == "Emails: 150 at ¥0.03"  # ¥4.5 ...
    assert usage.amount == 5_000_000  # ... rounds half-up to ¥5
    assert bill.total == 985_000_000
    _, even = invoice({"price": {"kind": "flat", "amount": "3", "per": 100}}, JPY, Usage(accepted=149))
    assert even.lines[0].amount == 4_000_000  # ¥4.47 -> ¥4


def test_bhd_invoice_lines_round_half_up_to_the_fils() -> None:
    body = {
        "billable": "results",
        "result_prices": {"per": 1000, "delivered": "1.250", "soft_bounced": "0.500", "invalid": "0.125"},
    }
    _, bill = invoice(body, BHD, Usage(accepted=7, delivered=3, soft_bounced=3, hard_bounced=1))
    assert [(line.description, line.amount) for line in bill.lines] == [
        ("Delivered: 3 emails at BHD 0.00125", 4_000),  # 3.75 fils -> 4
        ("Soft bounce: 3 emails at BHD 0.0005", 2_000),  # 1.5 fils -> 2 (half-up, not half-even)
        ("Invalid email: 1 emails at BHD 0.000125", 0),  # 0.125 fils -> 0
    ]


def test_model_e_in_yen_reads_as_the_document_with_the_currency() -> None:
    body = {
        "included_emails": 50_000,
        "price": {"kind": "per_block", "amount": "150", "block_emails": 5000},
        "in_period_charge": {"kind": "per_block"},
    }
    plan, bill = invoice(body, JPY, Usage(accepted=51_200))
    [overage, charged] = bill.lines
    assert overage.description == "Email overage: 1,200 emails. Cost: ¥150"
    assert charged.amount == -150_000_000 and bill.total == 0
    [charge] = charges_due(plan, Standing(), Usage(accepted=51_200))
    assert charge.description == "Usage charge 1: ¥150 for 5,000 more emails (emails 50,001 to 55,000 of the period)"


def test_model_d_screen_in_each_currency() -> None:
    body = {
        "included_emails": 100,
        "price": {"kind": "per_block", "amount": "1", "block_emails": 10},
        "in_period_charge": {"kind": "per_block"},
        "spending_limit": "5",
    }
    for currency, spent, limit in (
        (USD, "$2 spent", "$5 spending limit"),
        (JPY, "¥2 spent", "¥5 spending limit"),
        (BHD, "BHD 2 spent", "BHD 5 spending limit"),
    ):
        plan = parse_plan("d", body, currency=currency)
        period = period_containing(plan.period, APRIL, APRIL.date())
        rows = usage_screen(plan, Standing(), Usage(accepted=115), period).rows()
        assert spent in rows and limit in rows


def test_threshold_charge_descriptions_name_the_currency() -> None:
    body = {
        "price": {"kind": "flat", "amount": "0.250", "per": 1000},
        "in_period_charge": {"kind": "threshold", "amount": "1.125"},
    }
    plan = parse_plan("a", body, currency=BHD)
    [first] = charges_due(plan, Standing(), Usage(accepted=4_500))
    assert first.description == "Usage charge 1: BHD 1.125 as usage reached BHD 1.125"
