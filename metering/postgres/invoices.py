"""The PostgreSQL store's charges, invoices, statements and notices.

A charge is inserted with `ON CONFLICT DO NOTHING` on its idempotency key, so it is
never issued twice. An invoice is unique per (account, period): when several nodes
close the same period at once they queue on the account's lock, exactly one insert
wins, and only that transaction deducts prepaid and adds the collection charge.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone

import asyncpg

from mailmeter.metering.postgres.base import PgBase
from mailmeter.metering.postgres.events import add_event
from mailmeter.metering.postgres.tx import rows_affected
from mailmeter.metering.records import InvoiceRecord, charge_key, payment_event
from mailmeter.policies.charges import Charge

_INVOICE_COLUMNS = (
    "id, account_id, period_key, period_end, issued_at, invoice_date, due_date, statement_date,"
    " total, amount_due, prepaid_applied, status, body"
)


class PgInvoices(PgBase):
    # -- charges, invoices, statements, notices ------------------------------------------

    async def charges_due_for_collection(self, now: datetime, limit: int = 100) -> list[asyncpg.Record]:
        return await self._fetch(
            "SELECT c.*, a.name AS account FROM charges c JOIN accounts a ON a.id = c.account_id"
            " WHERE c.status = 'pending' AND c.next_attempt_at <= $1 ORDER BY c.created_at LIMIT $2",
            now.isoformat(),
            limit,
        )

    async def charge(self, key: str) -> asyncpg.Record | None:
        return await self._fetchrow(
            "SELECT c.*, a.name AS account FROM charges c JOIN accounts a ON a.id = c.account_id"
            " WHERE c.idempotency_key = $1",
            key,
        )

    async def charges_of(self, account_id: int, period_key: str | None = None) -> list[asyncpg.Record]:
        if period_key is None:
            return await self._fetch("SELECT * FROM charges WHERE account_id = $1 ORDER BY created_at, seq", account_id)
        return await self._fetch(
            "SELECT * FROM charges WHERE account_id = $1 AND period_key = $2 ORDER BY created_at, seq",
            account_id,
            period_key,
        )

    async def set_charge_result(
        self, key: str, status: str, detail: str, attempts: int, next_attempt_at: datetime
    ) -> bool:
        """Record a gateway verdict. A failed charge blocks the account's sending at once.

        Only a charge still open (pending, submitted, or recorded for an external system to
        collect) changes: a late duplicate verdict is ignored.
        """

        async def body(conn: asyncpg.Connection) -> bool:
            owner = await conn.fetchval("SELECT account_id FROM charges WHERE idempotency_key = $1", key)
            if owner is None:
                return False
            await self._lock(conn, owner)
            changed = (
                rows_affected(
                    await conn.execute(
                        "UPDATE charges SET status = $1, detail = $2, attempts = $3, next_attempt_at = $4"
                        " WHERE idempotency_key = $5 AND status IN ('pending', 'submitted', 'recorded')",
                        status,
                        detail[:500],
                        attempts,
                        next_attempt_at.isoformat(),
                        key,
                    )
                )
                == 1
            )
            if changed and status == "failed":
                await conn.execute(
                    "UPDATE accounts SET payment_ok = 0, payment_detail = $1 WHERE id = $2",
                    f"charge {key} failed: {detail}"[:500],
                    owner,
                )
            if changed and status in ("failed", "succeeded"):
                ok = await conn.fetchval("SELECT payment_ok FROM accounts WHERE id = $1", owner)
                data = payment_event(bool(ok), detail, key, status)
                await add_event(conn, owner, "payment", data, datetime.now(timezone.utc))
            if changed and status == "succeeded":
                await conn.execute(
                    "UPDATE invoices SET status = 'paid' WHERE (account_id, period_key) ="
                    " (SELECT account_id, period_key FROM charges WHERE idempotency_key = $1 AND kind = 'invoice')",
                    key,
                )
                await _apply_payment(conn, key, next_attempt_at)
            return changed

        return await self._write(body)

    async def last_invoiced_periods(self) -> dict[int, str]:
        rows = await self._fetch("SELECT account_id, MAX(period_key) FROM invoices GROUP BY account_id")
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
        once, they queue on the account's lock, exactly one insert wins and only that
        one deducts and charges; the others insert nothing and return False.
        """

        async def body(conn: asyncpg.Connection) -> bool:
            await self._lock(conn, invoice.account_id)
            inserted = rows_affected(
                await conn.execute(
                    f"INSERT INTO invoices ({_INVOICE_COLUMNS})"
                    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) ON CONFLICT DO NOTHING",
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
                )
            )
            if inserted != 1:
                return False
            await conn.execute(
                "UPDATE accounts SET settled_through = $1 WHERE id = $2"
                " AND (settled_through IS NULL OR settled_through < $1)",
                invoice.period_key,
                invoice.account_id,
            )
            if prepaid_applied:
                await conn.execute(
                    "UPDATE accounts SET prepaid_balance = prepaid_balance - $1 WHERE id = $2",
                    prepaid_applied,
                    invoice.account_id,
                )
                await conn.execute(
                    "INSERT INTO balance_entries (account_id, amount, kind, reference, created_at)"
                    " VALUES ($1, $2, 'usage', $3, $4)",
                    invoice.account_id,
                    -prepaid_applied,
                    invoice.id,
                    now.isoformat(),
                )
            if collect is not None:
                account = await self._account_in_tx(conn, invoice.account_id)
                await self._insert_charges(conn, account, invoice.period_key, [collect], now)
            await conn.execute(
                "INSERT INTO notices (account_id, period_key, key, body, created_at)"
                " VALUES ($1, $2, 'invoice', $3, $4) ON CONFLICT DO NOTHING",
                invoice.account_id,
                invoice.period_key,
                notice_body,
                now.isoformat(),
            )
            return True

        return await self._write(body)

    async def add_monthly_credit(self, account_id: int, period_key: str, credit: Charge | None, now: datetime) -> bool:
        """Record a period's monthly credit once (see SqliteStore.add_monthly_credit).

        Under the account's lock: when several nodes record the same period's credit at
        once, one charge insert wins and only that transaction adds to the balance.
        """

        async def body(conn: asyncpg.Connection) -> bool:
            await self._lock(conn, account_id)
            account = await self._account_in_tx(conn, account_id)
            added = False
            if credit is not None:
                key = charge_key(account.name, period_key, credit.key)
                added = (
                    rows_affected(
                        await conn.execute(
                            "INSERT INTO charges (idempotency_key, account_id, period_key, kind, seq, amount,"
                            " emails_unlocked, description, created_at, next_attempt_at)"
                            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9)"
                            " ON CONFLICT (idempotency_key) DO NOTHING",
                            key,
                            account_id,
                            period_key,
                            credit.kind,
                            credit.index,
                            credit.amount,
                            credit.emails_unlocked,
                            credit.description,
                            now.isoformat(),
                        )
                    )
                    == 1
                )
                if added:
                    await conn.execute(
                        "WITH credited AS (UPDATE accounts SET prepaid_balance = prepaid_balance + $2 WHERE id = $1"
                        " RETURNING 1) INSERT INTO balance_entries (account_id, amount, kind, reference, created_at)"
                        " VALUES ($1, $2, 'monthly', $3, $4)",
                        account_id,
                        credit.amount,
                        key,
                        now.isoformat(),
                    )
            await conn.execute(
                "UPDATE accounts SET credited_through = $1 WHERE id = $2"
                " AND (credited_through IS NULL OR credited_through < $1)",
                period_key,
                account_id,
            )
            return added

        return await self._write(body)

    async def invoices(self, account_id: int | None = None) -> list[InvoiceRecord]:
        sql = f"SELECT {_INVOICE_COLUMNS} FROM invoices"
        rows = await (
            self._fetch(sql + " ORDER BY period_key, id")
            if account_id is None
            else self._fetch(sql + " WHERE account_id = $1 ORDER BY period_key", account_id)
        )
        return [InvoiceRecord(*tuple(row)) for row in rows]

    async def statements_due(self, today_by_invoice: Callable[[InvoiceRecord], bool]) -> list[InvoiceRecord]:
        rows = await self._fetch(f"SELECT {_INVOICE_COLUMNS} FROM invoices WHERE statement_sent = 0")
        return [r for r in (InvoiceRecord(*tuple(row)) for row in rows) if today_by_invoice(r)]

    async def mark_statement(self, invoice: InvoiceRecord, body: str, now: datetime) -> None:
        async def run(conn: asyncpg.Connection) -> None:
            await self._lock(conn, invoice.account_id)
            await conn.execute("UPDATE invoices SET statement_sent = 1 WHERE id = $1", invoice.id)
            await conn.execute(
                "INSERT INTO notices (account_id, period_key, key, body, created_at)"
                " VALUES ($1, $2, 'statement', $3, $4) ON CONFLICT DO NOTHING",
                invoice.account_id,
                invoice.period_key,
                body,
                now.isoformat(),
            )

        await self._write(run)

    async def pending_notices(self) -> list[asyncpg.Record]:
        return await self._fetch(
            "SELECT n.*, a.name AS account, a.contacts AS contacts FROM notices n"
            " JOIN accounts a ON a.id = n.account_id WHERE n.email_sent = 0 OR n.webhook_sent = 0"
            " ORDER BY n.created_at"
        )

    async def mark_notice(self, account_id: int, period_key: str, key: str, channel: str) -> None:
        column = {"email": "email_sent", "webhook": "webhook_sent"}[channel]

        async def body(conn: asyncpg.Connection) -> None:
            await conn.execute(
                f"UPDATE notices SET {column} = 1 WHERE account_id = $1 AND period_key = $2 AND key = $3",
                account_id,
                period_key,
                key,
            )

        await self._write(body)

    async def notices_of(self, account_id: int) -> list[asyncpg.Record]:
        return await self._fetch("SELECT * FROM notices WHERE account_id = $1 ORDER BY created_at, key", account_id)


async def _apply_payment(conn: asyncpg.Connection, key: str, now: datetime) -> None:
    """A succeeded payment's effect (see the SQLite store's _apply_payment), in the verdict's transaction."""
    payment = await conn.fetchrow(
        "SELECT account_id, kind, amount, created_at FROM charges WHERE idempotency_key = $1"
        " AND kind IN ('topup', 'repay')",
        key,
    )
    if payment is None:
        return
    if payment["kind"] == "topup":
        await conn.execute(
            "UPDATE accounts SET prepaid_balance = prepaid_balance + $1 WHERE id = $2",
            payment["amount"],
            payment["account_id"],
        )
    else:
        await conn.execute(
            "UPDATE invoices SET status = 'paid' WHERE account_id = $1 AND status = 'overdrawn' AND issued_at <= $2",
            payment["account_id"],
            payment["created_at"],
        )
    await conn.execute(
        "INSERT INTO balance_entries (account_id, amount, kind, reference, created_at) VALUES ($1, $2, $3, $4, $5)",
        payment["account_id"],
        payment["amount"],
        payment["kind"],
        key,
        now.isoformat(),
    )
