"""What a number of emails costs, and how many emails a budget buys: the unit-price part of a plan.

Four ways to price the accepted emails of one period, all in integer micros:

- FlatPrice: every chargeable email costs the same (model A: 200 micros = $0.20 / 1,000).
- GraduatedPrice: the price falls as the period's volume grows, each email at the
  price of the tier its ordinal falls in (model B's "volume discount").
- VolumePrice: the tier reached by the period's total prices *every* chargeable email.
- BlockPrice: a fixed price per *started* block of emails (model D: $1 per 167;
  model E: $1 per 5,000), which is what "charges in $1 increments" means exactly.

Emails are numbered 1, 2, 3... within the period. The plan's `included` emails are
the first ones and are free; tiers are placed by the email's ordinal in the period
(so a tier "up to 100,000" means the period's 100,000th email, included ones counted),
because "the price falls as the month's volume grows" speaks of the month's volume.

Every function is closed-form over the tiers (O(number of tiers)), never a loop per
email: accounts reach millions of emails and admission runs at every RCPT.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FlatPrice:
    """One price per chargeable email, in micros."""

    per_email: int


@dataclass(frozen=True)
class Tier:
    """Emails up to and including ordinal `up_to` (None: no end) cost `per_email` micros."""

    up_to: int | None
    per_email: int


@dataclass(frozen=True)
class GraduatedPrice:
    """Each email priced by the tier its ordinal falls in; tiers ascend, the last is open."""

    tiers: tuple[Tier, ...]


@dataclass(frozen=True)
class VolumePrice:
    """All chargeable emails priced by the tier that the period's total falls in.

    Its cost is not monotone (999 emails at $1 can cost more than 1,000 at $0.90),
    which is why caps use its running maximum and threshold charges refuse it.
    """

    tiers: tuple[Tier, ...]


@dataclass(frozen=True)
class BlockPrice:
    """`per_block` micros for every started block of `block_emails` chargeable emails."""

    block_emails: int
    per_block: int


UnitPrice = FlatPrice | GraduatedPrice | VolumePrice | BlockPrice


def tier_bounds(tiers: tuple[Tier, ...]) -> list[tuple[int, int | None, int]]:
    """(first ordinal - 1, last ordinal or None, price) for each tier, in order."""
    bounds: list[tuple[int, int | None, int]] = []
    low = 0
    for tier in tiers:
        bounds.append((low, tier.up_to, tier.per_email))
        if tier.up_to is None:
            break
        low = tier.up_to
    return bounds


def is_monotone(price: UnitPrice) -> bool:
    """True when sending one more email can never lower the period's cost."""
    return not isinstance(price, VolumePrice)


def blocks_opened(block_emails: int, emails: int, included: int) -> int:
    """Started blocks past the included emails: ceil(over / block_emails)."""
    over = max(emails - included, 0)
    return -(-over // block_emails)


def cost(price: UnitPrice, emails: int, included: int) -> int:
    """Exact micros owed for emails 1..`emails` of a period whose first `included` are free."""
    if emails <= included:
        return 0
    if isinstance(price, FlatPrice):
        return (emails - included) * price.per_email
    if isinstance(price, BlockPrice):
        return blocks_opened(price.block_emails, emails, included) * price.per_block
    if isinstance(price, GraduatedPrice):
        total = 0
        for low, high, per_email in tier_bounds(price.tiers):
            start = max(low, included)
            end = emails if high is None else min(high, emails)
            if end > start:
                total += (end - start) * per_email
        return total
    for _low, high, per_email in tier_bounds(price.tiers):
        if high is None or emails <= high:
            return (emails - included) * per_email
    raise ValueError("volume tiers must end with an open tier")  # guarded by parse_plan


def cost_ceiling(price: UnitPrice, emails: int, included: int) -> int:
    """The most any count 0..`emails` costs: what a cap must hold against.

    Held emails can be released (an aborted SMTP transaction), so a cap must hold
    for every count up to the held one, not only for the held one itself.
    """
    if is_monotone(price):
        return cost(price, emails, included)
    assert isinstance(price, VolumePrice)
    highest = cost(price, emails, included)
    for _low, high, _per_email in tier_bounds(price.tiers):
        if high is None or high >= emails:
            break
        highest = max(highest, cost(price, high, included))
    return highest


def max_emails_within(price: UnitPrice, budget: int, included: int) -> int | None:
    """The largest n with cost_ceiling(n) <= budget; None when no count ever exceeds it.

    This is how a money cap (prepaid balance, spending limit, overdraft) becomes a count
    cap, in closed form. A negative budget allows nothing (returns 0).
    """
    if budget < 0:
        return 0
    if isinstance(price, FlatPrice):
        return None if price.per_email == 0 else included + budget // price.per_email
    if isinstance(price, BlockPrice):
        if price.per_block == 0:
            return None
        return included + (budget // price.per_block) * price.block_emails
    if isinstance(price, GraduatedPrice):
        return graduated_max(price, budget, included)
    return _volume_max(price, budget, included)


def graduated_max(price: GraduatedPrice, budget: int, included: int) -> int | None:
    left = budget
    reached = included
    for low, high, per_email in tier_bounds(price.tiers):
        start = max(low, included)
        if high is not None and high <= start:
            continue
        if per_email == 0:
            if high is None:
                return None
            reached = high
            continue
        affordable = left // per_email
        if high is None or start + affordable < high:
            return start + affordable
        left -= (high - start) * per_email
        reached = high
    return reached


def _volume_max(price: VolumePrice, budget: int, included: int) -> int | None:
    # Walk the tiers in order: the first email whose cost exceeds the budget ends it.
    for low, high, per_email in tier_bounds(price.tiers):
        if per_email == 0:
            if high is None:
                return None
            continue
        last_affordable = included + budget // per_email
        if last_affordable <= low:
            return low
        if high is None or last_affordable < high:
            return last_affordable
    raise ValueError("volume tiers must end with an open tier")  # guarded by parse_plan


def first_email_reaching(price: UnitPrice, amount: int, included: int) -> int | None:
    """The ordinal of the email whose acceptance brings the cost to at least `amount`.

    Only for monotone prices: it is when a threshold charge becomes due. None if never.
    """
    if not is_monotone(price):
        raise ValueError("a non-monotone price has no single crossing point")
    if amount <= 0:
        return 0
    below = max_emails_within(price, amount - 1, included)
    return None if below is None else below + 1
