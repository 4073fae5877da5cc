"""Simulate one period of a plan: what `mailmeter plan preview` shows before a plan is used.

The simulation sends `emails` emails spread evenly from `start` to the end of the
period that contains it, through the same admit / charges_due / close_period the meter
uses, so a preview cannot disagree with the relay. It never loops per email: it asks
the admission for the whole remaining room at once and only steps again where an
in-period charge raises the room (postpaid overdraft with threshold charges), so
millions of emails take a handful of steps.

A preview may start from a standing (a prepaid balance, limits) and follow a script:
events that happen once a given number of emails has been attempted (a limit change,
a plan change, a top-up, a payment failed or fixed). Each event is applied with the
same functions the meter applies it with (policies/changes.py), at the instant the
last email before it was sent. Emails refused while the account may not send (a
failed payment, a used-up balance) stay refused: the application's retries are not
simulated, only its attempts.

Delivery results (results-billed plans) are assumed to arrive after the sending, so
the admission is the conservative one the live relay applies while results lag.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta
from typing import Literal

from mailmeter.policies.account import Standing, Usage
from mailmeter.policies.changes import (
    LimitName,
    PlanChange,
    PlanChangeRefused,
    PlanSwitch,
    change_limit,
    switch_plan,
    without_own_limits,
)
from mailmeter.policies.charges import Charge, charges_due
from mailmeter.policies.decision import Refusal, headroom
from mailmeter.policies.invoice import Invoice, close_period
from mailmeter.policies.periods import Period, period_containing, period_label
from mailmeter.policies.plan import Plan
from mailmeter.policies.prepaid import monthly_payment

EventKind = Literal["limit", "plan", "top_up", "payment"]


@dataclass(frozen=True)
class TimedCharge:
    """An in-period charge and the simulated instant its trigger email is sent (None: not
    tied to one email)."""

    charge: Charge
    at: datetime | None


@dataclass(frozen=True)
class ScriptEvent:
    """Something that happens to the account once `at` emails of the preview were attempted.

    limit: set `limit` (included, quota: `value` emails; spending: `value` micros, None for none).
    plan: change to `plan` (an upgrade at once, anything else at the period's end).
    top_up: add `value` micros to the prepaid balance.
    payment: `ok` False is a failed payment (sending blocked), True the fix (released).
    """

    at: int
    kind: EventKind
    limit: LimitName | None = None
    value: int | None = None
    plan: Plan | None = None
    ok: bool = True


@dataclass(frozen=True)
class AppliedEvent:
    """A script event as applied: when, and what it did (a plan change's decision)."""

    event: ScriptEvent
    at: datetime
    switch: PlanSwitch | None = None


@dataclass(frozen=True)
class RefusedRun:
    """Attempts `first` to `last` (numbers among all attempts) were refused for `reason`."""

    first: int
    last: int
    reason: Refusal
    at: datetime

    @property
    def emails(self) -> int:
        return self.last - self.first + 1


@dataclass(frozen=True)
class Preview:
    """One simulated period: admission, every in-period charge, and the closing invoice.

    plan: the title of the plan the period ends on; refusal / first_refused_at: the
    first refusal; refusals: every run of refused attempts; pending: a plan change
    that takes effect when the period ends; standing: the account at the end.
    """

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
    refusals: tuple[RefusedRun, ...] = ()
    events: tuple[AppliedEvent, ...] = ()
    pending: PlanChange | None = None
    standing: Standing = Standing()


def _send_time(start: datetime, end: datetime, emails: int, ordinal: int) -> datetime:
    """When email `ordinal` (1-based) of `emails` is sent, spread evenly over [start, end).

    Integer microseconds, so the instants are exact and reproducible.
    """
    if ordinal <= 0 or emails <= 0:
        return start
    span = (end - start) // timedelta(microseconds=1)
    return start + timedelta(microseconds=span * (ordinal - 1) // emails)


def _accept(plan: Plan, standing: Standing, usage: Usage, emails: int) -> tuple[int, Refusal | None]:
    """How many of `emails` more attempts the account accepts from `usage` on, and why not the rest."""
    accepted = 0
    while accepted < emails:
        room, why = headroom(plan, standing, replace(usage, accepted=usage.accepted + accepted))
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


def check_script(events: Sequence[ScriptEvent], emails: int) -> None:
    """Raise ValueError naming the first event that cannot be applied."""
    for number, event in enumerate(events):
        where = f"events[{number}]"
        if not 0 <= event.at <= emails:
            raise ValueError(f"{where}.at: {event.at} is not between 0 and the {emails:,} emails of the preview")
        if event.kind == "limit" and event.limit not in ("included", "quota", "spending"):
            raise ValueError(f"{where}.limit: choose included, quota or spending")
        if event.kind == "limit" and event.limit != "spending" and (event.value is None or event.value < 0):
            raise ValueError(f"{where}.emails: give a number of emails, 0 or more")
        if event.kind == "limit" and event.limit == "spending" and event.value is not None and event.value < 0:
            raise ValueError(f"{where}.amount: the spending limit must not be negative")
        if event.kind == "plan" and event.plan is None:
            raise ValueError(f"{where}.plan: name the plan to change to")
        if event.kind == "top_up" and (event.value is None or event.value <= 0):
            raise ValueError(f"{where}.amount: a top-up must be positive")
        if event.kind not in ("limit", "plan", "top_up", "payment"):
            raise ValueError(f"{where}: unknown event {event.kind!r} (limit, plan, top_up, payment)")


@dataclass
class _Account:
    """The simulated account while the preview runs."""

    plan: Plan
    standing: Standing
    usage: Usage
    pending: PlanChange | None = None


def _apply(account: _Account, event: ScriptEvent, at: datetime, period: Period) -> AppliedEvent:
    """One script event, with the functions the meter applies it with."""
    if event.kind == "limit":
        assert event.limit is not None
        outcome = change_limit(account.plan, account.standing, account.usage, event.limit, event.value, at, period)
        account.standing = outcome.standing
        if outcome.history is not None:
            account.usage = replace(account.usage, history=outcome.history)
        return AppliedEvent(event, at)
    if event.kind == "plan":
        assert event.plan is not None
        try:
            switch = switch_plan(account.plan, event.plan, account.standing, account.usage, period, at, account.pending)
        except PlanChangeRefused as error:
            raise ValueError(str(error)) from None
        if switch.kind == "cancelled":
            account.pending = None
        elif switch.at_once and switch.kind == "upgrade":
            account.plan, account.pending = event.plan, None
            account.standing = without_own_limits(account.standing)
            account.usage = replace(account.usage, history=switch.history)
        elif not switch.at_once:
            account.pending = switch.pending
        return AppliedEvent(event, at, switch)
    if event.kind == "top_up":
        assert event.value is not None
        account.standing = replace(account.standing, prepaid_balance=account.standing.prepaid_balance + event.value)
    else:
        account.standing = replace(account.standing, payment_ok=event.ok)
    return AppliedEvent(event, at)


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
    events: Sequence[ScriptEvent] = (),
) -> Preview:
    """Simulate sending `emails` from `start` to the end of its period.

    anchor: subscription day for anniversary periods (default: start's local date).
    standing: the account facts to simulate with (prepaid balance carried in, overrides...);
      a prepaid plan's monthly payment is added to the balance, as the period's credit.
    delivered / soft_bounced / invalid: how the emails end; delivered defaults to the rest.
    events: the script, applied in order of `at` (events at the same count in the order given).
    """
    if emails < 0:
        raise ValueError("emails must be >= 0")
    check_script(events, emails)
    zone = plan.period.zone()
    period = period_containing(plan.period, start, anchor or start.astimezone(zone).date())
    # A prepaid plan's monthly payment is the period's credit, added as the period starts.
    credit = monthly_payment(plan, (), period)
    standing = replace(standing, prepaid_balance=standing.prepaid_balance + credit)
    script = sorted(events, key=lambda event: event.at)
    account = _Account(plan, standing, Usage())
    timed: list[TimedCharge] = []
    refusals: list[RefusedRun] = []
    applied: list[AppliedEvent] = []
    attempted = 0
    for stop in sorted({event.at for event in script} | {emails}):
        if stop > attempted:
            before = account.usage.accepted
            took, why = _accept(account.plan, account.standing, account.usage, stop - attempted)
            account.usage = replace(account.usage, accepted=before + took)
            after_index = timed[-1].charge.index if timed else 0
            for charge in charges_due(account.plan, account.standing, account.usage, after_index=after_index):
                trigger = charge.trigger_email
                at = None if trigger is None else _send_time(start, period.end, emails, attempted + trigger - before)
                timed.append(TimedCharge(charge, at))
            if took < stop - attempted:
                assert why is not None
                first = attempted + took + 1
                refusals.append(RefusedRun(first, stop, why, _send_time(start, period.end, emails, first)))
            attempted = stop
        for event in (event for event in script if event.at == stop):
            applied.append(_apply(account, event, _send_time(start, period.end, emails, stop), period))
    accepted = account.usage.accepted
    good, soft, hard = _results(accepted, emails, delivered, soft_bounced, invalid)
    usage = replace(account.usage, delivered=good, soft_bounced=soft, hard_bounced=hard)
    return Preview(
        plan=account.plan.title,
        period=period,
        period_label=period_label(account.plan.period, period),
        attempted=emails,
        accepted=accepted,
        refused=emails - accepted,
        refusal=refusals[0].reason if refusals else None,
        first_refused_at=refusals[0].at if refusals else None,
        usage=usage,
        charges=tuple(timed),
        invoice=close_period(account.plan, account.standing, usage, period, [t.charge for t in timed]),
        refusals=tuple(refusals),
        events=tuple(applied),
        pending=account.pending,
        standing=account.standing,
    )
