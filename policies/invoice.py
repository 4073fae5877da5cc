"""The closing invoice of a period.

Rounding rule (the one place money is rounded): each invoice line's amount is the
exact micros of that line rounded half-up to the currency's minor unit (USD: the
cent, JPY: the yen, BHD: the fils), once. In-period charges and the plan fee are
whole minor units by construction (plan.py refuses other amounts), so for every period:

    sum(in-period charges) + invoice.total == plan fee + sum(rounded usage lines)

and the rounded usage lines differ from the exact priced usage by at most half a
minor unit per usage line (one line for accepted-email billing, one per result category
for results billing). Prepaid plans then settle usage lines from the balance.

A charge once made is final, and the emails already sent keep their prices when a
limit or the plan changes (policies/history.py), so the in-period charges never exceed
the usage lines they collect: the total is at least the plan fee, never negative. A
period whose plan changed shows each part under its plan, in order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Literal

from mailmeter.policies.account import Standing, Usage
from mailmeter.policies.charges import Charge, charges_due
from mailmeter.policies.currency import Currency
from mailmeter.policies.history import PartPricing, part_start
from mailmeter.policies.money import display_money, floor_to_minor, round_half_up
from mailmeter.policies.periods import Period, PeriodSpec, period_label
from mailmeter.policies.plan import Plan
from mailmeter.policies.usage_cost import NO_HISTORY, part_pricing

LineKind = Literal["fee", "plan_part", "usage", "in_period_charges", "charges_kept"]


@dataclass(frozen=True)
class InvoiceLine:
    """One line: `amount` is micros in whole minor units of the plan's currency (negative for what was already charged).

    kinds: fee; plan_part (amount 0: the part of the period, under which plan, that the
    lines after it belong to); usage; in_period_charges (negative); charges_kept.
    """

    kind: LineKind
    description: str
    quantity: int | None
    amount: int


@dataclass(frozen=True)
class Invoice:
    """A closed period's invoice.

    total: sum of the lines = plan fee + usage lines - in-period charges (+ charges kept).
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


def pricing_lines(pricing: PartPricing, currency: Currency) -> list[InvoiceLine]:
    """A part's usage as invoice lines, each rounded half-up to the currency's minor unit once."""
    if pricing.billable == "results":
        labels = ("Delivered", "Soft bounce", "Invalid email")
        return [
            InvoiceLine(
                "usage",
                f"{label}: {count:,} emails at {display_money(each, currency)}",
                count,
                round_half_up(count * each, currency),
            )
            for label, (count, each) in zip(labels, pricing.priced)
        ]
    if pricing.billable == "overage":
        over = pricing.chargeable
        if over == 0:
            return []
        amount = round_half_up(pricing.cost, currency)
        # Model E's wording, exactly: "Email overage: 1,200 emails. Cost: $1". The emails are
        # those sent beyond the limit in force when they were sent, even if it was raised since.
        return [
            InvoiceLine(
                "usage", f"Email overage: {over:,} emails. Cost: {display_money(amount, currency)}", over, amount
            )
        ]
    emails = pricing.emails
    priced = [f"{count:,} at {display_money(each, currency)}" for count, each in pricing.priced]  # "90,000 at $0.001"
    if not pricing.limit and len(priced) == 1:
        description = f"Emails: {priced[0]}"  # "Emails: 4,150,000 at $0.0002"
    else:
        parts = ([f"{emails - pricing.chargeable:,} included"] if pricing.limit else []) + priced
        description = f"Emails: {emails:,}" + (f" ({'; '.join(parts)})" if parts else "")
    return [InvoiceLine("usage", description, emails, round_half_up(pricing.cost, currency))]


def usage_lines(plan: Plan, standing: Standing, usage: Usage) -> list[InvoiceLine]:
    """The usage of the part of the period under the plan in force, as invoice lines."""
    return pricing_lines(part_pricing(plan, standing, usage), plan.currency)


