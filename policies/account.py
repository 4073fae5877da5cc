"""The facts about one account and one period that the policy functions reason about.

The meter owns these facts (in its database) and passes them in; the policies
never read state themselves, which is what keeps every decision a pure function
that a test can reproduce to the email.
"""

from __future__ import annotations

from dataclasses import dataclass

from mailmeter.policies.history import History


@dataclass(frozen=True)
class Standing:
    """The account facts a decision needs, other than usage.

    prepaid_balance: micros of credit available to THIS period's usage, i.e. the
      balance carried into the period, plus the period's monthly payment (model B's
      credit, policies/prepaid.py), plus top-ups made during it. The meter must not
      deduct this period's usage from it while the period runs: the policy prices the
      period's usage itself (graduated tiers make per-email deduction wrong), and
      close_period says what to deduct when the period closes.
    outstanding_debt: micros invoiced in earlier periods and not yet paid (model C's
      "overdrawn"); it uses up the overdraft allowance until repaid.
    included_emails_override / email_quota_override: the account's own email limit
      instead of the plan's, already resolved for the current period with
      limits.limit_in_effect (an increase applies at once, a decrease at period end).
    spending_limit_override: micros; the account's own spending limit (model D's
      customer-set limit). Raising it resumes sending at the next RCPT.
    """

    payment_ok: bool = True
    suspended: bool = False
    prepaid_balance: int = 0
    outstanding_debt: int = 0
    included_emails_override: int | None = None
    email_quota_override: int | None = None
    spending_limit_override: int | None = None


@dataclass(frozen=True)
class Usage:
    """Counts of emails (accepted recipients) in one period.

    accepted: committed by a `250`; reserved: held by open SMTP transactions.
    delivered / soft_bounced / hard_bounced: final delivery results counted in this
      period, at most one per accepted email (a deferral is not a result yet). A result
      is billed in the period it arrives in, so it may belong to an earlier period's email.
    awaiting_results: accepted emails, of this period or earlier ones, that have no final
      result yet: each may still be billed in this period, so results-billed admission
      prices them at the highest result price. None: assume results land in the period
      of acceptance and use accepted - (results counted), which undercounts across a
      period boundary; the meter should supply the real count for results-billed plans.
    history: what earlier in the period fixed some prices (a limit raised, a plan
      changed; policies/history.py); None when nothing did.
    """

    accepted: int = 0
    reserved: int = 0
    delivered: int = 0
    soft_bounced: int = 0
    hard_bounced: int = 0
    awaiting_results: int | None = None
    history: History | None = None

    @property
    def held(self) -> int:
        """Emails that count against caps: committed plus reserved."""
        return self.accepted + self.reserved

    @property
    def resolved(self) -> int:
        """Final results counted in this period."""
        return self.delivered + self.soft_bounced + self.hard_bounced

    @property
    def unresolved(self) -> int:
        """Committed emails whose result may still be billed in this period (reserved excluded)."""
        if self.awaiting_results is not None:
            return self.awaiting_results
        return max(self.accepted - self.resolved, 0)
