"""The SQLite store's part for the account holder's side (mailmeter/portal/): the usage chart's
hourly sums, and the payments an account makes itself (a top-up, a repay)."""

from __future__ import annotations

from datetime import datetime

from mailmeter.metering.records import Row
from mailmeter.metering.sqlite.connection import SqliteConnection


class SqlitePortal(SqliteConnection):
    async def usage_by_hour(self, account_id: int, period_key: str) -> list[tuple[str, int]]:
        """(UTC hour "YYYY-MM-DDTHH", accepted emails) of the period's committed messages, in order."""
        rows = await self._read(
            "SELECT substr(accepted_at, 1, 13) AS hour, SUM(recipients) FROM messages"
            " WHERE account_id = ? AND period_key = ? GROUP BY hour ORDER BY hour",
            (account_id, period_key),
        )
        return [(str(row[0]), int(row[1])) for row in rows]

    async def add_payment(
        self, name: str, period_key: str, kind: str, amount: int, description: str, now: datetime
    ) -> Row | None:
        """A payment the account makes (kind `topup` or `repay`): a charge for the gateway to
        collect, numbered within the period. Its effect (the balance credited, the overdrawn
        invoices paid) comes when it succeeds (set_charge_result). None: an open repay exists."""
        async with self._tx() as db:
            cursor = await db.execute("SELECT id FROM accounts WHERE name = ?", (name,))
            account = await cursor.fetchone()
            if account is None:
                raise LookupError(f"no account named {name!r} (see `mailmeter account list`)")
            if kind == "repay":
                cursor = await db.execute(
                    "SELECT 1 FROM charges WHERE account_id = ? AND kind = 'repay'"
                    " AND status IN ('pending', 'submitted', 'recorded')",
                    (account["id"],),
                )
                if await cursor.fetchone() is not None:
                    return None
            cursor = await db.execute(
                "SELECT COALESCE(MAX(seq), 0) FROM charges WHERE account_id = ? AND period_key = ? AND kind = ?",
                (account["id"], period_key, kind),
            )
            last = await cursor.fetchone()
            seq = int(last[0]) + 1 if last else 1
            key = f"{name}/{period_key}/{kind}/{seq}"
            await db.execute(
                "INSERT INTO charges (idempotency_key, account_id, period_key, kind, seq, amount,"
                " emails_unlocked, description, created_at, next_attempt_at) VALUES (?, ?, ?, ?, ?, ?, NULL, ?, ?, ?)",
                (key, account["id"], period_key, kind, seq, amount, description, now.isoformat(), now.isoformat()),
            )
            cursor = await db.execute(
                "SELECT c.*, a.name AS account FROM charges c JOIN accounts a ON a.id = c.account_id"
                " WHERE c.idempotency_key = ?",
                (key,),
            )
            row = await cursor.fetchone()
            assert row is not None
            return row
