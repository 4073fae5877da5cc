"""The billing job: close periods, collect charges, queue statements.

It runs inside the relay (every `billing.interval` seconds) and catches up after
downtime: every period that ended since the account's last invoice is closed in
order. Each step is idempotent in the store (an invoice per account and period,
a charge per idempotency key), so two nodes running it at once, or a crash
half-way, never bill twice.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from typing import Any, Protocol

import structlog

from mailmeter.metering.gateway import ChargeOutcome, ChargeRequest, PaymentGateway
from mailmeter.metering.meter import Meter, first_period, standing_of
from mailmeter.metering.records import Account, InvoiceRecord, Row, in_force
from mailmeter.metering.store import AccountStore, BillingStore, UsageStore
from mailmeter.policies import Charge, Invoice, Plan, close_period
from mailmeter.policies.currency import Currency
from mailmeter.policies.money import format_money
from mailmeter.policies.periods import Period, next_period, period_containing


@dataclass(frozen=True)
class CollectionCharge:
    """The closing invoice's amount due, collected through the gateway like any charge."""

    amount: int
    description: str
    kind: str = "invoice"
    index: int = 1
    emails_unlocked: int | None = None
    trigger_email: int | None = None

    @property
    def key(self) -> str:
        return f"{self.kind}/{self.index}"


class BillingJobStore(AccountStore, UsageStore, BillingStore, Protocol):
    """What the billing job reads and writes: accounts, their periods' usage, charges and invoices."""


@dataclass
class BillingRun:
    invoices: list[str] = field(default_factory=list)
    charges_collected: int = 0
    charges_failed: int = 0
    charges_recorded: int = 0  # billing.gateway.kind none: left to an external system to collect
    statements: int = 0


def invoice_id(account: Account, period: Period, plan: Plan) -> str:
    local = period.start.astimezone(plan.period.zone())
    return f"INV-{account.name}-{local:%Y%m%d}"


def stored_charges(rows: Sequence[Row]) -> list[Charge]:
    return [
        Charge(
            kind=row["kind"],
            index=row["seq"],
            amount=row["amount"],
            emails_unlocked=row["emails_unlocked"],
            trigger_email=None,
            description=row["description"],
        )
        for row in rows
        if row["kind"] not in _NOT_IN_PERIOD
    ]


_NOT_IN_PERIOD = ("invoice", "monthly", "topup", "repay")  # not usage collected during the period


def invoice_status(plan: Plan, invoice: Invoice) -> str:
    if invoice.amount_due <= 0:
        return "paid"
    if plan.funding.overdraft_allowance is not None:
        return "overdrawn"  # model C: debt until `mailmeter repay`
    return "open"  # collected through the payment gateway


def invoice_body(
    account: Account,
    plan: Plan,
    invoice: Invoice,
    status: str,
    charges: Sequence[Row],
    regions: Sequence[Row],
) -> dict[str, Any]:
    """Everything `invoice show` prints and `export` flattens: decimal strings in the plan's
    currency's minor units ("25.00", JPY "2500", BHD "25.000"), never floats."""
    local_start = invoice.period.start.astimezone(plan.period.zone())
    currency = plan.currency
    return {
        "account": account.name,
        "plan": account.plan,
        "plan_display_name": invoice.plan,
        "currency": currency.code,
        "period": invoice.period_label,
        "period_month": f"{local_start:%Y-%m}",
        "period_start": invoice.period.start.isoformat(),
        "period_end": invoice.period.end.isoformat(),
        "issued_at": invoice.issued_at.isoformat(),
        "invoice_date": invoice.invoice_date.isoformat(),
        "due_date": invoice.due_date.isoformat(),
        "statement_date": invoice.statement_date.isoformat(),
        "lines": [
            {
                "kind": line.kind,
                "description": line.description,
                "quantity": line.quantity,
                "amount": format_money(line.amount, currency),
            }
            for line in invoice.lines
        ],
        "total": format_money(invoice.total, currency),
        "prepaid_applied": format_money(invoice.prepaid_applied, currency),
        "payments": (
            [
                {
                    "kind": "prepaid",
                    "description": "Paid from the prepaid balance",
                    "amount": format_money(-invoice.prepaid_applied, currency),
                }
            ]
            if invoice.prepaid_applied
            else []
        ),
        "amount_due": format_money(invoice.amount_due, currency),
        "status": status,
        "in_period_charges": [_charge_json(row, currency) for row in charges if row["kind"] not in _NOT_IN_PERIOD],
        "monthly_payments": [_charge_json(row, currency) for row in charges if row["kind"] == "monthly"],
        "prepaid": _prepaid_json(invoice, charges, currency),
        "regions": [
            {"region": row["region"] or "(unknown)", "result": row["result"], "emails": row["n"]} for row in regions
        ],
    }


