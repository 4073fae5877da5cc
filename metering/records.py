"""Plain data the meter stores and returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date
from enum import StrEnum


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

    def public(self) -> dict[str, object]:
        """What `account show --json` prints: never the password hash."""
        return {
            "name": self.name,
            "plan": self.plan,
            "subscribed_on": self.subscribed_on.isoformat(),
            "sender_domains": list(self.domains),
            "networks": list(self.networks),
            "payment_state": "ok" if self.payment_ok else "failed",
            "suspended": self.suspended,
            "has_password": self.password_hash is not None,
        }


@dataclass(frozen=True)
class Grant:
    """The answer to one reserve call."""

    hold_id: str
    granted: int
    refusal: str | None  # a policies.decision.Refusal value when granted < requested
