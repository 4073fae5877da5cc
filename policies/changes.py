"""What an account change does to the period in force: a limit change, a plan change.

Pure functions of the account's plan, standing and usage at the instant of the change,
shared by the meter (which stores what they return in the change's own transaction)
and by `plan preview` (which applies them to its simulated account), so that a preview
cannot disagree with the relay about a change.

Limits (model E): an increase applies at once, a decrease when the period ends. An
increase of the included emails prices only the emails sent after it: the period's
history (policies/history.py) keeps the emails sent before it at the price they had.

Plans: a change to a bigger plan (an upgrade) applies at once: the new plan's
allowance and prices from now on, its included emails counting the whole period's
emails; the part of the period under the old plan stays as it was, charges included.
Any other change (a downgrade, or a plan of the same size) applies when the period
ends, like a limit decrease, and so does a change between a prepaid and a postpaid
plan (a period is funded one way). Which plan is bigger: the higher `rank` when both
plans have one; otherwise the higher plan fee, then more included emails, then the
higher email quota (no quota is the highest). Plans must cut time into the same
billing periods and bill the same thing (accepted emails or delivery results): a
change never moves the account's periods, and no email is billed twice or never.
The account's own limits (included, quota, spending) belong to its plan: a plan
change drops them when it takes effect.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import Literal

from mailmeter.policies.account import Standing, Usage
from mailmeter.policies.charges import charge_amount, charge_count
from mailmeter.policies.history import History, PlanPart, part_start
from mailmeter.policies.limits import LimitChange, email_quota, included_emails
from mailmeter.policies.periods import Period, PeriodSpec
from mailmeter.policies.plan import Plan
from mailmeter.policies.usage_cost import NO_HISTORY, part_pricing

LimitName = Literal["included", "quota", "spending"]
SwitchKind = Literal["upgrade", "downgrade", "unchanged", "cancelled"]


# -- limits -----------------------------------------------------------------------------


@dataclass(frozen=True)
class LimitOutcome:
    """A limit change: what to store, and the standing and history in force after it.

    change: the email-limit change to store (included, quota); None for spending.
    spending: the spending limit to store (spending only; None: no limit).
    standing: the standing in force for the rest of the period.
    history: the period's history from now on; None: unchanged.
    """

    change: LimitChange | None
    spending: int | None
    standing: Standing
    history: History | None


def after_limit_change(plan: Plan, standing: Standing, usage: Usage) -> History | None:
    """The period's history once the included emails in force change now (`standing`:
    before the change; `usage`: committed at this instant). None when nothing sent
    before the change needs a price kept (nothing sent yet, or a results-billed plan)."""
    if plan.billable == "results" or (usage.history is None and usage.accepted == 0):
        return usage.history
    pricing = part_pricing(plan, standing, usage)
    return replace(
        usage.history or NO_HISTORY, since=usage.accepted, chargeable=pricing.chargeable, tiers=pricing.tiers
    )


def change_limit(
    plan: Plan, standing: Standing, usage: Usage, which: LimitName, value: int | None, at: datetime, period: Period
) -> LimitOutcome:
    """Set one of the account's limits at `at`, in `period` (the period in force).

    included / quota: `value` emails; an increase applies at once, a decrease at period end.
    spending: `value` micros (None: no spending limit), at once, either way.
    """
    if which == "spending":
        return LimitOutcome(None, value, replace(standing, spending_limit_override=value), None)
    if which == "included":
        if value is None:
            raise ValueError("the included emails must be a number")
        change = LimitChange(previous=included_emails(plan, standing), new=value, changed_at=at)
        after = replace(standing, included_emails_override=change.value_during(period))
        moved = included_emails(plan, after) != included_emails(plan, standing)
        return LimitOutcome(change, None, after, after_limit_change(plan, standing, usage) if moved else None)
    change = LimitChange(previous=email_quota(plan, standing), new=value, changed_at=at)
    return LimitOutcome(change, None, replace(standing, email_quota_override=change.value_during(period)), None)


# -- plans ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanChange:
    """A plan change waiting for the end of the period: from `effective` on, `plan` is in force."""

    plan: str
    previous: str
    requested_at: datetime
    effective: datetime

    def due(self, instant: datetime) -> bool:
        """Whether the change is in force at `instant` (a period starting then is under `plan`)."""
        return instant >= self.effective


@dataclass(frozen=True)
class PlanSwitch:
    """What a plan change request does.

    kind: upgrade, downgrade (any change that is not an upgrade), unchanged (already on
      it), cancelled (back to the plan in force: a pending change is dropped).
    at_once: the new plan is in force from `effective` (now); otherwise from the period's end.
    reason: one sentence saying when it applies and why.
    history: at once, the period's history from now on (None: nothing to keep).
    pending: otherwise, the change to store with the account.
    """

    kind: SwitchKind
    at_once: bool
    effective: datetime
    reason: str
    history: History | None = None
    pending: PlanChange | None = None


class PlanChangeRefused(ValueError):
    """The two plans cannot follow each other in one account's periods; the message says why."""


