"""A plan: a combination of parts, and the rules for which parts fit together.

A plan is data: which period it bills over, what is billable and at what unit price,
which in-period charges collect it, which caps bound it and how it is funded. The
consistency rules live with the dataclass so that an invalid combination cannot
reach the meter even when a plan is built in code rather than parsed from config.
"""

from __future__ import annotations

from dataclasses import dataclass

from mailmeter.policies.currency import USD, Currency
from mailmeter.policies.money import is_whole_minor
from mailmeter.policies.parts import (
    Billable,
    Funding,
    InPeriodCharge,
    Invoicing,
    ResultPrices,
    ThresholdCharge,
)
from mailmeter.policies.periods import PeriodSpec
from mailmeter.policies.pricing import BlockPrice, FlatPrice, GraduatedPrice, Tier, UnitPrice, VolumePrice
from mailmeter.policies.rate import SendRate


class PlanError(ValueError):
    """A plan definition that cannot be used; `key` is the dotted path at fault."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


@dataclass(frozen=True)
class Plan:
    """A billing plan: a combination of parts.

    email_quota: hard cap on emails held per period (None: no count cap).
    included_emails: the period's first emails, free; overage/tiers start after them.
    plan_fee: micros per period, on the closing invoice.
    billable: "accepted" (price the accepted emails with `price`) or "results"
      (price final delivery results with `result_prices`, model C).
    in_period_charge: collect usage during the period (threshold or per block).
    spending_limit: micros of priced usage allowed per period (model D), None: none.
    usage_alerts: percentages of the email limit that notify once per period (model E).
    currency: the billing currency (one for all plans: `billing.currency`); amounts
      charged as they are must be whole minor units of it, invoice lines round to them.
    sending_rate: at most this many recipients per second/minute/hour/day (policies/rate.py);
      an account may set its own (None: no rate).
    rank: the plan's place among plans an account changes between; a change to a higher
      rank is an upgrade (at once), to a lower or equal one a downgrade (at period end).
      None: ordered by plan fee, then included emails (policies/changes.py).
    suppression: a recipient the account's mail hard-bounced to as Invalid Email (does not
      exist, format error) is refused at RCPT from then on, unbilled (policies/results.py).

    Construction checks that the parts fit together and raises PlanError naming
    the config key (under `plans.<name>`) otherwise, so an invalid combination
    cannot reach the meter even when built in code.
    """

    name: str
    period: PeriodSpec = PeriodSpec()
    email_quota: int | None = None
    display_name: str | None = None
    plan_fee: int = 0
    included_emails: int = 0
    billable: Billable = "accepted"
    price: UnitPrice = FlatPrice(0)
    result_prices: ResultPrices = ResultPrices()
    in_period_charge: InPeriodCharge | None = None
    spending_limit: int | None = None
    funding: Funding = Funding()
    invoicing: Invoicing = Invoicing()
    usage_alerts: tuple[int, ...] = ()
    currency: Currency = USD
    rank: int | None = None
    sending_rate: SendRate | None = None
    suppression: bool = True

    def __post_init__(self) -> None:
        problem = plan_problem(self)
        if problem is not None:
            key, message = problem
            raise PlanError(f"plans.{self.name}.{key}", message)

    @property
    def title(self) -> str:
        """The name people see ("Pro 100k"); the config name otherwise."""
        return self.display_name or self.name


def tiers_problem(tiers: tuple[Tier, ...]) -> str | None:
    if not tiers:
        return "needs at least one tier"
    previous = 0
    for number, tier in enumerate(tiers):
        if tier.per_email < 0:
            return f"tier {number}: price must not be negative"
        last = number == len(tiers) - 1
        if tier.up_to is None:
            if not last:
                return f"tier {number}: only the last tier may omit up_to"
            continue
        if last:
            return "the last tier must be open-ended (omit its up_to)"
        if tier.up_to <= previous:
            return f"tier {number}: up_to must be greater than the previous tier's ({previous})"
        previous = tier.up_to
    return None


def plan_problem(plan: Plan) -> tuple[str, str] | None:
    """The first reason the parts do not fit together: (key relative to the plan, message)."""
    for key, value in (("email_quota", plan.email_quota), ("included_emails", plan.included_emails)):
        if value is not None and value < 0:
            return key, "must not be negative"
    whole = _whole_units(plan.currency)
    if plan.plan_fee < 0 or not is_whole_minor(plan.plan_fee, plan.currency):
        return "plan_fee", f"must be a non-negative amount in {whole} (it is charged as it is)"
    if plan.spending_limit is not None and plan.spending_limit < 0:
        return "spending_limit", "must not be negative"
    if plan.rank is not None and plan.rank < 0:
        return "rank", "must not be negative"
    price = plan.price
    if isinstance(price, (GraduatedPrice, VolumePrice)):
        problem = tiers_problem(price.tiers)
        if problem is not None:
            return "price.tiers", problem
    elif isinstance(price, FlatPrice) and price.per_email < 0:
        return "price.amount", "must not be negative"
    elif isinstance(price, BlockPrice):
        if price.block_emails <= 0:
            return "price.block_emails", "must be at least 1"
        if price.per_block < 0:
            return "price.amount", "must not be negative"
    if min(plan.result_prices.delivered, plan.result_prices.soft_bounced, plan.result_prices.hard_bounced) < 0:
        return "result_prices", "prices must not be negative"
    if plan.billable == "results" and plan.included_emails:
        return "included_emails", "counts accepted emails; a plan billed on results prices each result instead"
    funding = plan.funding
    if funding.kind not in ("prepaid", "postpaid"):
        return "funding.kind", f"must be prepaid or postpaid, got {funding.kind!r}"
    if funding.net_days < 0:
        return "funding.net_days", "must not be negative"
    if funding.monthly_payment:
        if funding.kind != "prepaid":
            return "funding.monthly_payment", (
                "is credit added to a prepaid balance; a postpaid plan is invoiced for what it sends"
                " (remove it, or use kind: prepaid)"
            )
        if funding.monthly_payment < 0 or not is_whole_minor(funding.monthly_payment, plan.currency):
            return "funding.monthly_payment", (
                f"must be a non-negative amount in {_whole_units(plan.currency)} (it is charged as it is)"
            )
    if funding.overdraft_allowance is not None:
        if funding.kind == "prepaid":
            return "funding.overdraft_allowance", "a prepaid plan sends only what its balance covers; use postpaid"
        if funding.overdraft_allowance < 0:
            return "funding.overdraft_allowance", "must not be negative"
    if plan.invoicing.statement_after_days < 0:
        return "invoicing.statement_after_days", "must not be negative"
    if any(not 1 <= percent <= 1000 for percent in plan.usage_alerts):
        return "usage_alerts", "each alert is a percentage of the email limit, 1 to 1000"
    if list(plan.usage_alerts) != sorted(set(plan.usage_alerts)):
        return "usage_alerts", "percentages must be distinct and ascending"
    if plan.usage_alerts and not plan.included_emails and plan.email_quota is None:
        return "usage_alerts", "needs an email limit: included_emails or email_quota"
    return _charge_problem(plan)


def _charge_problem(plan: Plan) -> tuple[str, str] | None:
    charge = plan.in_period_charge
    if charge is None:
        return None
    if plan.billable == "results":
        return "in_period_charge", (
            "in-period charges fall due at acceptance, but a plan billed on results has no price until the result"
        )
    if plan.funding.kind == "prepaid":
        return "in_period_charge", "a prepaid plan is paid from its balance; in-period charges are for postpaid plans"
    if isinstance(charge, ThresholdCharge):
        if charge.amount <= 0 or not is_whole_minor(charge.amount, plan.currency):
            return "in_period_charge.amount", (
                f"must be more than 0 and in {_whole_units(plan.currency)} (it is charged as it is)"
            )
        if isinstance(plan.price, VolumePrice):
            return "in_period_charge", (
                "volume tiers can lower the period's cost as volume grows, so a threshold charge"
                " could exceed the final bill; use graduated tiers"
            )
        return None
    if not isinstance(plan.price, BlockPrice):
        return "in_period_charge.kind", "per_block charges need price.kind: per_block"
    if plan.funding.overdraft_allowance is not None:
        # Each block is charged as it opens, so unpaid usage never builds up: an overdraft
        # allowance would bound nothing (use spending_limit to cap the charges instead).
        return "funding.overdraft_allowance", (
            "per_block in-period charges collect each block as it opens; cap them with spending_limit instead"
        )
    if plan.price.per_block <= 0 or not is_whole_minor(plan.price.per_block, plan.currency):
        return "price.amount", (
            f"a block charged in the period must cost more than 0, in {_whole_units(plan.currency)}"
        )
    return None


def _whole_units(currency: Currency) -> str:
    """How an amount charged as it is must be written: "whole multiples of 0.01 USD"."""
    return f"whole multiples of {currency.smallest} {currency.code}"
