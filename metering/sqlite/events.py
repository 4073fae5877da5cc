"""The SQLite store's events and suppression: an account's webhook, the outbox of events and
its delivery log, the suppression list, and the account's own API token (its SHA-256).

An event goes into the outbox in the transaction of what it tells of (a result, a usage
notice, a payment change: add_event_sync), and only for an account whose webhook takes
its kind, so an account without a webhook costs one primary-key look-up per result.
"""

from __future__ import annotations

import sqlite3
from datetime import datetime

from mailmeter.metering.records import (
    DueEvent,
    EventAttempt,
    EventRecord,
    Suppression,
    Webhook,
)
from mailmeter.metering.sqlite.connection import SqliteConnection

ADD_EVENT = (
    "INSERT INTO events (account_id, kind, data, created_at, next_attempt_at)"
    " SELECT ?, ?, ?, ?, ? FROM webhooks WHERE account_id = ? AND instr(',' || events || ',', ?) > 0"
)


def add_event_params(account_id: int, kind: str, data: str, now: datetime) -> tuple[object, ...]:
    stamp = now.isoformat()
    return (account_id, kind, data, stamp, stamp, account_id, f",{kind},")


def add_event_sync(conn: sqlite3.Connection, account_id: int, kind: str, data: str, now: datetime) -> None:
    """Put an event in the outbox if the account's webhook takes its kind (in the caller's transaction)."""
    conn.execute(ADD_EVENT, add_event_params(account_id, kind, data, now))


def add_suppression_sync(
    conn: sqlite3.Connection, account_id: int, address: str, reason: str, detail: str, queue_id: str, now: datetime
) -> None:
    conn.execute(
        "INSERT OR IGNORE INTO suppressions (account_id, address, reason, detail, queue_id, created_at)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (account_id, address.lower(), reason, detail[:500], queue_id, now.isoformat()),
    )


def _suppression(row: sqlite3.Row) -> Suppression:
    return Suppression(row["address"], row["reason"], row["detail"], row["queue_id"], row["created_at"])


def suppression_sync(conn: sqlite3.Connection, account_id: int, address: str) -> Suppression | None:
    row = conn.execute(
        "SELECT address, reason, detail, queue_id, created_at FROM suppressions WHERE account_id = ? AND address = ?",
        (account_id, address.lower()),
    ).fetchone()
    return None if row is None else Suppression(*row)


