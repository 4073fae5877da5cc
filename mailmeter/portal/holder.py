"""What one signed-in account may read and do: nothing here takes an account name from a
request, so a session can only ever reach its own account.

Reads come from the same service layer as `mailmeter usage NAME --json` (so the page's
numbers are that command's); changes go through the admin service acting as
`portal:NAME`, so they follow the same rules and are audited like an operator's. Which
changes an account may make itself follows its plan's model (docs/billing-models.md):
the spending limit (D), the monthly email limit (E), the monthly payment and a top-up (B),
repaying what is overdrawn (C). The account's events and suppression list go through the
same `AccountService` as the account's own API (docs/events.md), so taking an address off
the list is audited as `account:NAME`, as it is through that API.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Any, Literal

from mailmeter.metering.meter import Meter
from mailmeter.metering.records import EventRecord, Suppression
from mailmeter.policies.parts import ThresholdCharge
from mailmeter.policies.periods import Period
from mailmeter.policies.plan import Plan
from mailmeter.policies.pricing import BlockPrice
from mailmeter.service import AccountService, AdminError, AdminService, NotFound

Model = Literal["A", "B", "C", "D", "E"]
PORTAL_ACTOR = "portal:"  # + the account name: the audit trail's actor for a holder's change


def model_of(plan: Plan) -> Model:
    """The billing model a plan follows (docs/billing-models.md), by its parts."""
    if plan.funding.kind == "prepaid":
        return "B"
    if plan.billable == "results":
        return "C"
    if isinstance(plan.price, BlockPrice) and plan.spending_limit is not None:
        return "D"
    if isinstance(plan.price, BlockPrice):
        return "E"
    return "A"


@dataclass(frozen=True)
class Day:
    day: date
    emails: int
    total: int  # emails so far in the period, this day included


@dataclass(frozen=True)
class Holder:
    """The signed-in account `name`, through the service acting for it."""

    name: str
    service: AdminService

    @classmethod
    def of(cls, name: str, service: AdminService) -> Holder:
        return cls(name, service.as_actor(PORTAL_ACTOR + name))

    @property
    def meter(self) -> Meter:
        return self.service.meter

    async def usage(self) -> dict[str, Any]:
        """Exactly `mailmeter usage NAME --json`."""
        return await self.service.usage(self.name)

    async def account(self) -> dict[str, Any]:
        return await self.service.account(self.name)

    async def terms(self) -> tuple[Plan, Period]:
        account = await self.meter.account(self.name)
        period = self.meter.period_of(account)
        return self.meter.plan_of(account, period), period

    async def days(self, plan: Plan, period: Period) -> list[Day]:
        """Every day of the period so far (in the plan's time zone) with its accepted emails."""
        account = await self.meter.account(self.name)
        zone = plan.period.zone()
        per_day: dict[date, int] = {}
        for hour, emails in await self.meter.store.usage_by_hour(account.id, period.key):
            at = datetime.strptime(hour, "%Y-%m-%dT%H").replace(tzinfo=timezone.utc)
            local = at.astimezone(zone).date()
            per_day[local] = per_day.get(local, 0) + emails
        first = period.start.astimezone(zone).date()
        last = (period.end - timedelta(microseconds=1)).astimezone(zone).date()
        today = self.meter.clock().astimezone(zone).date()
        end = min(last, max(today, max(per_day, default=first)))
        days, total, day = [], 0, first
        while day <= end:
            total += per_day.get(day, 0)
            days.append(Day(day, per_day.get(day, 0), total))
            day += timedelta(days=1)
        return days

    async def limit_decrease(self, period: Period) -> int | None:
        """Model E: the lower monthly limit asked for in this period, in force from the next one."""
        change = (await self.meter.account(self.name)).included_change
        if change is None or change.new is None or not period.contains(change.changed_at):
            return None
        return change.new if change.previous is None or change.new < change.previous else None

    async def charges(self, period: Period | None = None) -> list[dict[str, Any]]:
        """The account's charges (this period's when given), oldest first."""
        charges = await self.service.charges(self.name)
        return [c for c in charges if period is None or c["period_start"] == period.key]

    async def history(self, periods: int = 12) -> list[tuple[str, int, list[tuple[str, int]]]]:
        """The invoiced periods, newest first: (period, emails, [(campaign, emails), ...])."""
        account = await self.meter.account(self.name)
        records = sorted(await self.meter.store.invoices(account.id), key=lambda r: r.period_key, reverse=True)
        history = []
        for record in records[:periods]:
            by_campaign: dict[str, int] = {}
            for row in await self.meter.store.breakdown(account.id, record.period_key):
                campaign = row["campaign"] or "(untagged)"
                by_campaign[campaign] = by_campaign.get(campaign, 0) + int(row["accepted"])
            label = str(json.loads(record.body).get("period", record.period_key))
            ranked = sorted(by_campaign.items(), key=lambda item: (-item[1], item[0]))
            history.append((label, sum(by_campaign.values()), ranked))
        return history

    async def invoices(self) -> list[dict[str, Any]]:
        return await self.service.invoices(self.name)

    async def invoice(self, invoice_id: str) -> dict[str, Any]:
        """One of this account's invoices; another account's is not found, as an unknown one."""
        account = await self.meter.account(self.name)
        for record in await self.meter.store.invoices(account.id):
            if record.id == invoice_id:
                body: dict[str, Any] = json.loads(record.body)
                body["id"] = record.id
                body["status"] = record.status
                return body
        raise NotFound("there is no such invoice on this account (see Invoices)")

    # -- events and the suppression list (the account's own API's service) --------------

    @property
    def own(self) -> AccountService:
        """The account's own service, as its API token uses it (audited as `account:NAME`)."""
        return self.service.for_account(self.name)

    async def webhook(self) -> dict[str, Any] | None:
        """The account's webhook (URL, kinds, when set), never its secret; None without one."""
        return await self.own.webhook()

    async def events(self, limit: int = 50) -> list[EventRecord]:
        """The account's latest events, newest first, each with its delivery log."""
        return await self.own.event_records(limit)

    async def suppressions(self) -> list[Suppression]:
        return await self.own.suppression_records()

    async def remove_suppression(self, address: str) -> dict[str, Any]:
        """Take `address` off this account's list: its next RCPT is accepted (and billed)."""
        return await self.own.remove_suppression(address)

    # -- what the holder may change, by model ------------------------------------------

    async def set_spending_limit(self, amount: str) -> dict[str, Any]:
        await self._require("D", "the spending limit")
        if not amount.strip():
            raise AdminError('amount: give the spending limit, like "599.00"')
        return await self.service.set_spending_limit(self.name, amount.strip())

    async def set_monthly_limit(self, emails: str) -> dict[str, Any]:
        await self._require("E", "the monthly email limit")
        return await self.service.set_limit(self.name, "included", emails.strip())

    async def set_monthly_payment(self, amount: str) -> dict[str, Any]:
        await self._require("B", "the monthly payment")
        return await self.service.set_monthly_payment(self.name, amount.strip())

    async def top_up(self, amount: str) -> dict[str, Any]:
        await self._require("B", "a top-up")
        return await self.service.pay(self.name, "topup", amount.strip())

    async def repay(self) -> dict[str, Any]:
        await self._require("C", "repaying what is overdrawn")
        return await self.service.pay(self.name, "repay")

    async def _require(self, model: Model, what: str) -> None:
        plan, _ = await self.terms()
        if model_of(plan) != model:
            raise AdminError(f"{what} is not something this account's plan lets you change")


def threshold_lines(plan: Plan, usage: dict[str, Any]) -> list[tuple[str, int]]:
    """The lines the chart draws over the usage (label, emails in the period)."""
    model = model_of(plan)
    included = int(usage["included_emails"])
    lines: list[tuple[str, int]] = []
    if model == "D":
        lines.append(("included", included))
        if usage["total_allowed"] is not None:
            lines.append(("total allowed", int(usage["total_allowed"])))
        price = plan.price
        limit = usage["spending_limit"]
        if limit is not None and isinstance(price, BlockPrice):
            micros = _micros(limit)
            lines.append(("spending limit", included + micros // price.per_block * price.block_emails))
    elif model == "E":
        lines.append(("monthly limit", included))
    elif model == "B" and usage["remaining"] is not None:
        lines.append(("balance covers", int(usage["accepted"]) + int(usage["remaining"])))
    elif model == "A" and isinstance(plan.in_period_charge, ThresholdCharge):
        per_email = getattr(plan.price, "per_email", 0)
        if per_email > 0:
            step = plan.in_period_charge.amount // per_email
            if step > 0:
                count = max(1, int(usage["accepted"]) // step + 1)
                lines.extend((f"charge {n}", included + n * step) for n in range(1, count + 1))
    elif model == "C" and usage["remaining"] is not None:
        lines.append(("overdraft allows", int(usage["accepted"]) + int(usage["remaining"])))
    return [(label, emails) for label, emails in lines if emails > 0]


def _micros(amount: str) -> int:
    whole, _, fraction = amount.partition(".")
    sign = -1 if whole.startswith("-") else 1
    return sign * (abs(int(whole or "0")) * 1_000_000 + int((fraction + "000000")[:6] or "0"))


def invoice_csv(invoice: dict[str, Any]) -> str:
    """One invoice's lines as CSV: a line per charge, then payments and the totals."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(["invoice", "period", "kind", "description", "quantity", "amount", "currency"])
    ident, period, currency = invoice["id"], invoice["period"], invoice["currency"]
    for line in invoice["lines"]:
        writer.writerow([ident, period, line["kind"], line["description"], line["quantity"], line["amount"], currency])
    writer.writerow([ident, period, "total", "Total", "", invoice["total"], currency])
    for payment in invoice.get("payments", []):
        writer.writerow([ident, period, payment["kind"], payment["description"], "", payment["amount"], currency])
    writer.writerow(
        [ident, period, "amount_due", f"Amount due ({invoice['status']})", "", invoice["amount_due"], currency]
    )
    return out.getvalue()
