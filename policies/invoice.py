"""The closing invoice of a period.

Rounding rule (the one place money is rounded): each invoice line's amount is the
exact micros of that line rounded half-up to the currency's minor unit (USD: the
cent, JPY: the yen, BHD: the fils), once. In-period charges and the plan fee are
whole minor units by construction (plan.py refuses other amounts), so for every period:

    sum(in-period charges) + invoice.total == plan fee + sum(rounded usage lines)

and the rounded usage lines differ from the exact priced usage by at most half a
minor unit per usage line (one line for accepted-email billing, one per result
category for results billing). Prepaid plans then settle usage lines from the balance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Literal

from policies.account import Standing, Usage
from policies.charges import Charge, charges_due
from policies.limits import included_emails
from policies.money import display_money, floor_to_minor, round_half_up
from policies.periods import Period, period_label
from policies.plan import Plan
from policies.pricing import BlockPrice, FlatPrice, GraduatedPrice, Tier, VolumePrice, cost

LineKind = Literal["fee", "usage", "in_period_charges"]


@dataclass(frozen=True)
class InvoiceLine:
    """One line: `amount` is micros in whole minor units (negative for what was already charged)."""

    kind: LineKind
    description: str
    quantity: int | None
    amount: int


@dataclass(frozen=True)
class Invoice:
    """A closed period's invoice.

    total: sum of the lines = plan fee + usage lines - in-period charges.
    prepaid_applied: part of the usage lines paid from the prepaid balance (prepaid plans).
    amount_due: total - prepaid_applied, to collect by `due_date`.
    prepaid_balance_after: the balance to carry into the next period (prepaid plans;
      unused credit carries over), None for postpaid.
    issued_at: when the invoice exists (model C: 15:00 UTC+8 on the 1st), UTC.
    invoice_date / due_date / statement_date: dates in the plan's time zone.
    """

    plan: str
    period: Period
    period_label: str
    issued_at: datetime
    invoice_date: date
    due_date: date
    statement_date: date
    lines: tuple[InvoiceLine, ...]
    total: int
    prepaid_applied: int
    amount_due: int
    prepaid_balance_after: int | None

    @property
    def usage_total(self) -> int:
        return sum(line.amount for line in self.lines if line.kind == "usage")

    @property
    def in_period_charged(self) -> int:
        return -sum(line.amount for line in self.lines if line.kind == "in_period_charges")


def _tier_segments(tiers: tuple[Tier, ...], emails: int, included: int) -> list[tuple[int, int]]:
    """(emails, micros per email) of each graduated tier the chargeable emails reach."""
    segments: list[tuple[int, int]] = []
    low = 0
    for tier in tiers:
        start = max(low, included)
        end = emails if tier.up_to is None else min(tier.up_to, emails)
        if end > start:
            segments.append((end - start, tier.per_email))
        if tier.up_to is None:
            break
        low = tier.up_to
    return segments


def _accepted_usage_line(plan: Plan, standing: Standing, usage: Usage) -> InvoiceLine | None:
    emails = usage.accepted
    included = included_emails(plan, standing)
    exact = cost(plan.price, emails, included)
    price = plan.price
    currency = plan.currency
    if isinstance(price, BlockPrice):
        over = max(emails - included, 0)
        if over == 0:
            return None
        amount = round_half_up(exact, currency)
        # Model E's wording, exactly: "Email overage: 1,200 emails. Cost: $1".
        cost_text = display_money(amount, currency)
        return InvoiceLine("usage", f"Email overage: {over:,} emails. Cost: {cost_text}", over, amount)
    chargeable = max(emails - included, 0)
    priced: list[str] = []  # "90,000 at $0.001" for each price the chargeable emails met
    if chargeable:
        if isinstance(price, FlatPrice):
            priced.append(f"{chargeable:,} at {display_money(price.per_email, currency)}")
        elif isinstance(price, GraduatedPrice):
            priced.extend(
                f"{count:,} at {display_money(each, currency)}"
                for count, each in _tier_segments(price.tiers, emails, included)
            )
        elif isinstance(price, VolumePrice):
            priced.append(f"{chargeable:,} at {display_money(exact // chargeable, currency)}")
    if not included and len(priced) == 1:
        description = f"Emails: {priced[0]}"  # "Emails: 4,150,000 at $0.0002"
    else:
        parts = ([f"{min(emails, included):,} included"] if included else []) + priced
        description = f"Emails: {emails:,}" + (f" ({'; '.join(parts)})" if parts else "")
    return InvoiceLine("usage", description, emails, round_half_up(exact, currency))


def _result_lines(plan: Plan, usage: Usage) -> list[InvoiceLine]:
    prices = plan.result_prices
    rows = (
        ("Delivered", usage.delivered, prices.delivered),
        ("Soft bounce", usage.soft_bounced, prices.soft_bounced),
        ("Invalid email", usage.hard_bounced, prices.hard_bounced),
    )
    currency = plan.currency
    return [
        InvoiceLine(
            "usage",
            f"{label}: {count:,} emails at {display_money(each, currency)}",
            count,
            round_half_up(count * each, currency),
        )
        for label, count, each in rows
    ]


def usage_lines(plan: Plan, standing: Standing, usage: Usage) -> list[InvoiceLine]:
    """The period's usage as invoice lines, each rounded half-up to the currency's minor unit once."""
    if plan.billable == "results":
        return _result_lines(plan, usage)
    line = _accepted_usage_line(plan, standing, usage)
    return [] if line is None else [line]


def close_period(
    plan: Plan,
    standing: Standing,
    usage: Usage,
    period: Period,
    issued_charges: Sequence[Charge] | None = None,
) -> Invoice:
    """The invoice for `period`, closed with this final committed `usage`.

    issued_charges: the in-period charges actually issued in the period (what the meter
    stored). None means exactly charges_due(plan, standing, usage), as in a preview.
    Passing the stored ones keeps the invoice right even if an override changed the
    due charges mid-period: the invoice settles the difference (a negative total is
    a credit).
    standing.prepaid_balance is the balance before this period's usage (see Standing).
    """
    issued = list(charges_due(plan, standing, usage) if issued_charges is None else issued_charges)
    lines: list[InvoiceLine] = []
    if plan.plan_fee:
        lines.append(InvoiceLine("fee", f"Plan fee: {plan.title}", 1, plan.plan_fee))
    lines.extend(usage_lines(plan, standing, usage))
    charged = sum(charge.amount for charge in issued)
    if issued:
        count = len(issued)
        lines.append(
            InvoiceLine(
                "in_period_charges",
                f"Charged during the period: {count:,} usage charge{'s' if count != 1 else ''}",
                count,
                -charged,
            )
        )
    total = sum(line.amount for line in lines)
    usage_total = sum(line.amount for line in lines if line.kind == "usage")
    prepaid_applied = 0
    balance_after: int | None = None
    if plan.funding.kind == "prepaid":
        prepaid_applied = min(usage_total, max(floor_to_minor(standing.prepaid_balance, plan.currency), 0))
        balance_after = standing.prepaid_balance - prepaid_applied
    zone = plan.period.zone()
    invoice_date = period.end.astimezone(zone).date()
    issued_at = datetime.combine(invoice_date, plan.invoicing.issue_time, tzinfo=zone).astimezone(timezone.utc)
    return Invoice(
        plan=plan.title,
        period=period,
        period_label=period_label(plan.period, period),
        issued_at=issued_at,
        invoice_date=invoice_date,
        due_date=invoice_date + timedelta(days=plan.funding.net_days),
        statement_date=invoice_date + timedelta(days=plan.invoicing.statement_after_days),
        lines=tuple(lines),
        total=total,
        prepaid_applied=prepaid_applied,
        amount_due=total - prepaid_applied,
        prepaid_balance_after=balance_after,
    )


__all__ = ["Invoice", "InvoiceLine", "close_period", "usage_lines"]
