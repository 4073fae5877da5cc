"""What a period's usage costs, exactly (unrounded micros), and what a budget allows.

Two views of the same prices: `priced_usage` is what the committed usage costs (the
bill), `max_held_within` turns a money cap into a count of held emails that can never
cost more than it, even before delivery results are known.

Prices are fixed when an email is sent (policies/history.py): the period costs what its
finished plan parts cost, plus the part in force, priced from `Usage.history` by
`part_pricing`. Without a history that is the plain closed form of policies/pricing.py
over the whole period. Every function stays closed-form (O(price tiers)).
"""

from __future__ import annotations

from mailmeter.policies.account import Standing, Usage
from mailmeter.policies.history import History, PartPricing
from mailmeter.policies.limits import included_emails
from mailmeter.policies.parts import ResultPrices
from mailmeter.policies.plan import Plan
from mailmeter.policies.pricing import (
    BlockPrice,
    FlatPrice,
    GraduatedPrice,
    Tier,
    VolumePrice,
    graduated_max,
    is_monotone,
    tier_bounds,
)

NO_HISTORY = History()


def results_cost(prices: ResultPrices, usage: Usage) -> int:
    """Model C: the final results, each at its category's price."""
    return (
        usage.delivered * prices.delivered
        + usage.soft_bounced * prices.soft_bounced
        + usage.hard_bounced * prices.hard_bounced
    )


def tier_counts(tiers: tuple[Tier, ...], low: int, high: int) -> tuple[int, ...]:
    """How many of the emails numbered low+1 .. high fall in each tier (one entry per tier)."""
    counts: list[int] = []
    for bottom, top, _per_email in tier_bounds(tiers):
        end = high if top is None else min(top, high)
        counts.append(max(end - max(bottom, low), 0))
    return tuple(counts)


def volume_price_at(tiers: tuple[Tier, ...], emails: int) -> int:
    """The per-email price of the volume tier that `emails` (the period's count) falls in."""
    for _bottom, top, per_email in tier_bounds(tiers):
        if top is None or emails <= top:
            return per_email
    raise ValueError("volume tiers must end with an open tier")  # guarded by parse_plan