def _charge_json(row: Row, currency: Currency) -> dict[str, Any]:
    return {
        "key": row["idempotency_key"],
        "kind": row["kind"],
        "amount": format_money(row["amount"], currency),
        "emails_unlocked": row["emails_unlocked"],
        "description": row["description"],
        "created_at": row["created_at"],
        "status": row["status"],
    }


def _prepaid_json(invoice: Invoice, charges: Sequence[Row], currency: Currency) -> dict[str, str] | None:
    """A prepaid period's balance, as the receipt shows it: what the period could spend (carried
    in, its monthly payment, top-ups made until it closed), what its usage took, what carries over."""
    if invoice.prepaid_balance_after is None:
        return None
    before = invoice.prepaid_balance_after + invoice.prepaid_applied
    return {
        "balance_before_usage": format_money(before, currency),
        "monthly_payment": format_money(sum(row["amount"] for row in charges if row["kind"] == "monthly"), currency),
        "applied": format_money(invoice.prepaid_applied, currency),
        "balance_after": format_money(invoice.prepaid_balance_after, currency),
    }


_YIELD_EVERY = 256  # accounts looked at between hand-backs of the loop to SMTP sessions


class Billing:
    def __init__(
        self,
        meter: Meter,
        gateway: PaymentGateway,
        retry_first_delay: float = 30.0,
        retry_max_delay: float = 3600.0,
    ) -> None:
        self.meter = meter
        self.store: BillingJobStore = meter.store
        self.gateway = gateway
        self.retry_first_delay = retry_first_delay
        self.retry_max_delay = retry_max_delay
        self.log = structlog.get_logger("mailmeter.billing")

    async def run_once(self) -> BillingRun:
        run = BillingRun()
        accounts = await self.store.list_accounts()
        run.invoices = await self.close_due_periods(accounts)
        run.statements = await self.queue_statements(accounts)
        run.charges_collected, run.charges_failed, run.charges_recorded = await self.collect_charges()
        return run

    # -- closing periods ----------------------------------------------------------

    def _first_open_period(self, account: Account, plan: Plan, last_key: str | None) -> Period:
        anchor = account.subscribed_on
        if last_key is not None:
            last = period_containing(plan.period, datetime.fromisoformat(last_key), anchor)
            return next_period(plan.period, last, anchor)
        return first_period(account, plan)

    async def close_due_periods(self, accounts: list[Account] | None = None) -> list[str]:
        """Close every ended period not yet invoiced, oldest first, account by account; record
        each prepaid period's monthly credit before its invoice, and the current one's after.

        The pass runs on the relay's event loop every `billing.interval` seconds and
        usually finds nothing to close: it reads all accounts and their last invoiced
        periods in two queries, not two per account, and hands the loop back to the
        SMTP sessions every few hundred accounts.
        """
        now = self.meter.clock()
        closed: list[str] = []
        if accounts is None:
            accounts = await self.store.list_accounts()
        last_invoiced = await self.store.last_invoiced_periods()
        for number, account in enumerate(accounts):
            if number % _YIELD_EVERY == _YIELD_EVERY - 1:
                await asyncio.sleep(0)
            plan = self.meter.plans.get(account.plan)
            if plan is None:
                self.log.error("billing.unknown_plan", account=account.name, plan=account.plan)
                continue
            period = self._first_open_period(account, plan, last_invoiced.get(account.id))
            while period.end <= now:
                if account.deleted_at is not None and period.start > account.deleted_at:
                    break  # a deleted account's last invoice is for the period it was deleted in
                # The plan the period ran under: a change due by its start is in force in it.
                in_period = in_force(account, period.start)
                if in_period.plan not in self.meter.plans:
                    self.log.error("billing.unknown_plan", account=account.name, plan=in_period.plan)
                    break
                account = await self.meter.record_monthly_credits(account, self.meter.plans[in_period.plan])
                invoice_key = await self._close(in_force(account, period.start), period, now)
                if invoice_key is None:
                    break  # not issued yet (model C: 15:00 on the 1st)
                closed.append(invoice_key)
                account = await self.meter.account(account.name)  # the balance may have changed
                period = next_period(plan.period, period, account.subscribed_on)
            if account.deleted_at is not None:
                continue  # no monthly credit after a deletion
            in_force_now = in_force(account, now).plan
            await self.meter.record_monthly_credits(
                account, plan if in_force_now == account.plan else self.meter.plans.get(in_force_now)
            )
        return closed

    async def _close(self, account: Account, period: Period, now: datetime) -> str | None:
        """Invoice `period` of `account` (as in force in the period), unless it is not issued yet."""
        plan = self.meter.plan_of(account)
        usage = await self.store.usage(account.id, period.key)
        charge_rows = await self.store.charges_of(account.id, period.key)
        invoice = close_period(plan, standing_of(account, period, plan), usage, period, stored_charges(charge_rows))
        if invoice.issued_at > now:
            return None
        status = invoice_status(plan, invoice)
        regions = await self.store.results_by_region(account.id, period.key)
        body = invoice_body(account, plan, invoice, status, list(charge_rows), list(regions))
        identifier = invoice_id(account, period, plan)
        record = InvoiceRecord(
            id=identifier,
            account_id=account.id,
            period_key=period.key,
            period_end=period.end.isoformat(),
            issued_at=invoice.issued_at.isoformat(),
            invoice_date=invoice.invoice_date.isoformat(),
            due_date=invoice.due_date.isoformat(),
            statement_date=invoice.statement_date.isoformat(),
            total=invoice.total,
            amount_due=invoice.amount_due,
            prepaid_applied=invoice.prepaid_applied,
            status=status,
            body=json.dumps(body),
        )
        collect = (
            CollectionCharge(amount=invoice.amount_due, description=f"Invoice {identifier}")
            if status == "open"
            else None
        )
        notice = json.dumps(
            {
                "kind": "invoice",
                "invoice": identifier,
                "currency": body["currency"],
                "total": body["total"],
                "amount_due": body["amount_due"],
                "due_date": body["due_date"],
            }
        )
        inserted = await self.store.add_invoice(record, collect, invoice.prepaid_applied, notice, now)  # type: ignore[arg-type]
        if inserted:
            self.log.info(
                "billing.invoice",
                account=account.name,
                invoice=identifier,
                period=body["period"],
                total=body["total"],
                amount_due=body["amount_due"],
                result=status,
            )
        return identifier

    # -- statements (model C: the billing email on the 5th) ---------------------------

    async def queue_statements(self, accounts: list[Account] | None = None) -> int:
        now = self.meter.clock()
        zones = {}
        for account in accounts if accounts is not None else await self.store.list_accounts():
            plan = self.meter.plans.get(account.plan)
            if plan is not None:
                zones[account.id] = plan.period.zone()

        def due(invoice: InvoiceRecord) -> bool:
            zone = zones.get(invoice.account_id)
            if zone is None:
                return False
            day = datetime.fromisoformat(invoice.statement_date).date()
            return now >= datetime.combine(day, time(0), tzinfo=zone)

        count = 0
        for invoice in await self.store.statements_due(due):
            body = json.loads(invoice.body)
            notice = json.dumps(
                {
                    "kind": "statement",
                    "invoice": invoice.id,
                    "period": body["period"],
                    "currency": body["currency"],
                    "total": body["total"],
                    "amount_due": body["amount_due"],
                    "status": invoice.status,
                }
            )
            await self.store.mark_statement(invoice, notice, now)
            count += 1
        return count

    # -- collecting charges -----------------------------------------------------------

    def _backoff(self, attempts: int) -> timedelta:
        return timedelta(seconds=min(self.retry_first_delay * 2 ** max(attempts - 1, 0), self.retry_max_delay))

    async def collect_charges(self) -> tuple[int, int, int]:
        """Hand every pending charge that is due to the gateway: (succeeded, failed, recorded)."""
        collected = failed = recorded = 0
        for row in await self.store.charges_due_for_collection(self.meter.clock()):
            status = await self._collect(row)
            collected += status == "succeeded"
            failed += status == "failed"
            recorded += status == "recorded"
        return collected, failed, recorded

    async def collect_charge(self, key: str) -> str | None:
        """Hand one pending charge to the gateway now (a payment the account holder just made);
        its new status, or None if it is not pending (another pass took it)."""
        row = await self.store.charge(key)
        if row is None or row["status"] != "pending":
            return None
        return await self._collect(row)

    async def _collect(self, row: Row) -> str:
        now = self.meter.clock()
        currency = self.meter.currency
        request = ChargeRequest(
            idempotency_key=row["idempotency_key"],
            account=row["account"],
            amount=format_money(row["amount"], currency),
            amount_micros=row["amount"],
            currency=currency.code,
            kind=row["kind"],
            description=row["description"],
            period_start=row["period_key"],
            created_at=row["created_at"],
        )
        result = await self.gateway.submit(request)
        attempts = row["attempts"] + 1
        status = {
            ChargeOutcome.SUCCEEDED: "succeeded",
            ChargeOutcome.FAILED: "failed",
            ChargeOutcome.PENDING: "submitted",
            ChargeOutcome.RETRY: "pending",
            ChargeOutcome.RECORDED: "recorded",
        }[result.outcome]
        next_attempt = now + self._backoff(attempts) if status == "pending" else now
        await self.store.set_charge_result(row["idempotency_key"], status, result.detail, attempts, next_attempt)
        self.log.info(
            "billing.charge",
            account=row["account"],
            charge=row["idempotency_key"],
            amount=request.amount,
            attempt=attempts,
            result=status,
            detail=result.detail,
        )
        return status
