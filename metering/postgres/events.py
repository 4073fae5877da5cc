"""The PostgreSQL store's events and suppression, as metering/sqlite/events.py: webhooks, the outbox
and its delivery log, the suppression list, and the account's own API token (its SHA-256).

Due events are claimed with FOR UPDATE SKIP LOCKED, so the nodes' senders never take the
same event at once."""

from __future__ import annotations

from datetime import datetime

import asyncpg

from mailmeter.metering.postgres.base import PgBase
from mailmeter.metering.records import DueEvent, EventAttempt, EventRecord, Suppression, Webhook

# Parameters: account id, kind, data, time, ",kind,".
ADD_EVENT = (
    "INSERT INTO events (account_id, kind, data, created_at, next_attempt_at)"
    " SELECT $1, $2, $3, $4, $4 FROM webhooks WHERE account_id = $1 AND position($5 in ',' || events || ',') > 0"
)


async def add_event(conn: asyncpg.Connection, account_id: int, kind: str, data: str, now: datetime) -> None:
    """Put an event in the outbox if the account's webhook takes its kind (in the caller's transaction)."""
    await conn.execute(ADD_EVENT, account_id, kind, data, now.isoformat(), f",{kind},")


async def add_suppression(
    conn: asyncpg.Connection, account_id: int, address: str, reason: str, detail: str, queue_id: str, now: datetime
) -> None:
    await conn.execute(
        "INSERT INTO suppressions (account_id, address, reason, detail, queue_id, created_at)"
        " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
        account_id,
        address.lower(),
        reason,
        detail[:500],
        queue_id,
        now.isoformat(),
    )


def _suppression(row: asyncpg.Record) -> Suppression:
    return Suppression(row["address"], row["reason"], row["detail"], row["queue_id"], row["created_at"])


