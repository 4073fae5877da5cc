"""In-period charges: the complete, ordered list of charges that should exist at a usage.

Charges are a pure function of committed usage, each with a stable index, so the meter
can insert the missing ones under an idempotency key (account/period/kind/index) in the
same transaction that commits the usage: a retried or concurrent commit then finds the
charge already there, and no charge is ever issued twice.

For a fixed plan and standing the list at usage u is a prefix of the list at any later
usage u' >= u (usage only grows within a period and the priced cost is monotone for
every plan that may have in-period charges; plans.py refuses the other combinations).
A change of limit or plan never lowers the count either: the emails already sent keep
their prices (policies/history.py), so a charge once made stays due.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mailmeter.policies.account import Standing, Usage
from mailmeter.policies.limits import included_emails
from mailmeter.policies.money import display_money
from mailmeter.policies.parts import BlockCharge, ThresholdCharge
from mailmeter.policies.plan import Plan
from mailmeter.policies.pricing import BlockPrice, first_email_reaching
from mailmeter.policies.usage_cost import NO_HISTORY, part_pricing, priced_usage

ChargeKind = Literal["threshold", "block", "monthly"]  # monthly: model B's payment (policies/prepaid.py)


@dataclass(frozen=True)
class Charge:
    """One in-period charge.

    index: 1-based position in the period's sequence of in-period charges (after a plan
      change, the new plan's charges continue the numbering).
    amount: micros, whole minor units of the plan's currency (plan.py guarantees it).
    emails_unlocked: for a block charge, the emails its block covers; None otherwise.
    trigger_email: the period's email ordinal whose acceptance makes this charge due
      (1,250,000 for model A's first $250; 135,739 for model D's 215th $1); None when
      that was before the email limit in force applied.
    """

    kind: ChargeKind
    index: int
    amount: int
    emails_unlocked: int | None
    trigger_email: int | None
    description: str

    @property
    def key(self) -> str:
        """Stable within a period; prefix it with account and period for the idempotency key."""
        return f"{self.kind}/{self.index}"


def _part_charge_count(plan: Plan, standing: Standing, usage: Usage) -> int:
    """In-period charges the part of the period under the plan in force has made due."""
    charge = plan.in_period_charge
    if charge is None:
        return 0
    pricing = part_pricing(plan, standing, usage)
    if isinstance(charge, ThresholdCharge):
        return pricing.cost // charge.amount
    assert isinstance(plan.price, BlockPrice)
    return -(-pricing.chargeable // plan.price.block_emails)


def charge_count(plan: Plan, standing: Standing, usage: Usage) -> int:
    """How many in-period charges the committed usage of the period has made due. O(tiers).

    Charges the finished parts of the period made (under earlier plans) come first; the
    indexes of the part in force follow them.
    """
    history = usage.history or NO_HISTORY
    return history.parts_charges + _part_charge_count(plan, standing, usage)


def charge_amount(plan: Plan) -> int:
    """The amount of every in-period charge of the plan (they are all equal); 0 if none."""
    charge = plan.in_period_charge
    if isinstance(charge, ThresholdCharge):
        return charge.amount
    if isinstance(charge, BlockCharge):
        assert isinstance(plan.price, BlockPrice)
        return plan.price.per_block
    return 0


def charged_total(plan: Plan, standing: Standing, usage: Usage) -> int:
    """Micros of in-period charges due at this usage, earlier plans' included."""
    history = usage.history or NO_HISTORY
    return history.parts_charged + _part_charge_count(plan, standing, usage) * charge_amount(plan)


def unbilled(plan: Plan, standing: Standing, usage: Usage) -> int:
    """Model A's "current unbilled balance": priced usage not yet collected in the period."""
    return priced_usage(plan, standing, usage) - charged_total(plan, standing, usage)


def _trigger(plan: Plan, standing: Standing, usage: Usage, number: int) -> int | None:
    """The period's email number whose sending makes the part's charge `number` due; None
    when that happened before the limit in force applied (an earlier segment)."""
    history = usage.history or NO_HISTORY
    base = max(history.since, included_emails(plan, standing))
    price = plan.price
    if isinstance(plan.in_period_charge, ThresholdCharge):
        reached = number * plan.in_period_charge.amount
        fixed = part_pricing(plan, standing, usage, history.since).cost
        if reached <= fixed:
            return None
        return first_email_reaching(price, reached - fixed, base)
    assert isinstance(price, BlockPrice)
    opening = (number - 1) * price.block_emails + 1  # the chargeable email that opens the block
    if opening <= history.chargeable:
        return None
    return base + opening - history.chargeable


def _charge(plan: Plan, standing: Standing, usage: Usage, index: int) -> Charge:
    history = usage.history or NO_HISTORY
    number = index - history.parts_charges  # the charge's number within the part in force
    charge = plan.in_period_charge
    amount = charge_amount(plan)
    trigger = _trigger(plan, standing, usage, number)
    if isinstance(charge, ThresholdCharge):
        reached = number * amount
        return Charge(
            kind="threshold",
            index=index,
            amount=amount,
            emails_unlocked=None,
            trigger_email=trigger,
            description=(
                f"Usage charge {index}: {display_money(amount, plan.currency)}"
                f" as usage reached {display_money(reached, plan.currency)}"
            ),
        )
    assert isinstance(plan.price, BlockPrice)
    size = plan.price.block_emails
    if trigger is None:
        first = (number - 1) * size + 1
        where = f"extra emails {first:,} to {first + size - 1:,} of the plan's part of the period"
    else:
        where = f"emails {trigger:,} to {trigger + size - 1:,} of the period"
    return Charge(
        kind="block",
        index=index,
        amount=amount,
        emails_unlocked=size,
        trigger_email=trigger,
        description=f"Usage charge {index}: {display_money(amount, plan.currency)} for {size:,} more emails ({where})",
    )


def charges_due(plan: Plan, standing: Standing, usage: Usage, *, after_index: int = 0) -> list[Charge]:
    """Every in-period charge due at this committed usage, in order, with index > after_index.

    With the default after_index=0 this is the complete list of the part of the period
    under the plan in force (the charges of earlier plans' parts were made under them and
    are not rebuilt). The meter may pass the highest index it already holds to build only
    the missing ones (O(new charges)).
    """
    count = charge_count(plan, standing, usage)
    first = max(after_index, (usage.history or NO_HISTORY).parts_charges, 0) + 1
    return [_charge(plan, standing, usage, index) for index in range(first, count + 1)]