class SqliteEvents(SqliteConnection):
    # -- webhooks -----------------------------------------------------------------------

    async def set_webhook(self, name: str, url: str, secret: str, events: tuple[str, ...], now: datetime) -> bool:
        """Set (or replace) the account's webhook; False if there is no such account."""
        async with self._tx() as db:
            cursor = await db.execute("SELECT id FROM accounts WHERE name = ?", (name,))
            row = await cursor.fetchone()
            if row is None:
                return False
            await db.execute(
                "INSERT INTO webhooks (account_id, url, secret, events, created_at) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (account_id) DO UPDATE SET url = excluded.url, secret = excluded.secret,"
                " events = excluded.events, created_at = excluded.created_at",
                (row["id"], url, secret, ",".join(events), now.isoformat()),
            )
            return True

    async def remove_webhook(self, name: str) -> bool:
        """Remove the account's webhook (its pending events stop); False if it had none."""
        async with self._tx() as db:
            cursor = await db.execute(
                "DELETE FROM webhooks WHERE account_id = (SELECT id FROM accounts WHERE name = ?)", (name,)
            )
            return cursor.rowcount == 1

    async def webhook_of(self, account_id: int) -> Webhook | None:
        rows = await self._read("SELECT * FROM webhooks WHERE account_id = ?", (account_id,))
        if not rows:
            return None
        row = rows[0]
        return Webhook(row["url"], row["secret"], tuple(row["events"].split(",")), row["created_at"])

    # -- the outbox and its delivery log ------------------------------------------------

    async def claim_due_events(self, now: datetime, lease_until: datetime, limit: int = 50) -> list[DueEvent]:
        """Pending events due by `now` whose account has a webhook, each put off until
        `lease_until` (so no other worker sends it meanwhile), oldest first."""

        def operation(conn: sqlite3.Connection) -> list[DueEvent]:
            rows = conn.execute(
                "SELECT e.id, a.name, e.kind, e.data, e.created_at, e.attempts, w.url, w.secret FROM events e"
                " JOIN webhooks w ON w.account_id = e.account_id JOIN accounts a ON a.id = e.account_id"
                " WHERE e.status = 'pending' AND e.next_attempt_at <= ? ORDER BY e.next_attempt_at, e.id LIMIT ?",
                (now.isoformat(), limit),
            ).fetchall()
            conn.executemany(
                "UPDATE events SET next_attempt_at = ? WHERE id = ?", [(lease_until.isoformat(), r[0]) for r in rows]
            )
            return [DueEvent(int(r[0]), r[1], r[2], r[3], r[4], int(r[5]), r[6], r[7]) for r in rows]

        return await self._run(operation)

    async def record_event_attempt(
        self,
        event_id: int,
        at: datetime,
        status_code: int | None,
        error: str,
        status: str,
        next_attempt_at: datetime,
    ) -> int:
        """Log one delivery attempt and the event's new status; returns the attempt's number."""

        def operation(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT attempts FROM events WHERE id = ?", (event_id,)).fetchone()
            attempt = int(row[0]) + 1 if row is not None else 1
            conn.execute(
                "UPDATE events SET attempts = ?, status = ?, next_attempt_at = ? WHERE id = ?",
                (attempt, status, next_attempt_at.isoformat(), event_id),
            )
            conn.execute(
                "INSERT OR REPLACE INTO event_attempts (event_id, attempt, at, status_code, error)"
                " VALUES (?, ?, ?, ?, ?)",
                (event_id, attempt, at.isoformat(), status_code, error[:500]),
            )
            return attempt

        return await self._run(operation)

    async def prune_events(self, before: datetime) -> int:
        """Forget the delivered and failed events created before `before`, with their logs."""

        def operation(conn: sqlite3.Connection) -> int:
            old = "SELECT id FROM events WHERE status != 'pending' AND created_at < ?"
            conn.execute(f"DELETE FROM event_attempts WHERE event_id IN ({old})", (before.isoformat(),))
            return conn.execute(f"DELETE FROM events WHERE id IN ({old})", (before.isoformat(),)).rowcount

        return await self._run(operation)

    async def events_of(self, account_id: int, limit: int = 100) -> list[EventRecord]:
        """The account's latest events, newest first, each with its delivery log."""

        def operation(conn: sqlite3.Connection) -> list[EventRecord]:
            rows = conn.execute(
                "SELECT e.*, a.name AS account FROM events e JOIN accounts a ON a.id = e.account_id"
                " WHERE e.account_id = ? ORDER BY e.id DESC LIMIT ?",
                (account_id, limit),
            ).fetchall()
            attempts: dict[int, list[EventAttempt]] = {}
            if rows:
                marks = ",".join("?" * len(rows))
                for a in conn.execute(
                    f"SELECT * FROM event_attempts WHERE event_id IN ({marks}) ORDER BY event_id, attempt",
                    [r["id"] for r in rows],
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

        return await self._run(operation, write=False)

    # -- the suppression list -----------------------------------------------------------

    async def suppression(self, account_id: int, address: str) -> Suppression | None:
        rows = await self._read(
            "SELECT * FROM suppressions WHERE account_id = ? AND address = ?", (account_id, address.lower())
        )
        return _suppression(rows[0]) if rows else None

    async def suppressions(self, account_id: int) -> list[Suppression]:
        rows = await self._read("SELECT * FROM suppressions WHERE account_id = ? ORDER BY address", (account_id,))
        return [_suppression(row) for row in rows]

    async def remove_suppression(self, name: str, address: str) -> bool:
        """Take an address off the account's list (in an audited transaction); False if it was not on it."""
        async with self._tx() as db:
            cursor = await db.execute(
                "DELETE FROM suppressions WHERE account_id = (SELECT id FROM accounts WHERE name = ?) AND address = ?",
                (name, address.lower()),
            )
            return cursor.rowcount == 1

    # -- the account's own API token ----------------------------------------------------

    async def set_account_token(self, name: str, token_hash: str, now: datetime) -> bool:
        """Replace the account's token by one with this SHA-256; False if there is no such account."""
        async with self._tx() as db:
            cursor = await db.execute("SELECT id FROM accounts WHERE name = ?", (name,))
            row = await cursor.fetchone()
            if row is None:
                return False
            await db.execute(
                "INSERT INTO account_tokens (account_id, token_hash, created_at) VALUES (?, ?, ?)"
                " ON CONFLICT (account_id) DO UPDATE SET token_hash = excluded.token_hash,"
                " created_at = excluded.created_at",
                (row["id"], token_hash, now.isoformat()),
            )
            return True

    async def account_id_for_token(self, token_hash: str) -> int | None:
        """The id of the account whose token has this SHA-256, or None."""
        rows = await self._read("SELECT account_id FROM account_tokens WHERE token_hash = ?", (token_hash,))
        return int(rows[0][0]) if rows else None


__all__ = ["SqliteEvents", "add_event_sync", "add_suppression_sync", "suppression_sync"]
