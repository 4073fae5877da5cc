"""The admin service layer: every operator action, once, for the CLI and the HTTP API.

Each method takes plain values and returns JSON-ready data (money as decimal
strings). Errors are AdminError with a message that says what to do.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from datetime import date, datetime, time, timezone
from typing import Any

from metering.billing import Billing
from metering.meter import Meter, UnknownAccount, UnknownPlan
from policies import Standing, preview
from policies.money import MoneyError, format_money, parse_money


class AdminError(ValueError):
    """An operator error: the message names the fix."""


def _money(text: str, what: str) -> int:
    try:
        return parse_money(text)
    except MoneyError as error:
        raise AdminError(f"{what}: {error}") from None


EXPORT_COLUMNS = [
    "invoice_id", "account", "plan", "period", "period_start", "period_end", "item",
    "description", "quantity", "amount", "currency", "status", "reference",
]


@dataclass
class AdminService:
    meter: Meter
    billing: Billing

    # -- accounts -------------------------------------------------------------------

    async def add_account(
        self,
        name: str,
        password: str | None,
        plan: str,
        domains: list[str],
        networks: list[str],
        contacts: list[str],
        subscribed_on: date | None = None,
    ) -> dict[str, Any]:
        if password is None and not networks:
            raise AdminError("give a password (for SMTP AUTH) or a client network binding, or both")
        if not domains:
            raise AdminError("give at least one sender domain the account may send from")
        try:
            account = await self.meter.add_account(
                name, password, plan, domains, networks, subscribed_on=subscribed_on, contacts=contacts
            )
        except (UnknownPlan, ValueError) as error:
            raise AdminError(str(error).strip('"')) from None
        return account.public()

    async def accounts(self) -> list[dict[str, Any]]:
        return [a.public() for a in await self.meter.store.list_accounts()]

    async def account(self, name: str) -> dict[str, Any]:
        return (await self.meter.account(name)).public()

    async def usage(self, name: str) -> dict[str, Any]:
        return (await self.meter.usage(name)).as_json()

    # -- payment state, balances, limits: live at the next SMTP command ---------------

    async def set_payment(self, name: str, ok: bool, reason: str = "") -> dict[str, Any]:
        await self.meter.set_payment(name, ok, reason or ("payment method updated" if ok else "payment failed"))
        return await self.account(name)

    async def add_balance(self, name: str, amount: str) -> dict[str, Any]:
        micros = _money(amount, "amount")
        if micros <= 0:
            raise AdminError("amount: a top-up must be positive, like 25.00")
        balance = await self.meter.add_balance(name, micros)
        return {"account": name, "added": format_money(micros), "prepaid_balance": format_money(balance)}

    async def repay(self, name: str) -> dict[str, Any]:
        repaid = await self.meter.repay(name)
        return {"account": name, "repaid": format_money(repaid)}

    async def set_email_limit(self, name: str, which: str, emails: int) -> dict[str, Any]:
        if which not in ("included", "quota"):
            raise AdminError("limit: choose included (model E's monthly limit) or quota (a hard cap)")
        if emails < 0:
            raise AdminError("limit: the number of emails must not be negative")
        await self.meter.set_email_limit(name, which, emails)
        return await self.usage(name)

    async def set_spending_limit(self, name: str, amount: str | None) -> dict[str, Any]:
        micros = None if amount in (None, "none") else _money(str(amount), "spending limit")
        if micros is not None and micros < 0:
            raise AdminError("spending limit: must not be negative")
        await self.meter.set_spending_limit(name, micros)
        return await self.usage(name)

    # -- invoices -----------------------------------------------------------------------

    async def invoices(self, name: str) -> list[dict[str, Any]]:
        account = await self.meter.account(name)
        return [
            {
                "id": record.id,
                "period": json.loads(record.body)["period"],
                "invoice_date": record.invoice_date,
                "due_date": record.due_date,
                "total": format_money(record.total),
                "amount_due": format_money(record.amount_due),
                "status": record.status,
            }
            for record in await self.meter.store.invoices(account.id)
        ]

    async def invoice(self, invoice_id: str) -> dict[str, Any]:
        for record in await self.meter.store.invoices():
            if record.id == invoice_id:
                body = json.loads(record.body)
                body["id"] = record.id
                body["status"] = record.status
                return body
        raise AdminError(f"no invoice {invoice_id!r} (see `mailmeter invoice list ACCOUNT`)")

    async def export_rows(self, month: str) -> list[dict[str, Any]]:
        """Every line item of the invoices of periods starting in `month` (YYYY-MM, plan's zone)."""
        try:
            datetime.strptime(month, "%Y-%m")
        except ValueError:
            raise AdminError(f"period {month!r}: write it as YYYY-MM, like 2026-04") from None
        rows: list[dict[str, Any]] = []
        for record in await self.meter.store.invoices():
            body = json.loads(record.body)
            if body["period_month"] != month:
                continue
            base = {
                "invoice_id": record.id, "account": body["account"], "plan": body["plan"],
                "period": body["period"], "period_start": body["period_start"], "period_end": body["period_end"],
                "currency": body["currency"], "status": record.status,
            }
            for line in body["lines"]:
                rows.append({**base, "item": line["kind"], "description": line["description"],
                             "quantity": line["quantity"], "amount": line["amount"], "reference": ""})
            for charge in body["in_period_charges"]:
                rows.append({**base, "item": "charge", "description": charge["description"],
                             "quantity": charge["emails_unlocked"], "amount": charge["amount"],
                             "reference": charge["key"], "status": charge["status"]})
            for region in body["regions"]:
                rows.append({**base, "item": f"region:{region['region']}", "description": region["result"],
                             "quantity": region["emails"], "amount": "", "reference": ""})
            rows.append({**base, "item": "total", "description": f"Amount due by {body['due_date']}",
                         "quantity": "", "amount": body["total"], "reference": body["amount_due"]})
        return rows

    async def export_csv(self, month: str) -> str:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=EXPORT_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in await self.export_rows(month):
            writer.writerow(row)
        return buffer.getvalue()

    async def run_billing(self) -> dict[str, Any]:
        run = await self.billing.run_once()
        return {"invoices": run.invoices, "charges_collected": run.charges_collected,
                "charges_failed": run.charges_failed, "statements": run.statements}

    # -- plans ------------------------------------------------------------------------

    def preview(
        self,
        plan_name: str,
        emails: int,
        start: date | None = None,
        delivered: int | None = None,
        soft_bounced: int = 0,
        invalid: int = 0,
    ) -> dict[str, Any]:
        plan = self.meter.plans.get(plan_name)
        if plan is None:
            raise AdminError(f"plan {plan_name!r} is not defined (known: {', '.join(sorted(self.meter.plans))})")
        if emails < 0 or soft_bounced < 0 or invalid < 0 or (delivered is not None and delivered < 0):
            raise AdminError("counts must not be negative")
        begin = datetime.combine(start or datetime.now(timezone.utc).date(), time(0), tzinfo=plan.period.zone())
        try:
            result = preview(plan, emails, begin, standing=Standing(), delivered=delivered,
                             soft_bounced=soft_bounced, invalid=invalid)
        except ValueError as error:
            raise AdminError(str(error)) from None
        invoice = result.invoice
        return {
            "plan": plan_name,
            "period": result.period_label,
            "period_start": result.period.start.isoformat(),
            "period_end": result.period.end.isoformat(),
            "emails": emails,
            "accepted": result.accepted,
            "refused": result.refused,
            "refusal": result.refusal.value if result.refusal else None,
            "first_refused_at": result.first_refused_at.isoformat() if result.first_refused_at else None,
            "charges": [
                {
                    "key": timed.charge.key,
                    "at": timed.at.isoformat() if timed.at else None,
                    "amount": format_money(timed.charge.amount),
                    "emails_unlocked": timed.charge.emails_unlocked,
                    "trigger_email": timed.charge.trigger_email,
                    "description": timed.charge.description,
                }
                for timed in result.charges
            ],
            "invoice": {
                "invoice_date": invoice.invoice_date.isoformat(),
                "due_date": invoice.due_date.isoformat(),
                "lines": [
                    {"kind": line.kind, "description": line.description, "quantity": line.quantity,
                     "amount": format_money(line.amount)}
                    for line in invoice.lines
                ],
                "total": format_money(invoice.total),
                "amount_due": format_money(invoice.amount_due),
            },
        }


__all__ = ["AdminError", "AdminService", "UnknownAccount"]
