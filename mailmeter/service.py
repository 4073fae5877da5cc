"""The admin service layer: every operator action, once, for the CLI and the HTTP API.

Each method takes plain values and returns JSON-ready data (money as decimal
strings). Errors are AdminError (or its NotFound and Conflict) with a message
that says what to do. Every method that changes state records an audit event
for the service's `actor` in the same call, and for an account in the same
database transaction as the change (SqliteStore.audited), so neither the CLI
nor the API can change anything unaudited.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import date, datetime, time, timezone
from typing import Any

import structlog

from mailmeter.audit import WEBHOOK_ACTOR, account_view, changes, event_json
from metering.billing import Billing
from metering.export import export_csv, month_of
from metering.meter import Meter, UnknownAccount, UnknownPlan
from metering.sqlite_store import AuditDraft, DuplicateEvent
from policies import Standing, preview
from policies.money import MoneyError, format_money, is_whole_cents, parse_money
from policies.parts import ThresholdCharge


class AdminError(ValueError):
    """An operator error: the message names the fix."""


class NotFound(AdminError):
    """The thing named does not exist (HTTP 404)."""


class Conflict(AdminError):
    """The change clashes with what exists (HTTP 409)."""


PAYMENT_EVENTS = ("charge.succeeded", "charge.failed", "payment_method.updated")
LIMITS = ("included", "quota", "spending")


def _emails(value: object, what: str) -> int:
    """A whole number of emails from an int or a string like "10,000"."""
    if isinstance(value, bool):
        raise AdminError(f"{what}: give a whole number of emails, like 50000")
    if isinstance(value, int):
        return value
    try:
        return int(str(value).replace(",", "").replace("_", ""))
    except ValueError:
        raise AdminError(f"{what}: {value!r} is not a whole number of emails (write it like 50000)") from None


def _text(event: Mapping[str, Any], key: str) -> str:
    value = event.get(key)
    if not isinstance(value, str) or not value:
        raise AdminError(f"{key}: give the {key} as a non-empty string")
    return value


def _money(text: str, what: str) -> int:
    try:
        return parse_money(text)
    except MoneyError as error:
        raise AdminError(f"{what}: {error}") from None


def _monthly_payment(text: str) -> int:
    micros = _money(text, "amount")
    if micros < 0 or not is_whole_cents(micros):
        raise AdminError("amount: the monthly payment is charged as it is: give a non-negative amount in whole"
                         " cents, like 150.00")
    return micros


@dataclass
class AdminService:
    """The operator's actions; `actor` (a token NAME, `cli:USER`) is who the audit trail names."""

    meter: Meter
    billing: Billing
    actor: str

    def as_actor(self, actor: str) -> AdminService:
        """The same service acting for someone else (one API request's token NAME)."""
        return replace(self, actor=actor)

    @asynccontextmanager
    async def _audit(
        self, action: str, account: str, detail: dict[str, Any] | None = None, event_id: str | None = None
    ) -> AsyncIterator[AuditDraft]:
        """Wrap the one meter call that changes `account`: its audit event commits with it."""
        draft = AuditDraft(at=self.meter.clock(), actor=self.actor, action=action, target=account,
                           view=account_view, detail=detail or {}, event_id=event_id)
        async with self.meter.store.audited(draft):
            yield draft
        if draft.written:
            structlog.get_logger("mailmeter.audit").info(
                "admin.change", actor=self.actor, action=action, target=account, audit_id=draft.id,
                changed=sorted(changes(draft.before, draft.after)), result="ok",
            )

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
        monthly_payment: str | None = None,
    ) -> dict[str, Any]:
        if password is None and not networks:
            raise AdminError("give a password (for SMTP AUTH) or a client network binding, or both")
        if not domains:
            raise AdminError("give at least one sender domain the account may send from")
        if await self.meter.store.get_account(name) is not None:
            raise Conflict(f"account {name!r} already exists; choose another name")
        payment = None if monthly_payment is None else _monthly_payment(monthly_payment)
        detail: dict[str, Any] = {"plan": plan}
        if payment is not None:
            detail["monthly_payment"] = format_money(payment)
        try:
            async with self._audit("account.add", name, detail):
                account = await self.meter.add_account(
                    name, password, plan, domains, networks, subscribed_on=subscribed_on, contacts=contacts,
                    monthly_payment=payment,
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
        reason = reason or ("payment method updated" if ok else "payment failed")
        async with self._audit("payment.ok" if ok else "payment.failed", name, {"reason": reason}):
            await self.meter.set_payment(name, ok, reason)
        return await self.account(name)

    async def payment(self, name: str, state: str, reason: str = "") -> dict[str, Any]:
        """`failed` blocks sending (live, at the next MAIL or RCPT); `ok` releases it."""
        if state not in ("failed", "ok"):
            raise AdminError(f"state: {state!r} is not a payment state; give failed (block) or ok (release)")
        return await self.set_payment(name, state == "ok", reason)

    async def add_balance(self, name: str, amount: str) -> dict[str, Any]:
        micros = _money(amount, "amount")
        if micros <= 0:
            raise AdminError("amount: a top-up must be positive, like 25.00")
        async with self._audit("balance.add", name, {"amount": format_money(micros)}):
            balance = await self.meter.add_balance(name, micros)
        return {"account": name, "added": format_money(micros), "prepaid_balance": format_money(balance)}

    async def set_monthly_payment(self, name: str, amount: str) -> dict[str, Any]:
        """Model B's "increase your payment": the account's monthly payment, credited to its
        prepaid balance from the next period on (the current period's credit is already fixed;
        to send more in it, top up the balance)."""
        micros = _monthly_payment(amount)
        account = await self.meter.account(name)
        plan = self.meter.plans.get(account.plan)
        if plan is not None and plan.funding.kind != "prepaid":
            raise Conflict(f"account {name!r} is on plan {account.plan!r}, which is postpaid: it is invoiced for"
                           " what it sends; a monthly payment is credit to a prepaid balance")
        try:
            async with self._audit("balance.monthly", name, {"amount": format_money(micros)}):
                change = await self.meter.set_monthly_payment(name, micros)
        except ValueError as error:
            raise AdminError(str(error).strip('"')) from None
        prepaid = (await self.usage(name))["prepaid"]
        return {"account": name, "monthly_payment": prepaid["monthly_payment"],
                "next_monthly_payment": format_money(change.amount), "applies_from": change.starts.isoformat(),
                "prepaid_balance": (await self.account(name))["prepaid_balance"]}

    async def repay(self, name: str) -> dict[str, Any]:
        async with self._audit("repay", name):
            repaid = await self.meter.repay(name)
        return {"account": name, "repaid": format_money(repaid)}

    async def set_limit(self, name: str, which: str, value: object) -> dict[str, Any]:
        """One of the account's limits: `included` or `quota` emails, or a `spending` amount."""
        if which == "spending":
            if value is not None and not isinstance(value, str):
                raise AdminError('amount: write the spending limit as a decimal string like "20.00", or none')
            return await self.set_spending_limit(name, value)
        if which in ("included", "quota"):
            return await self.set_email_limit(name, which, _emails(value, "emails"))
        raise AdminError(f"limit {which!r}: choose included, quota or spending")

    async def set_email_limit(self, name: str, which: str, emails: int) -> dict[str, Any]:
        if which not in ("included", "quota"):
            raise AdminError("limit: choose included (model E's monthly limit) or quota (a hard cap)")
        if emails < 0:
            raise AdminError("emails: the number of emails must not be negative")
        async with self._audit(f"limit.{which}", name, {"emails": emails}):
            await self.meter.set_email_limit(name, which, emails)
        return await self.usage(name)

    async def set_spending_limit(self, name: str, amount: str | None) -> dict[str, Any]:
        micros = None if amount in (None, "none") else _money(str(amount), "amount")
        if micros is not None and micros < 0:
            raise AdminError("amount: the spending limit must not be negative")
        detail = {"amount": None if micros is None else format_money(micros)}
        async with self._audit("limit.spending", name, detail):
            await self.meter.set_spending_limit(name, micros)
        return await self.usage(name)

    # -- the inbound payment webhook ---------------------------------------------------

    async def payment_event(self, event: Mapping[str, Any], event_id: object) -> dict[str, Any]:
        """Apply one payment provider event, once per event id.

        `charge.succeeded` / `charge.failed` settle a charge the gateway answered
        `pending` for (a failure blocks the account, live); `payment_method.updated`
        releases a blocked account. The event id is stored with the audit event in
        the change's own transaction, so a redelivery changes nothing.
        """
        kind = event.get("type")
        if kind not in PAYMENT_EVENTS:
            raise AdminError(f"type: {kind!r} is not a payment event; send one of {', '.join(PAYMENT_EVENTS)}")
        if not isinstance(event_id, str) or not event_id:
            raise AdminError("id: give the event an id string (or an Idempotency-Key header) so a redelivery"
                             " is recognised and ignored")
        previous = await self.meter.store.audit_event_for(event_id)
        if previous is not None:
            return {"event": event_id, "duplicate": True, "account": previous["target"], "type": previous["action"]}
        service = self.as_actor(WEBHOOK_ACTOR)
        try:
            if kind == "payment_method.updated":
                name = _text(event, "account")
                async with service._audit(kind, name, {"event": event_id}, event_id=event_id):
                    await self.meter.set_payment(name, True, f"payment method updated (event {event_id})")
                return {"event": event_id, "duplicate": False, "type": kind, "account": name,
                        "payment_state": (await self.meter.account(name)).payment_state}
            return await service._settle_charge(event, kind, event_id)
        except DuplicateEvent:  # the same event, delivered twice at once: the other delivery applied it
            return {"event": event_id, "duplicate": True, "type": kind}

    async def _settle_charge(self, event: Mapping[str, Any], kind: str, event_id: str) -> dict[str, Any]:
        key = _text(event, "charge")
        reason = str(event.get("reason") or "")
        charge = await self.meter.store.charge(key)
        if charge is None:
            raise NotFound(f"charge: no charge {key!r}; send the Idempotency-Key of the relay's charge request")
        status = "succeeded" if kind == "charge.succeeded" else "failed"
        detail = {"event": event_id, "charge": key, "reason": reason}
        async with self._audit(kind, charge["account"], detail, event_id=event_id):
            applied = await self.meter.store.set_charge_result(
                key, status, reason or kind, charge["attempts"], self.meter.clock()
            )
        account = await self.meter.account(charge["account"])
        return {"event": event_id, "duplicate": False, "type": kind, "account": account.name, "charge": key,
                "applied": applied, "charge_status": status if applied else charge["status"],
                "payment_state": account.payment_state}

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
                body: dict[str, Any] = json.loads(record.body)
                body["id"] = record.id
                body["status"] = record.status
                return body
        raise NotFound(f"no invoice {invoice_id!r} (see `mailmeter invoice list ACCOUNT`)")

    async def export_csv(self, month: str) -> str:
        """Every figure of the invoices of periods starting in `month` (YYYY-MM, plan's zone), as
        CSV that reconciles alone (metering/export.py)."""
        try:
            datetime.strptime(month, "%Y-%m")
        except ValueError:
            raise AdminError(f"period {month!r}: write it as YYYY-MM, like 2026-04") from None
        return export_csv(record for record in await self.meter.store.invoices() if month_of(record) == month)

    async def run_billing(self) -> dict[str, Any]:
        run = await self.billing.run_once()
        result = {"invoices": run.invoices, "charges_collected": run.charges_collected,
                  "charges_failed": run.charges_failed, "statements": run.statements}
        # Many accounts and transactions: one event for the run, after it (target "billing").
        audit_id = await self.meter.store.add_audit_event(self.meter.clock(), self.actor, "billing.run",
                                                          "billing", None, result, {})
        structlog.get_logger("mailmeter.audit").info(
            "admin.change", actor=self.actor, action="billing.run", target="billing", audit_id=audit_id,
            changed=[], result="ok",
        )
        return result

    # -- the audit trail ------------------------------------------------------------------

    async def audit(self, account: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """The newest `limit` admin changes, newest first; only one account's when given."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
            raise AdminError("limit: give a number of events from 1 to 1000")
        if account is not None:
            await self.meter.account(account)
        return [event_json(row) for row in await self.meter.store.audit_events(account, limit)]

    # -- plans ------------------------------------------------------------------------

    def plans(self) -> list[dict[str, Any]]:
        """The plans the config defines: the parts an operator picks a plan by."""
        return [
            {
                "name": name,
                "display_name": plan.title,
                "period": {"kind": plan.period.kind, "timezone": plan.period.timezone},
                "billable": plan.billable,
                "plan_fee": format_money(plan.plan_fee),
                "included_emails": plan.included_emails,
                "email_quota": plan.email_quota,
                "spending_limit": None if plan.spending_limit is None else format_money(plan.spending_limit),
                "in_period_charge": (None if plan.in_period_charge is None
                                     else "threshold" if isinstance(plan.in_period_charge, ThresholdCharge)
                                     else "per_block"),
                "funding": {
                    "kind": plan.funding.kind,
                    "net_days": plan.funding.net_days,
                    "overdraft_allowance": (None if plan.funding.overdraft_allowance is None
                                            else format_money(plan.funding.overdraft_allowance)),
                    "monthly_payment": format_money(plan.funding.monthly_payment),
                },
            }
            for name, plan in sorted(self.meter.plans.items())
        ]

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
            raise NotFound(f"plan {plan_name!r} is not defined (known: {', '.join(sorted(self.meter.plans))})")
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


__all__ = ["AdminError", "AdminService", "Conflict", "NotFound", "UnknownAccount"]
