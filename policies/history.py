"""What happened earlier in a period that fixed some of its prices: the period's history.

Theory of operation. An email's price is fixed when it is sent. Under one plan an email
is free when its number in the period is within the email limit in force at that moment,
and otherwise it is chargeable: priced at its number by the plan's unit price (flat,
graduated by number, the volume tier the part reaches, or one block per started
`block_emails` chargeable emails). So:

- a limit raised mid-period applies to the emails sent after it; the emails already
  sent beyond the old limit stay chargeable, and the charges they made stay made
  (model E: "a charge once made is final"); chargeable emails keep accumulating across
  the change, so a block paid before it still covers the next ones;
- a plan change that applies at once (an upgrade) finishes the part of the period under
  the old plan: its emails, prices and in-period charges stay as they were, and the new
  plan prices the emails after it, its included emails counting the whole period's
  emails ("the new allowance from now on", as model E's raised limit).

Every count is monotone, so in-period charges never exceed what the period's usage
costs and an invoice total is never negative.

This module holds only the data: the meter stores a History with the period's counters
(in the same transaction as the change that made it) and passes it in `Usage.history`;
usage_cost prices the part in force from it, changes builds the next one.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

PartBillable = Literal["emails", "overage", "results"]


@dataclass(frozen=True)
class PartPricing:
    """The usage of one plan's part of a period, priced as it was sent.

    billable: "emails" (a unit price per email), "overage" (a price per started block of
      chargeable emails) or "results" (a price per delivery result).
    emails: emails sent (accepted) in the part.
    limit: the email limit in force at the part's end (0: none).
    chargeable: of the emails, those sent beyond the limit in force then (the overage).
    priced: (emails, micros each) for each price the chargeable emails met, in order;
      for "results": (delivered, soft bounced, invalid) counts with their prices.
    tiers: chargeable emails per graduated tier (one entry per tier; empty otherwise).
    cost: exact micros of the part's usage, unrounded.
    """

    billable: PartBillable
    emails: int
    limit: int
    chargeable: int
    priced: tuple[tuple[int, int], ...]
    tiers: tuple[int, ...]
    cost: int


@dataclass(frozen=True)
class PlanPart:
    """A finished part of a period: the emails sent under an earlier plan, from `start` to `end`.

    plan / title: the plan's config name and the name shown for it.
    first_email: the number in the period of the part's first email.
    charges / charged: how many in-period charges it made (their indexes follow the
      earlier parts') and their micros.
    """

    plan: str
    title: str
    start: datetime
    end: datetime
    first_email: int
    pricing: PartPricing
    charges: int
    charged: int

    @property
    def last_email(self) -> int:
        return self.first_email + self.pricing.emails - 1


@dataclass(frozen=True)
class History:
    """The period before the email limit in force now applied.

    parts: finished parts under earlier plans, oldest first.
    since: emails of the period sent before the limit in force now applied (a limit
      change or a plan change); the limit in force prices only the emails after them.
    chargeable: emails of the current plan's part, sent before `since`, that were
      beyond the limit in force when sent.
    tiers: the same emails by graduated tier of the current plan (empty otherwise).
    """

    parts: tuple[PlanPart, ...] = ()
    since: int = 0
    chargeable: int = 0
    tiers: tuple[int, ...] = ()

    @property
    def part_from(self) -> int:
        """Emails of the period sent before the current plan's part began."""
        return self.parts[-1].last_email if self.parts else 0

    @property
    def parts_cost(self) -> int:
        return sum(part.pricing.cost for part in self.parts)

    @property
    def parts_charges(self) -> int:
        """In-period charges the finished parts made: the current part's indexes follow them."""
        return sum(part.charges for part in self.parts)

    @property
    def parts_charged(self) -> int:
        return sum(part.charged for part in self.parts)

    @property
    def results_before(self) -> tuple[int, int, int]:
        """Delivery results billed under earlier plans: (delivered, soft bounced, invalid)."""
        counts = [0, 0, 0]
        for part in self.parts:
            if part.pricing.billable == "results":
                for number, (count, _each) in enumerate(part.pricing.priced):
                    counts[number] += count
        return counts[0], counts[1], counts[2]


def part_start(history: History | None, period_start: datetime) -> datetime:
    """When the current plan's part began: the last change of plan, else the period start."""
    if history is None or not history.parts:
        return period_start
    return history.parts[-1].end


__all__ = ["History", "PartBillable", "PartPricing", "PlanPart", "part_start"]
