"""Simulate one period of a plan: what `mailmeter plan preview` shows before a plan is used.

The simulation sends `emails` emails spread evenly from `start` to the end of the
period that contains it, through the same admit / charges_due / close_period the meter
uses, so a preview cannot disagree with the relay. It never loops per email: it asks
the admission for the whole remaining room at once and only steps again where an
in-period charge raises the room (postpaid overdraft with threshold charges), so
millions of emails take a handful of steps.

Delivery results (results-billed plans) are assumed to arrive after the sending, so
the admission is the conservative one the live relay applies while results lag.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta

from policies.account import Standing, Usage
from policies.charges import Charge, charges_due
from policies.decision import Refusal, headroom
from policies.invoice import Invoice, close_period
from policies.periods import Period, period_containing, period_label
from policies.plan import Plan
from policies.prepaid import monthly_payment


@dataclass(frozen=True)
class TimedCharge:
    """An in-period charge and the simulated instant its trigger email is sent (None: not
    tied to one email)."""

    charge: Charge
    at: datetime | None


@dataclass(frozen=True)
class Preview:
    """One simulated period: admission, every in-period charge, and the closing invoice."""

    plan: str
    period: Period
    period_label: str
    attempted: int
    accepted: int
    refused: int
    refusal: Refusal | None
    first_refused_at: datetime | None
    usage: Usage
    charges: tuple[TimedCharge, ...]
    invoice: Invoice


def _send_time(start: datetime, end: datetime, emails: int, ordinal: int) -> datetime:
    """When email `ordinal` (1-based) of `emails` is sent, spread evenly over [start, end).

    Integer microseconds, so the instants are exact and reproducible.
    """
    span = (end - start) // timedelta(microseconds=1)
    return start + timedelta(microseconds=span * (ordinal - 1) // emails)


def _accept(plan: Plan, standing: Standing, emails: int) -> tuple[int, Refusal | None]:
    accepted = 0
    while accepted < emails:
        room, why = headroom(plan, standing, Usage(accepted=accepted))
        if room is None:
            return emails, None
        take = min(emails - accepted, room)
        if take == 0:
            return accepted, why
        accepted += take
    return accepted, None


def _results(
    accepted: int, emails: int, delivered: int | None, soft_bounced: int, invalid: int
) -> tuple[int, int, int]:
    """Split the accepted emails into results in the proportions given for all emails."""
    if min(soft_bounced, invalid) < 0 or (delivered is not None and delivered < 0):
        raise ValueError("result counts must not be negative")
    if delivered is None:
        delivered = emails - soft_bounced - invalid
        if delivered < 0:
            raise ValueError("soft_bounced + invalid exceed emails")
    if delivered + soft_bounced + invalid != emails:
        raise ValueError("delivered + soft_bounced + invalid must equal emails")
    if emails == 0:
        return 0, 0, 0
    soft = soft_bounced * accepted // emails
    hard = invalid * accepted // emails
    return accepted - soft - hard, soft, hard


def preview(
    plan: Plan,
    emails: int,
    start: datetime,
    *,
    anchor: date | None = None,
    standing: Standing = Standing(),
    delivered: int | None = None,
    soft_bounced: int = 0,
    invalid: int = 0,
) -> Preview:
    """Simulate sending `emails` from `start` to the end of its period.

    anchor: subscription day for anniversary periods (default: start's local date).
    standing: the account facts to simulate with (prepaid balance carried in, overrides...);
      a prepaid plan's monthly payment is added to the balance, as the period's credit.
    delivered / soft_bounced / invalid: how the emails end; delivered defaults to the rest.
    """
    if emails < 0:
        raise ValueError("emails must be >= 0")
    zone = plan.period.zone()
    period = period_containing(plan.period, start, anchor or start.astimezone(zone).date())
    # A prepaid plan's monthly payment is the period's credit, added as the period starts.
    credit = monthly_payment(plan, (), period)
    standing = replace(standing, prepaid_balance=standing.prepaid_balance + credit)
    accepted, refusal = _accept(plan, standing, emails)
    good, soft, hard = _results(accepted, emails, delivered, soft_bounced, invalid)
    usage = Usage(accepted=accepted, delivered=good, soft_bounced=soft, hard_bounced=hard)
    charges = charges_due(plan, standing, usage)
    timed = tuple(
        TimedCharge(
            charge,
            None if charge.trigger_email is None else _send_time(start, period.end, emails, charge.trigger_email),
        )
        for charge in charges
    )
    refused = emails - accepted
    return Preview(
        plan=plan.title,
        period=period,
        period_label=period_label(plan.period, period),
        attempted=emails,
        accepted=accepted,
        refused=refused,
        refusal=refusal,
        first_refused_at=_send_time(start, period.end, emails, accepted + 1) if refused else None,
        usage=usage,
        charges=timed,
        invoice=close_period(plan, standing, usage, period, charges),
    )