class PgEvents(PgBase):
    # -- webhooks -----------------------------------------------------------------------

    async def set_webhook(self, name: str, url: str, secret: str, events: tuple[str, ...], now: datetime) -> bool:
        async def body(conn: asyncpg.Connection) -> bool:
            account_id = await self._lock_named(conn, name)
            if account_id is None:
                return False
            await conn.execute(
                "INSERT INTO webhooks (account_id, url, secret, events, created_at) VALUES ($1, $2, $3, $4, $5)"
                " ON CONFLICT (account_id) DO UPDATE SET url = excluded.url, secret = excluded.secret,"
                " events = excluded.events, created_at = excluded.created_at",
                account_id,
                url,
                secret,
                ",".join(events),
                now.isoformat(),
            )
            return True

        return await self._write(body)

    async def remove_webhook(self, name: str) -> bool:
        async def body(conn: asyncpg.Connection) -> bool:
            account_id = await self._lock_named(conn, name)
            if account_id is None:
                return False
            return await conn.fetchval("DELETE FROM webhooks WHERE account_id = $1 RETURNING 1", account_id) is not None

        return await self._write(body)

    async def webhook_of(self, account_id: int) -> Webhook | None:
        row = await self._fetchrow("SELECT * FROM webhooks WHERE account_id = $1", account_id)
        if row is None:
            return None
        return Webhook(row["url"], row["secret"], tuple(row["events"].split(",")), row["created_at"])

    # -- the outbox and its delivery log ------------------------------------------------

    async def claim_due_events(self, now: datetime, lease_until: datetime, limit: int = 50) -> list[DueEvent]:
        async def body(conn: asyncpg.Connection) -> list[DueEvent]:
            rows = await conn.fetch(
                "WITH due AS (SELECT e.id FROM events e JOIN webhooks w ON w.account_id = e.account_id"
                " WHERE e.status = 'pending' AND e.next_attempt_at <= $1"
                " ORDER BY e.next_attempt_at, e.id LIMIT $3 FOR UPDATE OF e SKIP LOCKED)"
                " UPDATE events e SET next_attempt_at = $2 FROM due, webhooks w, accounts a"
                " WHERE e.id = due.id AND w.account_id = e.account_id AND a.id = e.account_id"
                " RETURNING e.id, a.name, e.kind, e.data, e.created_at, e.attempts, w.url, w.secret",
                now.isoformat(),
                lease_until.isoformat(),
                limit,
            )
            found = [DueEvent(int(r[0]), r[1], r[2], r[3], r[4], int(r[5]), r[6], r[7]) for r in rows]
            return sorted(found, key=lambda event: event.id)

        return await self._write(body)

    async def record_event_attempt(
        self,
        event_id: int,
        at: datetime,
        status_code: int | None,
        error: str,
        status: str,
        next_attempt_at: datetime,
    ) -> int:
        async def body(conn: asyncpg.Connection) -> int:
            attempt = await conn.fetchval(
                "UPDATE events SET attempts = attempts + 1, status = $2, next_attempt_at = $3 WHERE id = $1"
                " RETURNING attempts",
                event_id,
                status,
                next_attempt_at.isoformat(),
            )
            attempt = int(attempt) if attempt is not None else 1
            await conn.execute(
                "INSERT INTO event_attempts (event_id, attempt, at, status_code, error) VALUES ($1, $2, $3, $4, $5)"
                " ON CONFLICT (event_id, attempt) DO UPDATE SET at = excluded.at,"
                " status_code = excluded.status_code, error = excluded.error",
                event_id,
                attempt,
                at.isoformat(),
                status_code,
                error[:500],
            )
            return attempt

        return await self._write(body)

    async def prune_events(self, before: datetime) -> int:
        async def body(conn: asyncpg.Connection) -> int:
            old = await conn.fetch(
                "SELECT id FROM events WHERE status <> 'pending' AND created_at < $1 FOR UPDATE SKIP LOCKED",
                before.isoformat(),
            )
            ids = [int(row["id"]) for row in old]
            if ids:
                await conn.execute("DELETE FROM event_attempts WHERE event_id = ANY($1::bigint[])", ids)
                await conn.execute("DELETE FROM events WHERE id = ANY($1::bigint[])", ids)
            return len(ids)

        return await self._write(body)

    async def events_of(self, account_id: int, limit: int = 100) -> list[EventRecord]:
        rows = await self._fetch(
            "SELECT e.*, a.name AS account FROM events e JOIN accounts a ON a.id = e.account_id"
            " WHERE e.account_id = $1 ORDER BY e.id DESC LIMIT $2",
            account_id,
            limit,
        )
        attempts: dict[int, list[EventAttempt]] = {}
        if rows:
            for a in await self._fetch(
                "SELECT * FROM event_attempts WHERE event_id = ANY($1::bigint[]) ORDER BY event_id, attempt",
                [int(r["id"]) for r in rows],
            ):
                attempts.setdefault(int(a["event_id"]), []).append(
                    EventAttempt(int(a["attempt"]), a["at"], a["status_code"], a["error"])
                )
        return [
            EventRecord(
                int(r["id"]),
                r["account"],
                r["kind"],
                r["data"],
                r["created_at"],
                r["status"],
                r["next_attempt_at"],
                tuple(attempts.get(int(r["id"]), [])),
            )
            for r in rows
        ]

    # -- the suppression list -----------------------------------------------------------

    async def suppression(self, account_id: int, address: str) -> Suppression | None:
        row = await self._fetchrow(
            "SELECT * FROM suppressions WHERE account_id = $1 AND address = $2", account_id, address.lower()
        )
        return None if row is None else _suppression(row)

    async def suppressions(self, account_id: int) -> list[Suppression]:
        rows = await self._fetch("SELECT * FROM suppressions WHERE account_id = $1 ORDER BY address", account_id)
        return [_suppression(row) for row in rows]

    async def remove_suppression(self, name: str, address: str) -> bool:
        async def body(conn: asyncpg.Connection) -> bool:
            account_id = await self._lock_named(conn, name)
            if account_id is None:
                return False
            removed = await conn.fetchval(
                "DELETE FROM suppressions WHERE account_id = $1 AND address = $2 RETURNING 1",
                account_id,
                address.lower(),
            )
            return removed is not None

        return await self._write(body)

    # -- the account's own API token ----------------------------------------------------

    async def set_account_token(self, name: str, token_hash: str, now: datetime) -> bool:
        async def body(conn: asyncpg.Connection) -> bool:
            account_id = await self._lock_named(conn, name)
            if account_id is None:
                return False
            await conn.execute(
                "INSERT INTO account_tokens (account_id, token_hash, created_at) VALUES ($1, $2, $3)"
                " ON CONFLICT (account_id) DO UPDATE SET token_hash = excluded.token_hash,"
                " created_at = excluded.created_at",
                account_id,
                token_hash,
                now.isoformat(),
            )
            return True

        return await self._write(body)

    async def account_id_for_token(self, token_hash: str) -> int | None:
        row = await self._fetchrow("SELECT account_id FROM account_tokens WHERE token_hash = $1", token_hash)
        return None if row is None else int(row["account_id"])


__all__ = ["PgEvents", "add_event", "add_suppression"]