def _blocks(price: BlockPrice, chargeable: int) -> int:
    return -(-chargeable // price.block_emails)


def part_pricing(plan: Plan, standing: Standing, usage: Usage, emails: int | None = None) -> PartPricing:
    """The part of the period under the plan in force, priced as sent, at `emails` sent
    in the period (default: the committed ones)."""
    history = usage.history or NO_HISTORY
    count = usage.accepted if emails is None else emails
    in_part = count - history.part_from
    if plan.billable == "results":
        prices = plan.result_prices
        before = history.results_before
        rows = (
            (usage.delivered - before[0], prices.delivered),
            (usage.soft_bounced - before[1], prices.soft_bounced),
            (usage.hard_bounced - before[2], prices.hard_bounced),
        )
        return PartPricing("results", in_part, 0, 0, rows, (), sum(n * each for n, each in rows))
    limit = included_emails(plan, standing)
    base = max(history.since, limit)  # emails numbered above it, sent now, are chargeable
    chargeable = history.chargeable + max(count - base, 0)
    price = plan.price
    if isinstance(price, BlockPrice):
        return PartPricing("overage", in_part, limit, chargeable, (), (), _blocks(price, chargeable) * price.per_block)
    if isinstance(price, GraduatedPrice):
        fresh = tier_counts(price.tiers, base, count)
        earlier = history.tiers + (0,) * (len(fresh) - len(history.tiers))
        counts = tuple(a + b for a, b in zip(earlier, fresh))
        priced = tuple((n, tier.per_email) for n, tier in zip(counts, price.tiers) if n)
        return PartPricing("emails", in_part, limit, chargeable, priced, counts, sum(n * e for n, e in priced))
    each = price.per_email if isinstance(price, FlatPrice) else volume_price_at(price.tiers, count)
    priced = ((chargeable, each),) if chargeable else ()
    return PartPricing("emails", in_part, limit, chargeable, priced, (), chargeable * each)


def priced_usage(plan: Plan, standing: Standing, usage: Usage) -> int:
    """Exact micros the committed usage of the period costs, before any rounding or fee."""
    history = usage.history or NO_HISTORY
    return history.parts_cost + part_pricing(plan, standing, usage).cost


def exposure(plan: Plan, standing: Standing, usage: Usage) -> int:
    """The most the held emails can end up costing: what money caps are checked against.

    Accepted-billing: the cost ceiling of the held count (reserved emails included).
    Results-billing: results counted in the period at their price, plus every email
    that may still get a result billed in this period (committed ones awaiting a
    result, and reserved ones) at the highest result price, as its result is unknown.
    """
    history = usage.history or NO_HISTORY
    if plan.billable == "results":
        pending = usage.unresolved + usage.reserved
        return priced_usage(plan, standing, usage) + pending * plan.result_prices.highest
    held = usage.held
    highest = part_pricing(plan, standing, usage, held).cost
    if not is_monotone(plan.price):
        # Held emails can be released: the cap must hold for every count they can fall back
        # to, and a volume price can cost more at a lower count (the top of a dearer tier).
        assert isinstance(plan.price, VolumePrice)
        for _bottom, top, _each in tier_bounds(plan.price.tiers):
            if top is not None and history.since <= top < held:
                highest = max(highest, part_pricing(plan, standing, usage, top).cost)
    return history.parts_cost + highest


def max_held_within(plan: Plan, standing: Standing, usage: Usage, budget: int) -> int | None:
    """The largest held count whose exposure stays within `budget`; None: any count does.

    Closed form (O(tiers)), so admission stays cheap at millions of emails. For a
    results-billed plan the answer is relative to the current usage: each further
    held email adds the highest result price to the exposure. 0 when even the emails
    already sent cost more than the budget.
    """
    if plan.billable == "results":
        highest = plan.result_prices.highest
        if highest == 0:
            return None
        now = exposure(plan, standing, usage)
        if budget < now:
            return 0
        return usage.held + (budget - now) // highest
    history = usage.history or NO_HISTORY
    left = budget - history.parts_cost
    if left < 0:
        return 0
    base = max(history.since, included_emails(plan, standing))
    before = history.chargeable  # chargeable emails of the part already sent before `since`
    price = plan.price
    if isinstance(price, FlatPrice):
        if price.per_email == 0:
            return None
        most = left // price.per_email
        return base + most - before if most >= before else 0
    if isinstance(price, BlockPrice):
        if price.per_block == 0:
            return None
        most = (left // price.per_block) * price.block_emails
        return base + most - before if most >= before else 0
    if isinstance(price, GraduatedPrice):
        fixed = sum(n * tier.per_email for n, tier in zip(history.tiers, price.tiers))
        if fixed > left:
            return 0
        return graduated_max(price, left - fixed, base)
    return _volume_max_after(price, left, history.since, base, before)


def _volume_max_after(price: VolumePrice, budget: int, since: int, base: int, before: int) -> int | None:
    """The largest count n >= `since` such that no count from `since` to n costs more than
    `budget`, where count n costs (before + max(n - base, 0)) x the price of n's tier."""
    for bottom, top, per_email in tier_bounds(price.tiers):
        if top is not None and top <= since:
            continue
        if per_email == 0:
            if top is None:
                return None
            continue
        most = budget // per_email
        if most < before:  # even the emails already sent cost too much at this tier's price
            return bottom if bottom >= since else 0
        last = base + most - before
        if last <= bottom:
            return bottom
        if top is None or last < top:
            return last
    raise ValueError("volume tiers must end with an open tier")  # guarded by parse_plan


__all__ = [
    "exposure",
    "max_held_within",
    "part_pricing",
    "priced_usage",
    "results_cost",
    "tier_counts",
    "volume_price_at",
]
