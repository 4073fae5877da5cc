"""Plain data the meter stores and returns."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import date, datetime
from enum import StrEnum

from policies.account import Usage
from policies.limits import LimitChange
from policies.money import format_money
from policies.prepaid import PaymentChange


class Result(StrEnum):
    """Per-recipient delivery result categories (model C's categories)."""

    DELIVERED = "delivered"
    DEFERRED = "deferred"  # a soft bounce that will be retried
    SOFT_BOUNCED = "soft_bounced"  # a soft bounce that expired: final
    HARD_BOUNCED = "hard_bounced"  # a permanent failure: final

    @property
    def final(self) -> bool:
        return self is not Result.DEFERRED


@dataclass(frozen=True)
class ResultReport:
    """One recipient's delivery result, as the delivery side reports it to the meter."""

    queue_id: str
    recipient: str
    result: Result
    detail: str
    at: datetime


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
    created_at: datetime | None = None
    monthly_payments: tuple[PaymentChange, ...] = ()  # the account's own monthly payment, by period (model B)
    credited_through: str | None = None  # key of the last period whose monthly credit is recorded
    settled_through: str | None = None  # key of the last period invoiced (periods are invoiced in order)
    open_periods: tuple[tuple[str, Usage], ...] = ()  # usage of each period after settled_through, by key

    @property
    def payment_state(self) -> str:
        return "ok" if self.payment_ok else "failed"

    def public(self) -> dict[str, object]:
        """What `account show --json` prints: never the password hash."""
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
            "prepaid_balance": format_money(self.prepaid_balance),
            "overdrawn": format_money(self.outstanding_debt),
            "spending_limit_override": (
                None if self.spending_limit_override is None else format_money(self.spending_limit_override)
            ),
            "monthly_payment_changes": [
                {"from": change.starts.isoformat(), "amount": format_money(change.amount)}
                for change in self.monthly_payments
            ],
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


def payment_changes_to_json(changes: tuple[PaymentChange, ...]) -> str:
    return json.dumps([[change.starts.isoformat(), change.amount] for change in changes])


def payment_changes_from_json(text: str | None) -> tuple[PaymentChange, ...]:
    if not text:
        return ()
    return tuple(PaymentChange(datetime.fromisoformat(starts), int(amount)) for starts, amount in json.loads(text))


def open_periods_from_text(text: str | None) -> tuple[tuple[str, Usage], ...]:
    """The stores' `open_periods` column: "KEY ACCEPTED RESERVED DELIVERED SOFT HARD" per period, comma-separated."""
    if not text:
        return ()
    periods: list[tuple[str, Usage]] = []
    for item in text.split(","):
        key, accepted, reserved, delivered, soft, hard = item.split(" ")
        periods.append((key, Usage(accepted=int(accepted), reserved=int(reserved), delivered=int(delivered),
                                   soft_bounced=int(soft), hard_bounced=int(hard))))
    return tuple(sorted(periods, key=lambda period: period[0]))


@dataclass(frozen=True)
class Grant:
    """The answer to one reserve call."""

    hold_id: str
    granted: int
    refusal: str | None  # a policies.decision.Refusal value when granted < requested
