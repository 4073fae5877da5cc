"""The SQLite store's ledger: holds (reserve, release), commits and per-recipient results, and the
usage counters and breakdowns they keep."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime

from mailmeter.metering.records import (
    Account,
    HoldAccountMismatch,
    RateFor,
    RecipientSuppressed,
    Result,
    Settlement,
    UnknownHold,
    result_event,
)
from mailmeter.metering.sqlite.accounts import account_row, usage_row
from mailmeter.metering.sqlite.connection import SqliteConnection
from mailmeter.metering.sqlite.events import add_event_sync, add_suppression_sync, suppression_sync
from mailmeter.metering.sqlite.invoices import insert_charge_sync
from mailmeter.policies.decision import Admission, Refusal, Usage
from mailmeter.policies.rate import admit_rate
from mailmeter.policies.results import suppresses

_COUNTER_FOR_RESULT = {
    Result.DELIVERED: "delivered",
    Result.SOFT_BOUNCED: "soft_bounced",
    Result.HARD_BOUNCED: "hard_bounced",
}


class SqliteLedger(SqliteConnection):
    # -- holds, commits, results -------------------------------------------

    async def reserve(
        self,
        account_id: int,
        period_key: str,
        hold_id: str,
        node: str,
        requested: int,
        now: datetime,
        decide: Callable[[Account, Usage], Admission],
        rate: RateFor | None = None,
        recipient: str | None = None,
        suppress_for: Callable[[Account], bool] | None = None,
    ) -> Admission:
        """Atomically: read the account and the period's counters, ask `decide`, add the grant.

        `rate`: the account's sending rate, counted in the same transaction (a grant never
        takes a window past its limit; RATE_LIMITED with the seconds to its next window).

        `recipient` on the account's suppression list, when `suppress_for(account)` (its plan
        suppresses): RecipientSuppressed, nothing held (in the same transaction: no extra
        round trip per RCPT).

        A hold that exists already stays in its account (HoldAccountMismatch for another)
        and its period: a transaction that straddles a period boundary is counted in the
        period it began in, as its commit is.
        """

        def operation(conn: sqlite3.Connection) -> Admission:
            period = period_key
            held = conn.execute("SELECT account_id, period_key FROM holds WHERE id = ?", (hold_id,)).fetchone()
            if held is not None:
                if held[0] != account_id:
                    raise HoldAccountMismatch(hold_id, held[0], account_id)
                period = held[1]
            account = account_row(conn, account_id)
            if recipient is not None and suppress_for is not None and suppress_for(account):
                entry = suppression_sync(conn, account_id, recipient)
                if entry is not None:
                    raise RecipientSuppressed(entry)
            usage = usage_row(conn, account_id, period, account.awaiting_results)
            admission = decide(account, usage)
            if rate is not None and admission.granted > 0:
                admission = _apply_rate_sync(conn, account, admission, rate, now)
            if admission.granted > 0:
                conn.execute(
                    "INSERT INTO period_usage (account_id, period_key, reserved) VALUES (?, ?, ?)"
                    " ON CONFLICT (account_id, period_key) DO UPDATE"
                    " SET reserved = reserved + excluded.reserved",
                    (account_id, period, admission.granted),
                )
                conn.execute(
                    "INSERT INTO holds (id, account_id, period_key, emails, node, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (id) DO UPDATE SET emails = emails + excluded.emails",
                    (hold_id, account_id, period, admission.granted, node, now.isoformat()),
                )
            return admission

        return await self._run(operation, durable=False)

    async def commit(
        self,
        hold_id: str,
        queue_id: str,
        emails: int,
        node: str,
        now: datetime,
        campaign: str = "",
        region: str = "",
        settle: Callable[[Account, Usage, int, str], Settlement] | None = None,
        account_id: int | None = None,
        spooled: bytes | None = None,
    ) -> None:
        """The commit point of a message: its usage, its queue id, and the charges and
        notices that usage makes due, in one transaction.

        `spooled`: the message itself (the inline spool, spool.inline): kept in the same
        transaction, for `node`'s delivery, so one fsync makes both durable.

        Idempotent on queue_id. Emails held beyond `emails` go back to the account.
        Charges go in under their idempotency key, so none is ever issued twice.
        `account_id`: the account the caller commits for; a hold of another account is
        refused (HoldAccountMismatch) and nothing changes.
        """
        expected_account = account_id

        def operation(conn: sqlite3.Connection) -> None:
            cursor = conn.execute("SELECT 1 FROM messages WHERE queue_id = ?", (queue_id,))
            if cursor.fetchone():
                return
            cursor = conn.execute("SELECT account_id, period_key, emails FROM holds WHERE id = ?", (hold_id,))
            row = cursor.fetchone()
            if row is None:
                raise UnknownHold(hold_id)
            if expected_account is not None and row[0] != expected_account:
                raise HoldAccountMismatch(hold_id, row[0], expected_account)
            account_id, period_key, held = row
            if emails > held:
                raise ValueError(f"commit of {emails} emails exceeds the {held} held")
            conn.execute(
                "UPDATE period_usage SET reserved = reserved - ?, accepted = accepted + ?"
                " WHERE account_id = ? AND period_key = ?",
                (held, emails, account_id, period_key),
            )
            conn.execute("DELETE FROM holds WHERE id = ?", (hold_id,))
            conn.execute(
                "INSERT INTO messages (queue_id, account_id, period_key, recipients, node, accepted_at, region)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (queue_id, account_id, period_key, emails, node, now.isoformat(), region),
            )
            conn.execute(
                "UPDATE accounts SET awaiting_results = awaiting_results + ? WHERE id = ?", (emails, account_id)
            )
            if spooled is not None:
                conn.execute(
                    "INSERT INTO spooled_messages (queue_id, node, data) VALUES (?, ?, ?)", (queue_id, node, spooled)
                )
            conn.execute(
                "INSERT INTO usage_breakdown (account_id, period_key, campaign, region, accepted)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (account_id, period_key, campaign, region)"
                " DO UPDATE SET accepted = accepted + excluded.accepted",
                (account_id, period_key, campaign, region, emails),
            )
            if settle is not None:
                account = account_row(conn, account_id)
                usage = usage_row(conn, account_id, period_key, account.awaiting_results)
                cursor = conn.execute(
                    "SELECT COALESCE(MAX(seq), 0) FROM charges WHERE account_id = ? AND period_key = ?"
                    " AND kind NOT IN ('invoice', 'monthly', 'topup', 'repay')",
                    (account_id, period_key),
                )
                last_seq = int((cursor.fetchone())[0])
                settlement = settle(account, usage, last_seq, period_key)
                for charge in settlement.charges:
                    insert_charge_sync(conn, account, period_key, charge, now)
                for key, body in settlement.notices:
                    cursor = conn.execute(
                        "INSERT OR IGNORE INTO notices (account_id, period_key, key, body, created_at)"
                        " VALUES (?, ?, ?, ?, ?)",
                        (account_id, period_key, key, body, now.isoformat()),
                    )
                    if cursor.rowcount == 1 and '"usage_alert"' in body:
                        add_event_sync(conn, account_id, "usage_alert", body, now)

        await self._run(operation)

    async def release(self, hold_id: str) -> int:
        """Return a hold's emails to the account; returns how many (0 if already gone)."""
        return await self._run(lambda conn: _release_sync(conn, hold_id), durable=False)

    async def release_node_holds(self, node: str) -> int:
        """Release every hold a node left behind (it restarted: its sessions are gone)."""

        def operation(conn: sqlite3.Connection) -> int:
            holds = [row[0] for row in conn.execute("SELECT id FROM holds WHERE node = ?", (node,))]
            return sum(_release_sync(conn, hold_id) for hold_id in holds)

        return await self._run(operation)

    async def message_committed(self, queue_id: str) -> bool:
        rows = await self._read("SELECT 1 FROM messages WHERE queue_id = ?", (queue_id,))
        return bool(rows)

    async def spooled_ids(self, node: str) -> list[str]:
        """The inline-spooled messages `node`'s delivery owns, oldest queue id first."""
        rows = await self._read("SELECT queue_id FROM spooled_messages WHERE node = ? ORDER BY queue_id", (node,))
        return [row[0] for row in rows]

    async def read_spooled(self, queue_id: str) -> bytes | None:
        rows = await self._read("SELECT data FROM spooled_messages WHERE queue_id = ?", (queue_id,))
        return bytes(rows[0][0]) if rows else None

    async def drop_spooled(self, queue_id: str) -> None:
        """Forget a delivered message. Not waiting for the disk (as the file spool's unlink):
        a delete lost in a power failure only delivers it again, its results counted once."""

        def operation(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM spooled_messages WHERE queue_id = ?", (queue_id,))

        await self._run(operation, durable=False)

    async def message_account(self, queue_id: str) -> int | None:
        rows = await self._read("SELECT account_id FROM messages WHERE queue_id = ?", (queue_id,))
        return rows[0][0] if rows else None

    async def record_result(
        self,
        queue_id: str,
        recipient: str,
        result: Result,
        detail: str,
        account_id: int,
        period_key: str,
        now: datetime,
        reason: str = "",
        suppress: bool = False,
    ) -> bool:
        """Record a recipient's result (its billing category) and sub-type; a final result
        is counted exactly once. Its event goes into the outbox (if the account's webhook
        takes it) and, with `suppress`, an Invalid Email recipient onto the suppression list.

        Returns False when the recipient already had a final result (a retry after a
        crash reported it again), so nothing is counted twice.
        """
        return await self._run(
            lambda conn: _record_result_sync(
                conn, queue_id, recipient, result, detail, account_id, period_key, now, reason, suppress
            )
        )

    async def usage(self, account_id: int, period_key: str, awaiting_results: int | None = None) -> Usage:
        return await self._run(lambda conn: usage_row(conn, account_id, period_key, awaiting_results), write=False)

    async def record_message_result(
        self,
        queue_id: str,
        recipient: str,
        result: Result,
        detail: str,
        now: datetime,
        period_key_for: Callable[[Account], str],
        reason: str = "",
        suppress_for: Callable[[Account], bool] | None = None,
    ) -> bool | None:
        """record_result for a queue id, finding its account in the same transaction;
        `suppress_for(account)`: whether its plan suppresses (record_result's `suppress`).

        None: not a metered message (a bounce or notice the relay made itself).
        """

        def operation(conn: sqlite3.Connection) -> bool | None:
            row = conn.execute("SELECT account_id FROM messages WHERE queue_id = ?", (queue_id,)).fetchone()
            if row is None:
                return None
            account = account_row(conn, row[0])
            suppress = suppress_for is not None and suppress_for(account)
            return _record_result_sync(
                conn, queue_id, recipient, result, detail, account.id, period_key_for(account), now, reason, suppress
            )

        return await self._run(operation)

    async def deferred_recipients(self, account_id: int) -> int:
        rows = await self._read(
            "SELECT COUNT(*) FROM recipient_results r JOIN messages m ON m.queue_id = r.queue_id"
            " WHERE r.result = 'deferred' AND m.account_id = ?",
            (account_id,),
        )
        return int(rows[0][0])

    async def breakdown(self, account_id: int, period_key: str) -> list[sqlite3.Row]:
        return await self._read(
            "SELECT campaign, region, accepted FROM usage_breakdown WHERE account_id = ? AND period_key = ?"
            " ORDER BY campaign, region",
            (account_id, period_key),
        )

    async def results_by_region(self, account_id: int, period_key: str) -> list[sqlite3.Row]:
        return await self._read(
            "SELECT m.region AS region, r.result AS result, COUNT(*) AS n FROM recipient_results r"
            " JOIN messages m ON m.queue_id = r.queue_id"
            " WHERE m.account_id = ? AND r.period_key = ? AND r.result != 'deferred'"
            " GROUP BY m.region, r.result ORDER BY m.region, r.result",
            (account_id, period_key),
        )

    async def results_by_reason(self, account_id: int, period_key: str) -> list[sqlite3.Row]:
        """The period's final bounces by category and sub-type (model C's Soft Bounce and Invalid Email)."""
        return await self._read(
            "SELECT r.result AS result, r.reason AS reason, COUNT(*) AS n FROM recipient_results r"
            " JOIN messages m ON m.queue_id = r.queue_id"
            " WHERE m.account_id = ? AND r.period_key = ? AND r.result IN ('soft_bounced', 'hard_bounced')"
            " GROUP BY r.result, r.reason ORDER BY r.result, r.reason",
            (account_id, period_key),
        )


def _apply_rate_sync(
    conn: sqlite3.Connection, account: Account, admission: Admission, rate_for: RateFor, now: datetime
) -> Admission:
    """Cap a grant by the account's sending rate and count it in the current window.

    Recipients count when a hold takes them; a released hold does not give them back
    (as Postfix counts RCPTs): a client that aborts transactions still uses its rate."""
    rate = rate_for(account)
    if rate is None:
        return admission
    moment = now.timestamp()
    start = rate.window_start(moment)
    key = (account.id, rate.seconds, start)
    row = conn.execute(
        "SELECT recipients FROM rate_windows WHERE account_id = ? AND window_seconds = ? AND window_start = ?", key
    ).fetchone()
    if row is None:  # a new window: the ended ones are of no use any more
        conn.execute(
            "DELETE FROM rate_windows WHERE account_id = ? AND window_start + window_seconds <= ?",
            (account.id, int(moment)),
        )
    granted = admit_rate(rate, row[0] if row else 0, admission.granted)
    if granted > 0:
        conn.execute(
            "INSERT INTO rate_windows (account_id, window_seconds, window_start, recipients) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (account_id, window_seconds, window_start) DO UPDATE"
            " SET recipients = recipients + excluded.recipients",
            (*key, granted),
        )
    if granted == admission.granted:
        return admission
    return replace(
        admission, granted=granted, refusal=Refusal.RATE_LIMITED, rate=str(rate), retry_after=rate.retry_after(moment)
    )


def _release_sync(conn: sqlite3.Connection, hold_id: str) -> int:
    row = conn.execute("SELECT account_id, period_key, emails FROM holds WHERE id = ?", (hold_id,)).fetchone()
    if row is None:
        return 0
    account_id, period_key, held = row
    conn.execute(
        "UPDATE period_usage SET reserved = reserved - ? WHERE account_id = ? AND period_key = ?",
        (held, account_id, period_key),
    )
    conn.execute("DELETE FROM holds WHERE id = ?", (hold_id,))
    return int(held)


def _record_result_sync(
    conn: sqlite3.Connection,
    queue_id: str,
    recipient: str,
    result: Result,
    detail: str,
    account_id: int,
    period_key: str,
    now: datetime,
    reason: str = "",
    suppress: bool = False,
) -> bool:
    row = conn.execute(
        "SELECT result FROM recipient_results WHERE queue_id = ? AND recipient = ?", (queue_id, recipient)
    ).fetchone()
    if row is not None and Result(row[0]).final:
        return False
    conn.execute(
        "INSERT INTO recipient_results (queue_id, recipient, result, period_key, detail, updated_at, reason)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (queue_id, recipient) DO UPDATE SET result = excluded.result,"
        " period_key = excluded.period_key, detail = excluded.detail, updated_at = excluded.updated_at,"
        " reason = excluded.reason",
        (queue_id, recipient, result.value, period_key, detail[:500], now.isoformat(), reason),
    )
    counter = _COUNTER_FOR_RESULT.get(result)
    if counter is not None:
        conn.execute("UPDATE accounts SET awaiting_results = MAX(awaiting_results - 1, 0) WHERE id = ?", (account_id,))
        conn.execute(
            f"INSERT INTO period_usage (account_id, period_key, {counter}) VALUES (?, ?, 1)"
            f" ON CONFLICT (account_id, period_key) DO UPDATE SET {counter} = {counter} + 1",
            (account_id, period_key),
        )
    kind, data = result_event(queue_id, recipient, result, reason, detail)
    add_event_sync(conn, account_id, kind, data, now)
    if suppress and suppresses(result.value, reason):
        add_suppression_sync(conn, account_id, recipient, reason, detail, queue_id, now)
    return True
