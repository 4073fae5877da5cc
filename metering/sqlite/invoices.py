"""The SQLite store's charges, invoices, statements and notices (a charge is never issued twice)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from datetime import datetime, timezone

import aiosqlite

from mailmeter.metering.records import Account, InvoiceRecord, charge_key, payment_event
from mailmeter.metering.sqlite.accounts import account_in_tx
from mailmeter.metering.sqlite.connection import SqliteConnection
from mailmeter.metering.sqlite.events import ADD_EVENT, add_event_params
from mailmeter.policies.charges import Charge


class SqliteInvoices(SqliteConnection):
    # -- charges, invoices, notices ------------------------------

    async def add_monthly_credit(self, account_id: int, period_key: str, credit: Charge | None, now: datetime) -> bool:
        """Record a period's monthly credit (model B): the charge that collects it, and its amount
        added to the prepaid balance, once; then mark the period credited.

        Idempotent on the charge's key: a retry, a restart or another node recording the
        same period's credit finds the charge there and adds nothing. Returns whether this
        call added it. `credit` None (a payment of 0) only marks the period credited.
        """
        async with self._tx() as db:
            account = await account_in_tx(db, account_id)
            added = False
            if credit is not None and await insert_charge(db, account, period_key, credit, now):
                await db.execute(
                    "UPDATE accounts SET prepaid_balance = prepaid_balance + ? WHERE id = ?",
                    (credit.amount, account_id),
                )
                await db.execute(
                    "INSERT INTO balance_entries (account_id, amount, kind, reference, created_at)"
                    " VALUES (?, ?, 'monthly', ?, ?)",
                    (account_id, credit.amount, charge_key(account.name, period_key, credit.key), now.isoformat()),
                )
                added = True
            await db.execute(
                "UPDATE accounts SET credited_through = ? WHERE id = ?"
                " AND (credited_through IS NULL OR credited_through < ?)",
                (period_key, account_id, period_key),
            )
            return added

    async def charges_due_for_collection(self, now: datetime, limit: int = 100) -> list[sqlite3.Row]:
        return await self._read(
            "SELECT c.*, a.name AS account FROM charges c JOIN accounts a ON a.id = c.account_id"
            " WHERE c.status = 'pending' AND c.next_attempt_at <= ? ORDER BY c.created_at LIMIT ?",
            (now.isoformat(), limit),
        )

    async def charge(self, key: str) -> sqlite3.Row | None:
        rows = await self._read(
            "SELECT c.*, a.name AS account FROM charges c JOIN accounts a ON a.id = c.account_id"
            " WHERE c.idempotency_key = ?",
            (key,),
        )
        return rows[0] if rows else None

    async def charges_of(self, account_id: int, period_key: str | None = None) -> list[sqlite3.Row]:
        if period_key is None:
            return await self._read(
                "SELECT * FROM charges WHERE account_id = ? ORDER BY created_at, seq", (account_id,)
            )
        return await self._read(
            "SELECT * FROM charges WHERE account_id = ? AND period_key = ? ORDER BY created_at, seq",
            (account_id, period_key),
        )

    async def set_charge_result(
        self, key: str, status: str, detail: str, attempts: int, next_attempt_at: datetime
    ) -> bool:
        """Record a gateway verdict. A failed charge blocks the account's sending at once.

        Only a charge still open (pending, submitted, or recorded for an external system to
        collect) changes: a late duplicate verdict is ignored.
        """
        async with self._tx() as db:
            cursor = await db.execute(
                "UPDATE charges SET status = ?, detail = ?, attempts = ?, next_attempt_at = ?"
                " WHERE idempotency_key = ? AND status IN ('pending', 'submitted', 'recorded')",
                (status, detail[:500], attempts, next_attempt_at.isoformat(), key),
            )
            changed = cursor.rowcount == 1
            if changed and status == "failed":
                await db.execute(
                    "UPDATE accounts SET payment_ok = 0, payment_detail = ?"
                    " WHERE id = (SELECT account_id FROM charges WHERE idempotency_key = ?)",
                    (f"charge {key} failed: {detail}"[:500], key),
                )
            if changed and status in ("failed", "succeeded"):
                cursor = await db.execute(
                    "SELECT c.account_id, a.payment_ok FROM charges c JOIN accounts a ON a.id = c.account_id"
                    " WHERE c.idempotency_key = ?",
                    (key,),
                )
                row = await cursor.fetchone()
                if row is not None:
                    data = payment_event(bool(row[1]), detail, key, status)
                    await db.execute(ADD_EVENT, add_event_params(row[0], "payment", data, datetime.now(timezone.utc)))
            if changed and status == "succeeded":
                await db.execute(
                    "UPDATE invoices SET status = 'paid' WHERE (account_id, period_key) ="
                    " (SELECT account_id, period_key FROM charges WHERE idempotency_key = ? AND kind = 'invoice')",
                    (key,),
                )
                await _apply_payment(db, key, next_attempt_at)
            return changed

    async def last_invoiced_periods(self) -> dict[int, str]:
        rows = await self._read("SELECT account_id, MAX(period_key) FROM invoices GROUP BY account_id")
        return {row[0]: row[1] for row in rows}

    async def add_invoice(
        self,
        invoice: InvoiceRecord,
        collect: Charge | None,
        prepaid_applied: int,
        notice_body: str,
        now: datetime,
    ) -> bool:
        """Close a period: the invoice, its prepaid deduction, and its collection charge.

        Idempotent per (account, period): when several nodes close the same period at
        once, exactly one insert wins and only that one deducts and charges.
        """
        async with self._tx() as db:
            cursor = await db.execute(
                "INSERT OR IGNORE INTO invoices (id, account_id, period_key, period_end, issued_at, invoice_date,"
                " due_date, statement_date, total, amount_due, prepaid_applied, status, body)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    invoice.id,
                    invoice.account_id,
                    invoice.period_key,
                    invoice.period_end,
                    invoice.issued_at,
                    invoice.invoice_date,
                    invoice.due_date,
                    invoice.statement_date,
                    invoice.total,
                    invoice.amount_due,
                    invoice.prepaid_applied,
                    invoice.status,
                    invoice.body,
                ),
            )
            if cursor.rowcount != 1:
                return False
            await db.execute(
                "UPDATE accounts SET settled_through = ? WHERE id = ?"
                " AND (settled_through IS NULL OR settled_through < ?)",
                (invoice.period_key, invoice.account_id, invoice.period_key),
            )
            if prepaid_applied:
                await db.execute(
                    "UPDATE accounts SET prepaid_balance = prepaid_balance - ? WHERE id = ?",
                    (prepaid_applied, invoice.account_id),
                )
                await db.execute(
                    "INSERT INTO balance_entries (account_id, amount, kind, reference, created_at)"
                    " VALUES (?, ?, 'usage', ?, ?)",
                    (invoice.account_id, -prepaid_applied, invoice.id, now.isoformat()),
                )
            if collect is not None:
                account = await account_in_tx(db, invoice.account_id)
                await insert_charge(db, account, invoice.period_key, collect, now)
            await db.execute(
                "INSERT OR IGNORE INTO notices (account_id, period_key, key, body, created_at)"
                " VALUES (?, ?, 'invoice', ?, ?)",
                (invoice.account_id, invoice.period_key, notice_body, now.isoformat()),
            )
            return True

    async def invoices(self, account_id: int | None = None) -> list[InvoiceRecord]:
        sql = (
            "SELECT id, account_id, period_key, period_end, issued_at, invoice_date, due_date, statement_date,"
            " total, amount_due, prepaid_applied, status, body FROM invoices"
        )
        rows = await (
            self._read(sql + " ORDER BY period_key, id")
            if account_id is None
            else self._read(sql + " WHERE account_id = ? ORDER BY period_key", (account_id,))
        )
        return [InvoiceRecord(*tuple(row)) for row in rows]

    async def statements_due(self, today_by_invoice: Callable[[InvoiceRecord], bool]) -> list[InvoiceRecord]:
        rows = await self._read(
            "SELECT id, account_id, period_key, period_end, issued_at, invoice_date, due_date, statement_date,"
            " total, amount_due, prepaid_applied, status, body FROM invoices WHERE statement_sent = 0"
        )
        return [r for r in (InvoiceRecord(*tuple(row)) for row in rows) if today_by_invoice(r)]

    async def mark_statement(self, invoice: InvoiceRecord, body: str, now: datetime) -> None:
        async with self._tx() as db:
            await db.execute("UPDATE invoices SET statement_sent = 1 WHERE id = ?", (invoice.id,))
            await db.execute(
                "INSERT OR IGNORE INTO notices (account_id, period_key, key, body, created_at)"
                " VALUES (?, ?, 'statement', ?, ?)",
                (invoice.account_id, invoice.period_key, body, now.isoformat()),
            )

    async def pending_notices(self) -> list[sqlite3.Row]:
        return await self._read(
            "SELECT n.*, a.name AS account, a.contacts AS contacts FROM notices n"
            " JOIN accounts a ON a.id = n.account_id WHERE n.email_sent = 0 OR n.webhook_sent = 0"
            " ORDER BY n.created_at"
        )

    async def mark_notice(self, account_id: int, period_key: str, key: str, channel: str) -> None:
        column = {"email": "email_sent", "webhook": "webhook_sent"}[channel]
        async with self._tx() as db:
            await db.execute(
                f"UPDATE notices SET {column} = 1 WHERE account_id = ? AND period_key = ? AND key = ?",
                (account_id, period_key, key),
            )

    async def notices_of(self, account_id: int) -> list[sqlite3.Row]:
        return await self._read("SELECT * FROM notices WHERE account_id = ? ORDER BY created_at, key", (account_id,))


async def insert_charge(
    db: aiosqlite.Connection, account: Account, period_key: str, charge: Charge, now: datetime
) -> bool:
    """Insert a charge under its idempotency key; False if the key was already there."""
    cursor = await db.execute(
        "INSERT OR IGNORE INTO charges (idempotency_key, account_id, period_key, kind, seq, amount,"
        " emails_unlocked, description, created_at, next_attempt_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            charge_key(account.name, period_key, charge.key),
            account.id,
            period_key,
            charge.kind,
            charge.index,
            charge.amount,
            charge.emails_unlocked,
            charge.description,
            now.isoformat(),
            now.isoformat(),
        ),
    )
    return cursor.rowcount == 1


def insert_charge_sync(
    conn: sqlite3.Connection, account: Account, period_key: str, charge: Charge, now: datetime
) -> None:
    conn.execute(
        "INSERT OR IGNORE INTO charges (idempotency_key, account_id, period_key, kind, seq, amount,"
        " emails_unlocked, description, created_at, next_attempt_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            charge_key(account.name, period_key, charge.key),
            account.id,
            period_key,
            charge.kind,
            charge.index,
            charge.amount,
            charge.emails_unlocked,
            charge.description,
            now.isoformat(),
            now.isoformat(),
        ),
    )


async def _apply_payment(db: aiosqlite.Connection, key: str, now: datetime) -> None:
    """What a payment the account made (mailmeter/portal/) does once it succeeded, in the same
    transaction as its verdict: a `topup` adds its amount to the prepaid balance; a `repay`
    pays the invoices overdrawn when it was asked for (their total was its amount)."""
    cursor = await db.execute(
        "SELECT account_id, kind, amount, created_at FROM charges WHERE idempotency_key = ?"
        " AND kind IN ('topup', 'repay')",
        (key,),
    )
    payment = await cursor.fetchone()
    if payment is None:
        return
    if payment["kind"] == "topup":
        await db.execute(
            "UPDATE accounts SET prepaid_balance = prepaid_balance + ? WHERE id = ?",
            (payment["amount"], payment["account_id"]),
        )
    else:
        await db.execute(
            "UPDATE invoices SET status = 'paid' WHERE account_id = ? AND status = 'overdrawn' AND issued_at <= ?",
            (payment["account_id"], payment["created_at"]),
        )
    await db.execute(
        "INSERT INTO balance_entries (account_id, amount, kind, reference, created_at) VALUES (?, ?, ?, ?, ?)",
        (payment["account_id"], payment["amount"], payment["kind"], key, now.isoformat()),
    )