def plan_size(plan: Plan) -> tuple[int, int, float]:
    """The order of plans without a rank: plan fee, then included emails, then email quota."""
    quota = float("inf") if plan.email_quota is None else float(plan.email_quota)
    return plan.plan_fee, plan.included_emails, quota


def is_upgrade(current: Plan, new: Plan) -> bool:
    """A change to a bigger plan: by `rank` when both have one, else by plan_size."""
    if current.rank is not None and new.rank is not None:
        return new.rank > current.rank
    return plan_size(new) > plan_size(current)


def _periods(spec: PeriodSpec) -> str:
    kind = "calendar months" if spec.kind == "calendar_month" else "subscription anniversaries"
    return f"{kind} in {spec.timezone}"


def change_problem(current: Plan, new: Plan) -> str | None:
    """Why an account on `current` cannot change to `new` at all (None: it can)."""
    if current.period != new.period:
        return (
            f"plan {current.name!r} bills {_periods(current.period)} and plan {new.name!r}"
            f" {_periods(new.period)}: a plan change keeps the account's billing periods, so choose"
            f" (or define) a plan whose period is {_periods(current.period)}"
        )
    if current.billable != new.billable:
        what = {"accepted": "accepted emails", "results": "delivery results"}
        return (
            f"plan {current.name!r} bills {what[current.billable]} and plan {new.name!r}"
            f" {what[new.billable]}: emails in flight at the change would be billed twice or never,"
            f" so choose a plan that bills {what[current.billable]}"
        )
    return None


def after_plan_change(plan: Plan, standing: Standing, usage: Usage, period: Period, at: datetime) -> History | None:
    """The period's history once `plan` (in force until now) gives way to another at `at`:
    the part under `plan` is finished, with its emails, prices and charges."""
    history = usage.history or NO_HISTORY
    pricing = part_pricing(plan, standing, usage)
    charges = charge_count(plan, standing, usage) - history.parts_charges
    if not pricing.emails and not pricing.cost and not charges and not any(n for n, _ in pricing.priced):
        return usage.history  # nothing happened under it: no part to show
    part = PlanPart(
        plan=plan.name,
        title=plan.title,
        start=part_start(usage.history, period.start),
        end=at,
        first_email=history.part_from + 1,
        pricing=pricing,
        charges=charges,
        charged=charges * charge_amount(plan),
    )
    return History(parts=history.parts + (part,), since=usage.accepted)


def without_own_limits(standing: Standing) -> Standing:
    """The standing once a plan change takes effect: the new plan's limits, not the account's own."""
    return replace(standing, included_emails_override=None, email_quota_override=None, spending_limit_override=None)


def switch_plan(
    current: Plan,
    new: Plan,
    standing: Standing,
    usage: Usage,
    period: Period,
    now: datetime,
    pending: PlanChange | None = None,
) -> PlanSwitch:
    """Decide a request, made at `now` in `period`, to move an account on `current`
    (with `pending` waiting, if any) to `new`. Raises PlanChangeRefused."""
    if new.name == current.name:
        if pending is not None:
            return PlanSwitch(
                "cancelled",
                True,
                now,
                f"the change to plan {pending.plan!r} at the end of the period is cancelled;"
                f" the account stays on plan {current.name!r}",
            )
        return PlanSwitch("unchanged", True, now, f"the account is already on plan {current.name!r}")
    problem = change_problem(current, new)
    if problem is not None:
        raise PlanChangeRefused(problem)
    upgrade = is_upgrade(current, new)
    kind: SwitchKind = "upgrade" if upgrade else "downgrade"
    if upgrade and current.funding.kind == new.funding.kind:
        return PlanSwitch(
            kind,
            True,
            now,
            "an upgrade applies at once: the new plan's allowance and prices from now on;"
            " emails already sent keep their prices and charges already made stay",
            history=after_plan_change(current, standing, usage, period, now),
        )
    if upgrade:
        reason = (
            f"plan {current.name!r} is {current.funding.kind} and plan {new.name!r} {new.funding.kind}:"
            " a period is funded one way, so the change applies when the period ends"
        )
    else:
        reason = (
            f"plan {new.name!r} is not bigger than plan {current.name!r}"
            " (see rank, plan fee, included emails): the change applies when the period ends"
        )
    change = PlanChange(plan=new.name, previous=current.name, requested_at=now, effective=period.end)
    return PlanSwitch(kind, False, period.end, reason, pending=change)


__all__ = [
    "LimitName",
    "LimitOutcome",
    "PlanChange",
    "PlanChangeRefused",
    "PlanSwitch",
    "after_limit_change",
    "after_plan_change",
    "change_limit",
    "change_problem",
    "is_upgrade",
    "plan_size",
    "switch_plan",
    "without_own_limits",
]
