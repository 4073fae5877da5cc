"""The admission decision: may this account send N more emails now?

This is the narrow request/decision interface between the meter (which owns
state and atomicity) and the billing models (which own the rules), in the spirit
of Postfix's policy delegation: facts in, one decision out.

Every cap of a plan is turned into "at most this many held emails" in closed form
(O(number of price tiers), never a loop over emails), and the tightest one decides.
Because caps bound *held* emails (accepted + reserved), a grant can never be
overtaken by a later commit: whatever is granted is already counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from mailmeter.policies.account import Standing, Usage
from mailmeter.policies.charges import charged_total
from mailmeter.policies.limits import email_quota, spending_limit
from mailmeter.policies.plan import Plan
from mailmeter.policies.usage_cost import max_held_within


class Refusal(StrEnum):
    """Why an account may not send now. Each has one fixed SMTP text in relay/replies.py."""

    PAYMENT_FAILED = "payment_failed"
    SUSPENDED = "suspended"
    QUOTA_EXHAUSTED = "quota_exhausted"
    BALANCE_EXHAUSTED = "balance_exhausted"
    SPENDING_LIMIT = "spending_limit"
    OVERDRAFT_LIMIT = "overdraft_limit"
    RATE_LIMITED = "rate_limited"  # the sending rate's window is full (policies/rate.py): retry_after


@dataclass(frozen=True)
class Admission:
    """granted: emails admitted now; refusal: why the rest were not (None if all were);
    remaining: emails still admissible after this grant (None: no cap); with RATE_LIMITED,
    the rate and the seconds until its next window."""

    granted: int
    refusal: Refusal | None
    remaining: int | None
    rate: str | None = None
    retry_after: int | None = None


@dataclass(frozen=True)
class Cap:
    """One limit as a count: at most `max_held` emails may be held; past it, `refusal`."""

    max_held: int
    refusal: Refusal


def blocking_refusal(standing: Standing) -> Refusal | None:
    """A refusal that applies whatever the usage (checked at MAIL and RCPT)."""
    if standing.suspended:
        return Refusal.SUSPENDED
    if not standing.payment_ok:
        return Refusal.PAYMENT_FAILED
    return None


def caps(plan: Plan, standing: Standing, usage: Usage) -> list[Cap]:
    """Every count cap in force, in the order their refusal is preferred on a tie.

    - hard email limit (email_quota) -> QUOTA_EXHAUSTED
    - spending limit: priced usage of the held emails <= limit -> SPENDING_LIMIT
    - prepaid: priced usage of the held emails <= prepaid balance -> BALANCE_EXHAUSTED
      (at the graduated price of each held email, so the balance covers all of them)
    - postpaid overdraft: held exposure <= balance + allowance - old debt + what the
      in-period charges already collected -> OVERDRAFT_LIMIT
    Results-billed plans price each held email without a result at the highest result price.
    """
    found: list[Cap] = []
    quota = email_quota(plan, standing)
    if quota is not None:
        found.append(Cap(quota, Refusal.QUOTA_EXHAUSTED))
    budgets: list[tuple[int, Refusal]] = []
    limit = spending_limit(plan, standing)
    if limit is not None:
        budgets.append((limit, Refusal.SPENDING_LIMIT))
    funding = plan.funding
    if funding.kind == "prepaid":
        budgets.append((standing.prepaid_balance, Refusal.BALANCE_EXHAUSTED))
    elif funding.overdraft_allowance is not None:
        budget = (
            standing.prepaid_balance
            + funding.overdraft_allowance
            - standing.outstanding_debt
            + charged_total(plan, standing, usage)
        )
        budgets.append((budget, Refusal.OVERDRAFT_LIMIT))
    for budget, refusal in budgets:
        most = max_held_within(plan, standing, usage, budget)
        if most is not None:
            found.append(Cap(most, refusal))
    return found


def headroom(plan: Plan, standing: Standing, usage: Usage) -> tuple[int | None, Refusal | None]:
    """How many more emails may be held now, and the refusal that applies at zero.

    (None, None) means no cap at all.
    """
    blocked = blocking_refusal(standing)
    if blocked is not None:
        return 0, blocked
    tightest: Cap | None = None
    for cap in caps(plan, standing, usage):
        if tightest is None or cap.max_held < tightest.max_held:
            tightest = cap
    if tightest is None:
        return None, None
    return max(tightest.max_held - usage.held, 0), tightest.refusal


def admit(plan: Plan, standing: Standing, usage: Usage, requested: int) -> Admission:
    """Grant up to `requested` emails; a partial grant carries the refusal for the rest."""
    if requested < 0:
        raise ValueError("requested must be >= 0")
    room, refusal = headroom(plan, standing, usage)
    if room is None:
        return Admission(granted=requested, refusal=None, remaining=None)
    granted = min(requested, room)
    return Admission(
        granted=granted,
        refusal=refusal if granted < requested else None,
        remaining=room - granted,
    )


__all__ = ["Admission", "Cap", "Refusal", "Standing", "Usage", "admit", "blocking_refusal", "caps", "headroom"]
