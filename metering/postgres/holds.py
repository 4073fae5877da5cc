"""Steps of the PostgreSQL store that run inside a transaction holding the account's lock.

Shared by the per-session path (metering/postgres/ledger.py) and the lease path
(metering/postgres/leases.py), so both read the counters, add to a hold, give a hold back
and settle charges with the very same statements.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

import asyncpg

from mailmeter.metering.postgres.base import OPEN_PERIODS, PgBase
from mailmeter.metering.postgres.events import add_event
from mailmeter.metering.records import Account, Settlement, account_core, history_from_json, history_to_json
from mailmeter.policies.decision import Usage
from mailmeter.policies.history import History


class PgHolds(PgBase):
    @staticmethod
    async def _account_and_usage(conn: asyncpg.Connection, account_id: int, period_key: str) -> tuple[Account, Usage]:
        """The account (as ACCOUNT_SELECT reads it) and its counters for the period, in one statement."""
        row = await conn.fetchrow(
            "SELECT a.*, (SELECT COALESCE(SUM(i.amount_due), 0)::bigint FROM invoices i"
            f" WHERE i.account_id = a.id AND i.status = 'overdrawn') AS debt, {OPEN_PERIODS},"
            " u.accepted AS usage_accepted,"
            " u.reserved AS usage_reserved, u.delivered AS usage_delivered, u.soft_bounced AS usage_soft_bounced,"
            " u.hard_bounced AS usage_hard_bounced, u.history AS usage_history"
            " FROM accounts a LEFT JOIN period_usage u ON u.account_id = a.id AND u.period_key = $2"
            " WHERE a.id = $1",
            account_id,
            period_key,
        )
        if row is None:
            raise LookupError(f"account id {account_id} is gone")
        account = account_core(row)
        if row["usage_accepted"] is None:
            return account, Usage(awaiting_results=account.awaiting_results)
        return account, Usage(
            accepted=row["usage_accepted"],
            reserved=row["usage_reserved"],
            delivered=row["usage_delivered"],
            soft_bounced=row["usage_soft_bounced"],
            hard_bounced=row["usage_hard_bounced"],
            awaiting_results=account.awaiting_results,
            history=history_from_json(row["usage_history"]),
        )

    @staticmethod
    async def _store_history(conn: asyncpg.Connection, account_id: int, period_key: str, history: History) -> None:
        """Keep the period's history with its counters (the caller holds the account's lock)."""
        await conn.execute(
            "INSERT INTO period_usage (account_id, period_key, history) VALUES ($1, $2, $3)"
            " ON CONFLICT (account_id, period_key) DO UPDATE SET history = excluded.history",
            account_id,
            period_key,
            history_to_json(history),
        )

    @staticmethod
    async def _release(conn: asyncpg.Connection, hold_id: str) -> int:
        """Delete the hold (the caller holds its account's lock) and give its emails back."""
        row = await conn.fetchrow("DELETE FROM holds WHERE id = $1 RETURNING account_id, period_key, emails", hold_id)
        if row is None:
            return 0
        await conn.execute(
            "UPDATE period_usage SET reserved = reserved - $1 WHERE account_id = $2 AND period_key = $3",
            row["emails"],
            row["account_id"],
            row["period_key"],
        )
        return int(row["emails"])

    @staticmethod
    async def _add_to_hold(
        conn: asyncpg.Connection, account_id: int, period_key: str, hold_id: str, node: str, emails: int, stamp: str
    ) -> None:
        """Reserve `emails` more for the period and add them to the hold (created if new), in one statement."""
        await conn.execute(
            "WITH counted AS (INSERT INTO period_usage (account_id, period_key, reserved)"
            " VALUES ($1, $2, $3) ON CONFLICT (account_id, period_key) DO UPDATE"
            " SET reserved = period_usage.reserved + excluded.reserved RETURNING 1)"
            " INSERT INTO holds (id, account_id, period_key, emails, node, created_at)"
            " VALUES ($4, $1, $2, $3, $5, $6)"
            " ON CONFLICT (id) DO UPDATE SET emails = holds.emails + excluded.emails, created_at = excluded.created_at",
            account_id,
            period_key,
            emails,
            hold_id,
            node,
            stamp,
        )

    async def _settle(
        self,
        conn: asyncpg.Connection,
        account_id: int,
        period_key: str,
        settle: Callable[[Account, Usage, int, str], Settlement],
        now: datetime,
    ) -> None:
        """After usage grew: insert the charges and notices `settle` finds due on the new counters."""
        account, usage = await self._account_and_usage(conn, account_id, period_key)
        last_seq = int(
            await conn.fetchval(
                "SELECT COALESCE(MAX(seq), 0) FROM charges WHERE account_id = $1 AND period_key = $2"
                " AND kind NOT IN ('invoice', 'monthly', 'topup', 'repay')",
                account_id,
                period_key,
            )
        )
        settlement = settle(account, usage, last_seq, period_key)
        await self._insert_charges(conn, account, period_key, settlement.charges, now)
        for key, text in settlement.notices:
            added = await conn.fetchval(
                "INSERT INTO notices (account_id, period_key, key, body, created_at)"
                " VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING RETURNING 1",
                account_id,
                period_key,
                key,
                text,
                now.isoformat(),
            )
            if added is not None and '"usage_alert"' in text:
                await add_event(conn, account_id, "usage_alert", text, now)


__all__ = ["PgHolds"]
