"""Plain data the meter stores and returns."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import date, datetime
from enum import StrEnum

from policies.currency import Currency
from policies.limits import LimitChange
from policies.money import format_money


class Result(StrEnum):
    """Per-recipient results.

    As the relay reports them, they are its delivery verdict: delivered; deferred (will
    be retried); soft_bounced (temporary failures until the queue's maximum age);
    hard_bounced (refused permanently, not retried). As the meter stores and counts them
    they are the billing category (model C), which policies/results.py derives from the
    verdict and what the reply means: a `552 5.2.2` (mailbox full) is refused
    permanently and billed as soft_bounced. hard_bounced is the document's "Invalid Email".
    """

    DELIVERED = "delivered"
    DEFERRED = "deferred"  # not final: will be retried
    SOFT_BOUNCED = "soft_bounced"  # final: Soft Bounce
    HARD_BOUNCED = "hard_bounced"  # final: Invalid Email

    @property
    def final(self) -> bool:
        return self is not Result.DEFERRED


@dataclass(frozen=True)
class ResultReport:
    """One recipient's delivery result, as the delivery side reports it to the meter."""

    queue_id: str
    recipient: str
    result: Result  # the billing category
    detail: str
    at: datetime
    reason: str = ""  # the category's sub-type (policies/results.py)


@dataclass(frozen=True)
class Account:
    id: int
    name: str
    plan: str
    subscribed_on: date
    payment_ok: bool
    suspended: bool
    prepaid_balance: int
    domains: tuple[str, ...] = ()
    networks: tuple[str, ...] = ()
    password_hash: str | None = field(default=None, repr=False)
    contacts: tuple[str, ...] = ()
    payment_detail: str = ""
    awaiting_results: int = 0
    outstanding_debt: int = 0
    spending_limit_override: int | None = None
    included_change: LimitChange | None = None
    quota_change: LimitChange | None = None

    @property
    def payment_state(self) -> str:
        return "ok" if self.payment_ok else "failed"

    def public(self, currency: Currency) -> dict[str, object]:
        """What `account show --json` prints, money in `currency`: never the password hash."""
        return {
            "name": self.name,
            "plan": self.plan,
            "subscribed_on": self.subscribed_on.isoformat(),
            "sender_domains": list(self.domains),
            "networks": list(self.networks),
            "contacts": list(self.contacts),
            "payment_state": self.payment_state,
            "payment_detail": self.payment_detail,
            "suspended": self.suspended,
            "prepaid_balance": format_money(self.prepaid_balance, currency),
            "overdrawn": format_money(self.outstanding_debt, currency),
            "spending_limit_override": (
                None if self.spending_limit_override is None else format_money(self.spending_limit_override, currency)
            ),
            "has_password": self.password_hash is not None,
        }


def limit_change_to_json(change: LimitChange | None) -> str | None:
    if change is None:
        return None
    return json.dumps([change.previous, change.new, change.changed_at.isoformat()])


def limit_change_from_json(text: str | None) -> LimitChange | None:
    if not text:
        return None
    previous, new, changed_at = json.loads(text)
    return LimitChange(previous, new, datetime.fromisoformat(changed_at))


@dataclass(frozen=True)
class Grant:
    """The answer to one reserve call."""

    hold_id: str
    granted: int
    refusal: str | None  # a policies.decision.Refusal value when granted < requested