@dataclass(frozen=True)
class _Section:
    """One plan's part of the period on the invoice: its usage and the charges it made."""

    header: InvoiceLine | None
    pricing: PartPricing
    charges: int
    charged: int


def _header(title: str, spec: PeriodSpec, start: datetime, end: datetime, first: int, last: int) -> InvoiceLine:
    """ "Pro 100k, Dec 6 - Dec 20: emails 1 to 135,640" (amount 0): which part of the period follows."""
    label = period_label(spec, Period(start, max(end, start + timedelta(microseconds=1))))
    emails = last - first + 1
    what = f"emails {first:,} to {last:,}" if emails > 0 else "no emails"
    return InvoiceLine("plan_part", f"{title}, {label}: {what}", max(emails, 0), 0)


def _sections(
    plan: Plan, standing: Standing, usage: Usage, period: Period, issued: Sequence[Charge] | None
) -> list[_Section]:
    history = usage.history or NO_HISTORY
    current = part_pricing(plan, standing, usage)
    if issued is None:
        own = charges_due(plan, standing, usage)
        current_charges = (len(own), sum(charge.amount for charge in own))
    else:
        later = [charge for charge in issued if charge.index > history.parts_charges]
        current_charges = (len(later), sum(charge.amount for charge in later))
    if not history.parts:
        return [_Section(None, current, *current_charges)]
    sections: list[_Section] = []
    offset = 0
    for part in history.parts:
        if issued is None:
            made = (part.charges, part.charged)
        else:
            mine = [charge for charge in issued if offset < charge.index <= offset + part.charges]
            made = (len(mine), sum(charge.amount for charge in mine))
        offset += part.charges
        header = _header(part.title, plan.period, part.start, part.end, part.first_email, part.last_email)
        sections.append(_Section(header, part.pricing, *made))
    start = part_start(history, period.start)
    header = _header(plan.title, plan.period, start, period.end, history.part_from + 1, usage.accepted)
    sections.append(_Section(header, current, *current_charges))
    return sections


def _section_lines(section: _Section, currency: Currency) -> list[InvoiceLine]:
    lines = [] if section.header is None else [section.header]
    usage = pricing_lines(section.pricing, currency)
    lines.extend(usage)
    if section.charges:
        count = section.charges
        lines.append(
            InvoiceLine(
                "in_period_charges",
                f"Charged during the period: {count:,} usage charge{'s' if count != 1 else ''}",
                count,
                -section.charged,
            )
        )
    kept = section.charged - sum(line.amount for line in usage)
    if kept > 0:
        # Charges are final: were they ever more than the usage they collected (a price
        # changed in the config mid-period), the invoice keeps them instead of crediting.
        lines.append(InvoiceLine("charges_kept", "Usage charges kept (a charge once made is final)", None, kept))
    return lines


def close_period(
    plan: Plan,
    standing: Standing,
    usage: Usage,
    period: Period,
    issued_charges: Sequence[Charge] | None = None,
) -> Invoice:
    """The invoice for `period`, closed with this final committed `usage`.

    plan: the plan the period ends on (its fee is the period's fee). When the plan changed
    mid-period (usage.history), each part of the period is shown under its plan: a
    header line, its usage lines and the in-period charges it made.
    issued_charges: the in-period charges actually issued in the period (what the meter
    stored). None means exactly what the policy makes due, as in a preview. A charge once
    made is final: the total is never negative (see _section_lines).
    standing.prepaid_balance is the balance before this period's usage (see Standing).
    """
    lines: list[InvoiceLine] = []
    if plan.plan_fee:
        lines.append(InvoiceLine("fee", f"Plan fee: {plan.title}", 1, plan.plan_fee))
    for section in _sections(plan, standing, usage, period, issued_charges):
        lines.extend(_section_lines(section, plan.currency))
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


__all__ = ["Invoice", "InvoiceLine", "close_period", "pricing_lines", "usage_lines"]
