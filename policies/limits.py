"""Per-account limits in force: the plan's value unless the account overrides it.

Model E's rule for a mid-period limit change: an increase applies at once, a
decrease keeps the higher limit until the period ends (the customer already planned
this period's sending around it). The rule is a pure function of the old value, the
new value and whether the change happened in the period being decided, so the meter
only stores (previous, new, changed_at) and never has to schedule anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from mailmeter.policies.account import Standing
from mailmeter.policies.periods import Period
from mailmeter.policies.plan import Plan


def limit_in_effect(previous: int | None, new: int | None, changed_in_this_period: bool) -> int | None:
    """The limit that applies in a period, given one change from `previous` to `new`.

    None means "no limit" and is the highest value. A change made before the period
    applies in full; a change made in it applies only if it raises the limit.
    """
    if not changed_in_this_period:
        return new
    if previous is None or new is None:
        return None
    return max(previous, new)


@dataclass(frozen=True)
class LimitChange:
    """One change of an account's limit, as the meter records it."""

    previous: int | None
    new: int | None
    changed_at: datetime

    def value_during(self, period: Period) -> int | None:
        """The limit in force during `period`: before the change the old one applies,
        in the period of the change the higher one, in later periods the new one."""
        if self.changed_at >= period.end:
            return self.previous
        return limit_in_effect(self.previous, self.new, period.contains(self.changed_at))


def included_emails(plan: Plan, standing: Standing) -> int:
    """Free emails per period in force (model E's "monthly limit")."""
    if standing.included_emails_override is not None:
        return standing.included_emails_override
    return plan.included_emails


def email_quota(plan: Plan, standing: Standing) -> int | None:
    """Hard cap on emails per period in force; None: no count cap."""
    if standing.email_quota_override is not None:
        return standing.email_quota_override
    return plan.email_quota


def spending_limit(plan: Plan, standing: Standing) -> int | None:
    """Micros of priced usage allowed per period in force; None: no spending cap."""
    if standing.spending_limit_override is not None:
        return standing.spending_limit_override
    return plan.spending_limit


def email_limit(plan: Plan, standing: Standing) -> int | None:
    """The number a person calls "my email limit": the included emails if the plan has
    any, else the hard quota. Usage alerts and dashboards measure against it."""
    included = included_emails(plan, standing)
    return included if included else email_quota(plan, standing)
