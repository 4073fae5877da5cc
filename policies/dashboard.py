"""What the account sees while the period runs: the usage screen and the usage alerts.

Model D's usage screen shows exactly: plan, period, extra emails, emails sent, total
allowed, spent, spending limit, emails remaining. Model E sends alerts at 75%, 90%
and 100% of the limit, each once per period. Both are pure functions of the same
facts the admission uses, so what the screen says is what the relay does.
"""

from __future__ import annotations

from dataclasses import dataclass

from mailmeter.policies.account import Standing, Usage
from mailmeter.policies.currency import USD, Currency
from mailmeter.policies.limits import email_limit, included_emails, spending_limit
from mailmeter.policies.money import display_money
from mailmeter.policies.periods import Period, period_label
from mailmeter.policies.plan import Plan
from mailmeter.policies.pricing import BlockPrice
from mailmeter.policies.usage_cost import NO_HISTORY, part_pricing, priced_usage


@dataclass(frozen=True)
class UsageScreen:
    """The usage screen of one account in one period (money in micros).

    extra_emails: emails unlocked past the included ones by block charges.
    total_allowed: included + extra_emails (the ceiling before the next charge);
      for plans without blocks, the email limit (None: no limit).
    spent: priced usage so far this period, excluding the plan fee.
    remaining: emails before the next block charge (D), or before the limit.
    """

    plan: str
    period: str
    included_emails: int
    extra_emails: int
    emails_sent: int
    total_allowed: int | None
    spent: int
    spending_limit: int | None
    remaining: int | None
    currency: Currency = USD

    def rows(self) -> tuple[str, ...]:
        """The screen's texts, in model D's order and wording."""
        rows = [self.plan, self.period, f"{self.extra_emails:,} extra emails", f"{self.emails_sent:,} emails sent"]
        if self.total_allowed is not None:
            rows.append(f"{self.total_allowed:,} total allowed")
        rows.append(f"{display_money(self.spent, self.currency)} spent")
        if self.spending_limit is not None:
            rows.append(f"{display_money(self.spending_limit, self.currency)} spending limit")
        if self.remaining is not None:
            rows.append(f"{self.remaining:,} emails remaining")
        return tuple(rows)


def usage_screen(plan: Plan, standing: Standing, usage: Usage, period: Period) -> UsageScreen:
    """The usage screen at this committed usage, in this period.

    After a limit raised or a plan changed mid-period (Usage.history), extra emails are
    those the plan in force has unlocked, and the emails a paid block still covers
    count as remaining: total allowed = sent + remaining.
    """
    sent = usage.accepted
    included = included_emails(plan, standing)
    if isinstance(plan.price, BlockPrice) and plan.billable == "accepted":
        history = usage.history or NO_HISTORY
        chargeable = part_pricing(plan, standing, usage).chargeable
        extra = -(-chargeable // plan.price.block_emails) * plan.price.block_emails
        within = max(max(history.since, included) - sent, 0)  # emails before the limit is passed
        total: int | None = sent + within + extra - chargeable
    else:
        extra = 0
        total = email_limit(plan, standing)
    return UsageScreen(
        plan=plan.title,
        period=period_label(plan.period, period),
        included_emails=included,
        extra_emails=extra,
        emails_sent=sent,
        total_allowed=total,
        spent=priced_usage(plan, standing, usage),
        spending_limit=spending_limit(plan, standing),
        remaining=None if total is None else max(total - sent, 0),
        currency=plan.currency,
    )


@dataclass(frozen=True)
class UsageAlert:
    """A usage notification that is due: `percent` of `limit` emails reached."""

    percent: int
    limit: int
    trigger_email: int

    changed: bool = False  # the limit (or plan) changed earlier in the period

    @property
    def key(self) -> str:
        """Stable within a period: the meter sends each key once per period. After a limit or
        plan change the key names the limit, so the new limit's alerts are new notices."""
        return f"alert/{self.percent}@{self.limit}" if self.changed else f"alert/{self.percent}"


def usage_alerts_due(plan: Plan, standing: Standing, usage: Usage) -> list[UsageAlert]:
    """Every alert reached at this committed usage, in ascending order (a prefix as usage grows).

    After a limit raised or a plan changed mid-period, only the alerts of the limit in
    force that are crossed after the change are due: the others were passed before it.
    """
    limit = email_limit(plan, standing)
    if not limit:
        return []
    history = usage.history
    due: list[UsageAlert] = []
    for percent in plan.usage_alerts:
        trigger = -(-percent * limit // 100)
        if usage.accepted >= trigger and (history is None or trigger > history.since):
            due.append(UsageAlert(percent=percent, limit=limit, trigger_email=trigger, changed=history is not None))
    return due
