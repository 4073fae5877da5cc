"""Plans: the five ready plans parse, parts combine, and every mistake names its key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from mailmeter.policies.account import Standing, Usage
from mailmeter.policies.decision import Refusal, admit
from mailmeter.policies.parts import BlockCharge, Funding, ThresholdCharge
from mailmeter.policies.plans import Plan, PlanError, parse_plan
from mailmeter.policies.pricing import BlockPrice, FlatPrice, GraduatedPrice, Tier, VolumePrice


def test_the_five_plans_parse_into_the_expected_parts(five_plans: dict[str, Plan]) -> None:
    assert sorted(five_plans) == [
        "delivery-results",
        "included-capped",
        "limit-overage",
        "per-email-threshold",
        "postpay-tiered",
        "prepaid-tiered",
    ]
    a = five_plans["per-email-threshold"]
    assert a.price == FlatPrice(200) and a.in_period_charge == ThresholdCharge(250_000_000)
    b = five_plans["prepaid-tiered"]
    assert isinstance(b.price, GraduatedPrice) and b.funding == Funding(kind="prepaid", monthly_payment=100_000_000)
    assert b.price.tiers[0] == Tier(up_to=100_000, per_email=1_000) and (b.plan_fee, b.included_emails) == (0, 0)
    postpay = five_plans["postpay-tiered"]
    assert postpay.price == b.price and postpay.funding == Funding(kind="postpaid", net_days=14)
    c = five_plans["delivery-results"]
    assert c.billable == "results" and c.result_prices.hard_bounced == 50
    assert c.funding.overdraft_allowance == 200_000_000 and c.period.timezone == "Asia/Shanghai"
    d = five_plans["included-capped"]
    assert d.title == "Pro 100k" and d.price == BlockPrice(167, 1_000_000) and d.in_period_charge == BlockCharge()
    assert d.period.kind == "anniversary" and d.spending_limit == 599_000_000
    e = five_plans["limit-overage"]
    assert e.included_emails == 50_000 and e.price == BlockPrice(5_000, 1_000_000)
    assert e.usage_alerts == (75, 90, 100)


def test_every_key_of_the_yaml_carries_a_comment() -> None:
    text = Path(__file__).with_name("five_plans.yaml").read_text(encoding="utf-8")
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            assert "#" in line, f"five_plans.yaml line {number} has no comment: {line!r}"


def test_quota_only_plans_keep_working() -> None:
    plan = parse_plan("basic", {"email_quota": 100})
    assert plan.email_quota == 100 and plan.price == FlatPrice(0)
    assert admit(plan, Standing(), Usage(accepted=99, reserved=0), 5).granted == 1
    assert admit(plan, Standing(), Usage(accepted=100), 1).refusal is Refusal.QUOTA_EXHAUSTED
    assert admit(plan, Standing(email_quota_override=200), Usage(accepted=100), 1).granted == 1
    assert Plan(name="legacy", email_quota=3).email_quota == 3


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ({"emails_quota": 1}, "plans.p.emails_quota"),
        ({"email_quota": "10"}, "plans.p.email_quota"),
        ({"price": {"kind": "flat", "amount": 0.0002}}, "plans.p.price.amount"),
        ({"price": {"kind": "flat", "amount": "1", "per": 3}}, "plans.p.price.per"),
        ({"price": {"kind": "flat", "amount": "0.0001", "per": 1000}}, "plans.p.price.amount"),
        ({"price": {"kind": "flat"}}, "plans.p.price.amount"),
        ({"price": {"kind": "tiered"}}, "plans.p.price.kind"),
        (
            {
                "price": {
                    "kind": "graduated",
                    "tiers": [{"up_to": 10, "amount": "1"}, {"up_to": 5, "amount": "1"}, {"amount": "1"}],
                }
            },
            "plans.p.price.tiers",
        ),
        ({"price": {"kind": "graduated", "tiers": [{"up_to": 10, "amount": "1"}]}}, "plans.p.price.tiers"),
        ({"price": {"kind": "volume", "tiers": [{"amount": "1", "upto": 3}]}}, "plans.p.price.tiers[0].upto"),
        (
            {
                "price": {"kind": "volume", "tiers": [{"up_to": 9, "amount": "1"}, {"amount": "0.5"}]},
                "in_period_charge": {"kind": "threshold", "amount": "10"},
            },
            "plans.p.in_period_charge",
        ),
        (
            {"in_period_charge": {"kind": "threshold", "amount": "0.001"}, "price": {"kind": "flat", "amount": "1"}},
            "plans.p.in_period_charge.amount",
        ),
        ({"in_period_charge": {"kind": "per_block"}}, "plans.p.in_period_charge.kind"),
        (
            {
                "price": {"kind": "per_block", "amount": "0.005", "block_emails": 10},
                "in_period_charge": {"kind": "per_block"},
            },
            "plans.p.price.amount",
        ),
        ({"price": {"kind": "per_block", "amount": "1"}}, "plans.p.price.block_emails"),
        ({"billable": "results"}, "plans.p.result_prices"),
        (
            {"billable": "results", "result_prices": {"delivered": "1"}, "price": {"kind": "flat", "amount": "1"}},
            "plans.p.price",
        ),
        ({"billable": "results", "result_prices": {"delivered": "1"}, "included_emails": 5}, "plans.p.included_emails"),
        ({"billable": "results", "result_prices": {"bounced": "1"}}, "plans.p.result_prices.bounced"),
        (
            {"billable": "results", "result_prices": {"invalid": "1", "hard_bounced": "1"}},
            "plans.p.result_prices.hard_bounced",
        ),
        (
            {
                "billable": "results",
                "result_prices": {"delivered": "1"},
                "in_period_charge": {"kind": "threshold", "amount": "1"},
            },
            "plans.p.in_period_charge",
        ),
        ({"result_prices": {"delivered": "1"}}, "plans.p.result_prices"),
        ({"billable": "sent"}, "plans.p.billable"),
        ({"funding": {"kind": "prepaid", "overdraft_allowance": "5"}}, "plans.p.funding.overdraft_allowance"),
        (
            {
                "funding": {"kind": "postpaid", "overdraft_allowance": "5"},
                "price": {"kind": "per_block", "amount": "1", "block_emails": 10},
                "in_period_charge": {"kind": "per_block"},
            },
            "plans.p.funding.overdraft_allowance",
        ),
        (
            {
                "funding": {"kind": "prepaid"},
                "price": {"kind": "flat", "amount": "1"},
                "in_period_charge": {"kind": "threshold", "amount": "5"},
            },
            "plans.p.in_period_charge",
        ),
        ({"funding": {"kind": "credit"}}, "plans.p.funding.kind"),
        ({"funding": {"net_days": -1}}, "plans.p.funding.net_days"),
        ({"plan_fee": "9.999"}, "plans.p.plan_fee"),
        ({"spending_limit": "-1"}, "plans.p.spending_limit"),
        ({"period": {"kind": "weekly"}}, "plans.p.period.kind"),
        ({"period": {"timezone": "Mars/Olympus"}}, "plans.p.period.timezone"),
        ({"invoicing": {"issue_time": 900}}, "plans.p.invoicing.issue_time"),
        ({"invoicing": {"issue_time": "25:00"}}, "plans.p.invoicing.issue_time"),
        ({"usage_alerts": [90, 75], "included_emails": 10}, "plans.p.usage_alerts"),
        ({"usage_alerts": [75]}, "plans.p.usage_alerts"),
        ({"display_name": 5}, "plans.p.display_name"),
    ],
)
def test_errors_name_the_dotted_key(body: dict[str, Any], key: str) -> None:
    with pytest.raises(PlanError) as raised:
        parse_plan("p", body)
    assert raised.value.key == key, str(raised.value)


def test_an_unquoted_yaml_float_is_refused_with_a_hint() -> None:
    body = yaml.safe_load("price: {kind: flat, amount: 0.0002}")
    with pytest.raises(PlanError, match='quoted string like "0.0002"'):
        parse_plan("p", body)


def test_a_custom_path_prefixes_the_key() -> None:
    with pytest.raises(PlanError) as raised:
        parse_plan("p", {"plan_fee": "0.001"}, path="config.plans.p")
    assert raised.value.key == "config.plans.p.plan_fee"


def test_plans_built_in_code_are_checked_too() -> None:
    with pytest.raises(PlanError) as raised:
        Plan(name="x", price=VolumePrice((Tier(5, 2), Tier(None, 1))), in_period_charge=ThresholdCharge(10_000))
    assert raised.value.key == "plans.x.in_period_charge"
