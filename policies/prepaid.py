"""Model B's monthly payment, and what a prepaid balance holds for a period.

The monthly payment is credit: at the start of every period the account is charged
its monthly payment and the amount is added to its prepaid balance; every email is
paid from the balance at the period's graduated price, and what is not spent carries
over. The plan gives the amount (`funding.monthly_payment`); an account may pay
another one ("increase your payment"), which applies from the next period's credit:
a period's credit is fixed once the period has started.

Pure: the meter keeps the account's changes of the amount, its balance and which
periods are credited and invoiced, and asks here what a period's credit is and how
much an ended period that is not invoiced yet may still take from the balance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from mailmeter.policies.account import Standing, Usage
from mailmeter.policies.charges import Charge
from mailmeter.policies.invoice import usage_lines
from mailmeter.policies.limits import included_emails
from mailmeter.policies.money import display_money, round_half_up
from mailmeter.policies.periods import Period
from mailmeter.policies.plan import Plan
from mailmeter.policies.pricing import cost_ceiling


@dataclass(frozen=True)
class PaymentChange:
    """From the period that starts at `starts` on, the account's monthly payment is `amount` micros."""

    starts: datetime
    amount: int


def monthly_payment(plan: Plan, changes: Sequence[PaymentChange], period: Period) -> int:
    """The credit `period` gets: the latest change that starts by then, else the plan's amount.

    Only prepaid plans have one (0 otherwise). `changes` ascend by `starts`.
    """
    if plan.funding.kind != "prepaid":
        return 0
    amount = plan.funding.monthly_payment
    for change in changes:
        if change.starts <= period.start:
            amount = change.amount
    return amount


def with_change(changes: Sequence[PaymentChange], change: PaymentChange) -> tuple[PaymentChange, ...]:
    """The account's changes after `change`: it replaces every change from its start on."""
    return tuple(kept for kept in changes if kept.starts < change.starts) + (change,)


def monthly_credit(plan: Plan, changes: Sequence[PaymentChange], period: Period, label: str) -> Charge | None:
    """The charge that collects `period`'s monthly payment (key `monthly/1`); None when it is 0."""
    amount = monthly_payment(plan, changes, period)
    if amount <= 0:
        return None
    return Charge(
        kind="monthly",
        index=1,
        amount=amount,
        emails_unlocked=None,
        trigger_email=None,
        description=f"Monthly payment for {label}: {display_money(amount, plan.currency)} added to the prepaid balance",
    )


def unsettled_usage(plan: Plan, standing: Standing, usage: Usage) -> int:
    """The most an ended period's usage can still take from the prepaid balance when it is invoiced.

    Until its invoice deducts it, the usage of an ended period is still in the balance;
    the next period may only spend what is left after it. Held emails count as
    accepted (a commit of a transaction that straddled the period's end may still
    land), at the cost ceiling, rounded as the invoice's usage line rounds: never less
    than the invoice will deduct.
    """
    if plan.billable == "results":
        return sum(line.amount for line in usage_lines(plan, standing, usage))
    return round_half_up(cost_ceiling(plan.price, usage.held, included_emails(plan, standing)), plan.currency)


__all__ = ["PaymentChange", "monthly_credit", "monthly_payment", "unsettled_usage", "with_change"]
