"""What a period's usage costs, exactly (unrounded micros), and what a budget allows.

Two views of the same prices: `priced_usage` is what the committed usage costs (the
bill), `max_held_within` turns a money cap into a count of held emails that can never
cost more than it, even before delivery results are known.
"""

from __future__ import annotations

from policies.account import Standing, Usage
from policies.limits import included_emails
from policies.parts import ResultPrices
from policies.plan import Plan
from policies.pricing import cost, cost_ceiling, max_emails_within


def results_cost(prices: ResultPrices, usage: Usage) -> int:
    """Model C: the final results, each at its category's price."""
    return (
        usage.delivered * prices.delivered
        + usage.soft_bounced * prices.soft_bounced
        + usage.hard_bounced * prices.hard_bounced
    )


def priced_usage(plan: Plan, standing: Standing, usage: Usage) -> int:
    """Exact micros the committed usage of the period costs, before any rounding or fee."""
    if plan.billable == "results":
        return results_cost(plan.result_prices, usage)
    return cost(plan.price, usage.accepted, included_emails(plan, standing))


def exposure(plan: Plan, standing: Standing, usage: Usage) -> int:
    """The most the held emails can end up costing: what money caps are checked against.

    Accepted-billing: the cost ceiling of the held count (reserved emails included).
    Results-billing: results counted in the period at their price, plus every email
    that may still get a result billed in this period (committed ones awaiting a
    result, and reserved ones) at the highest result price, as its result is unknown.
    """
    if plan.billable == "results":
        pending = usage.unresolved + usage.reserved
        return results_cost(plan.result_prices, usage) + pending * plan.result_prices.highest
    return cost_ceiling(plan.price, usage.held, included_emails(plan, standing))


def max_held_within(plan: Plan, standing: Standing, usage: Usage, budget: int) -> int | None:
    """The largest held count whose exposure stays within `budget`; None: any count does.

    Closed form (O(tiers)), so admission stays cheap at millions of emails. For a
    results-billed plan the answer is relative to the current usage: each further
    held email adds the highest result price to the exposure.
    """
    if plan.billable == "results":
        highest = plan.result_prices.highest
        if highest == 0:
            return None
        now = exposure(plan, standing, usage)
        if budget < now:
            return 0
        return usage.held + (budget - now) // highest
    return max_emails_within(plan.price, budget, included_emails(plan, standing))
