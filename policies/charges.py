"""In-period charges: the complete, ordered list of charges that should exist at a usage.

Charges are a pure function of committed usage, each with a stable index, so the meter
can insert the missing ones under an idempotency key (account/period/kind/index) in the
same transaction that commits the usage: a retried or concurrent commit then finds the
charge already there, and no charge is ever issued twice.

For a fixed plan and standing the list at usage u is a prefix of the list at any later
usage u' >= u (usage only grows within a period and the priced cost is monotone for
every plan that may have in-period charges; plans.py refuses the other combinations).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from policies.account import Standing, Usage
from policies.limits import included_emails
from policies.money import display_money
from policies.parts import BlockCharge, ThresholdCharge
from policies.plan import Plan
from policies.pricing import BlockPrice, blocks_opened, first_email_reaching
from policies.usage_cost import priced_usage

ChargeKind = Literal["threshold", "block", "monthly"]  # monthly: model B's payment (policies/prepaid.py)


@dataclass(frozen=True)
class Charge:
    """One in-period charge.

    index: 1-based position in the period's sequence of charges of this kind.
    amount: micros, whole cents (plans.py guarantees it).
    emails_unlocked: for a block charge, the emails its block covers; None otherwise.
    trigger_email: the period's email ordinal whose acceptance makes this charge due
      (1,250,000 for model A's first $250; 135,739 for model D's 215th $1).
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


def charge_count(plan: Plan, standing: Standing, usage: Usage) -> int:
    """How many in-period charges the committed usage has made due. O(1)."""
    charge = plan.in_period_charge
    if charge is None:
        return 0
    if isinstance(charge, ThresholdCharge):
        return priced_usage(plan, standing, usage) // charge.amount
    assert isinstance(plan.price, BlockPrice)
    return blocks_opened(plan.price.block_emails, usage.accepted, included_emails(plan, standing))


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
    """Micros of in-period charges due at this usage."""
    return charge_count(plan, standing, usage) * charge_amount(plan)


def unbilled(plan: Plan, standing: Standing, usage: Usage) -> int:
    """Model A's "current unbilled balance": priced usage not yet collected in the period."""
    return priced_usage(plan, standing, usage) - charged_total(plan, standing, usage)


def _charge(plan: Plan, standing: Standing, index: int) -> Charge:
    charge = plan.in_period_charge
    amount = charge_amount(plan)
    if isinstance(charge, ThresholdCharge):
        reached = index * amount
        return Charge(
            kind="threshold",
            index=index,
            amount=amount,
            emails_unlocked=None,
            trigger_email=first_email_reaching(plan.price, reached, included_emails(plan, standing)),
            description=f"Usage charge {index}: {display_money(amount)} as usage reached {display_money(reached)}",
        )
    assert isinstance(plan.price, BlockPrice)
    size = plan.price.block_emails
    first = included_emails(plan, standing) + (index - 1) * size + 1
    last = first + size - 1
    return Charge(
        kind="block",
        index=index,
        amount=amount,
        emails_unlocked=size,
        trigger_email=first,
        description=(
            f"Usage charge {index}: {display_money(amount)} for {size:,} more emails"
            f" (emails {first:,} to {last:,} of the period)"
        ),
    )


def charges_due(plan: Plan, standing: Standing, usage: Usage, *, after_index: int = 0) -> list[Charge]:
    """Every in-period charge due at this committed usage, in order, with index > after_index.

    With the default after_index=0 this is the complete list. The meter may pass the
    highest index it already holds to build only the missing ones (O(new charges)).
    """
    count = charge_count(plan, standing, usage)
    return [_charge(plan, standing, index) for index in range(max(after_index, 0) + 1, count + 1)]
