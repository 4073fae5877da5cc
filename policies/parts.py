"""The plan parts other than the unit price: result prices, in-period charges, funding, invoicing.

Each part is a small frozen value; a Plan is a combination of them. Keeping them
apart is what lets five providers' models be written as five configurations of the
same few parts instead of five code paths.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import time
from typing import Literal

Billable = Literal["accepted", "results"]
FundingKind = Literal["prepaid", "postpaid"]


@dataclass(frozen=True)
class ResultPrices:
    """Model C: micros per email by its final delivery result.

    Results are known only after acceptance, so admission prices every held email
    that has no result yet at `highest` (the conservative bound).
    """

    delivered: int = 0
    soft_bounced: int = 0
    hard_bounced: int = 0  # the document's "Invalid Email"

    @property
    def highest(self) -> int:
        return max(self.delivered, self.soft_bounced, self.hard_bounced)


@dataclass(frozen=True)
class ThresholdCharge:
    """Model A: each time the period's priced usage reaches another `amount`, charge `amount`.

    Charge k is due once priced usage >= k * amount ("$250 charged" at $250 cumulative).
    """

    amount: int  # micros, whole minor units of the currency


@dataclass(frozen=True)
class BlockCharge:
    """Models D and E: charge each block of a BlockPrice the moment its first email is accepted.

    D calls this "each $1 unlocks 167 emails", E "$1 per started 5,000 over the limit";
    it is one rule with two sets of numbers.
    """


InPeriodCharge = ThresholdCharge | BlockCharge


@dataclass(frozen=True)
class Funding:
    """Who carries the risk of unpaid usage.

    prepaid: usage is paid from the account's balance, and admission never lets the
    held emails cost more than it (model B).
    postpaid: usage is invoiced after the period, due `net_days` after the invoice
    date (B's postpay option: 14). With `overdraft_allowance` set the account may run
    into debt only up to that amount (model C); None means no money cap.
    monthly_payment: prepaid only (model B): micros charged at the start of every
    period and added to the balance as credit; an account may pay another amount
    (policies/prepaid.py). The emails it "includes" are what it buys at the plan's prices.
    """

    kind: FundingKind = "postpaid"
    net_days: int = 0
    overdraft_allowance: int | None = None  # micros; postpaid only
    monthly_payment: int = 0  # micros, whole cents; prepaid only


@dataclass(frozen=True)
class Invoicing:
    """When a closed period's invoice and statement appear, in the plan's time zone.

    Model C: the bill exists from 15:00 on the 1st (`issue_time`) and the billing
    email goes out on the 5th (`statement_after_days` = 4 days after the invoice date).
    """

    issue_time: time = time(0, 0)
    statement_after_days: int = 0
