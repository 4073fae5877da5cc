"""The PostgreSQL store's part for the account holder's side (mirrors metering/sqlite/portal.py)."""

from __future__ import annotations

from datetime import datetime

import asyncpg

from mailmeter.metering.postgres.base import PgBase


class PgPortal(PgBase):
    async def usage_by_hour(self, account_id: int, period_key: str) -> list[tuple[str, int]]:
        """(UTC hour "YYYY-MM-DDTHH", accepted emails) of the period's committed messages, in order."""
        rows = await self._fetch(
            "SELECT substr(accepted_at, 1, 13) AS hour, SUM(recipients)::bigint FROM messages"
            " WHERE account_id = $1 AND period_key = $2 GROUP BY hour ORDER BY hour",
            account_id,
            period_key,
        )
        return [(str(row[0]), int(row[1])) for row in rows]

    async def add_payment(
        self, name: str, period_key: str, kind: str, amount: int, description: str, now: datetime
    ) -> asyncpg.Record | None:
        """A payment the account makes (topup, repay): see SqlitePortal.add_payment."""

        async def body(conn: asyncpg.Connection) -> asyncpg.Record | None:
            account_id = await self._lock_named(conn, name)
            if account_id is None:
                raise LookupError(f"no account named {name!r} (see `mailmeter account list`)")
            if kind == "repay" and await conn.fetchval(
                "SELECT 1 FROM charges WHERE account_id = $1 AND kind = 'repay'"
                " AND status IN ('pending', 'submitted', 'recorded')",
                account_id,
            ):
                return None
            last = await conn.fetchval(
                "SELECT COALESCE(MAX(seq), 0) FROM charges WHERE account_id = $1 AND period_key = $2 AND kind = $3",
                account_id,
                period_key,
                kind,
            )
            seq = int(last) + 1
            key = f"{name}/{period_key}/{kind}/{seq}"
            await conn.execute(
                "INSERT INTO charges (idempotency_key, account_id, period_key, kind, seq, amount,"
                " emails_unlocked, description, created_at, next_attempt_at)"
                " VALUES ($1, $2, $3, $4, $5, $6, NULL, $7, $8, $9)",
                key,
                account_id,
                period_key,
                kind,
                seq,
                amount,
                description,
                now.isoformat(),
                now.isoformat(),
            )
            return await conn.fetchrow(
                "SELECT c.*, a.name AS account FROM charges c JOIN accounts a ON a.id = c.account_id"
                " WHERE c.idempotency_key = $1",
                key,
            )

        return await self._write(body)
