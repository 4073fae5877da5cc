"""The PostgreSQL store's ledger: holds (reserve, release), commits and per-recipient results under
the account's lock, and the usage counters and breakdowns they keep."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime

import asyncpg

from mailmeter.metering.postgres.events import add_suppression
from mailmeter.metering.postgres.holds import PgHolds
from mailmeter.metering.records import (
    Account,
    HoldAccountMismatch,
    RateFor,
    RecipientSuppressed,
    Result,
    ResultReport,
    Settlement,
    Suppression,
    UnknownHold,
    history_from_json,
    result_event,
)
from mailmeter.policies.decision import Admission, Refusal, Usage
from mailmeter.policies.rate import admit_rate
from mailmeter.policies.results import suppresses

_COUNTER_FOR_RESULT = {
    Result.DELIVERED: "delivered",
    Result.SOFT_BOUNCED: "soft_bounced",
    Result.HARD_BOUNCED: "hard_bounced",
}


class PgLedger(PgHolds):
    # -- holds, commits, results ------------------------------------------------------

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
        """Atomically: lock the account, read it and the period's counters, ask `decide`, add the grant.

        `rate`: the account's sending rate, counted under the same lock, so exact across
        every node (two more round trips, only for an account that has a rate).

        `recipient` on the account's suppression list, when `suppress_for(account)`:
        RecipientSuppressed, nothing held (read with the lock: no extra round trip).

        A hold that exists already stays in its account (HoldAccountMismatch for another)
        and its period: a transaction that straddles a period boundary is counted in the
        period it began in, as its commit is.
        """

        async def body(conn: asyncpg.Connection) -> Admission:
            # Three round trips while the lock is held (every node queues on it): lock (and
            # read the session's hold, if it has one), read account and counters at once,
            # write counter and hold at once.
            held = await conn.fetchrow(
                "SELECT h.account_id, h.period_key, s.address, s.reason, s.detail, s.queue_id, s.created_at"
                " FROM accounts a LEFT JOIN holds h ON h.id = $2"
                " LEFT JOIN suppressions s ON s.account_id = a.id AND s.address = $3"
                " WHERE a.id = $1 FOR UPDATE OF a",
                account_id,
                hold_id,
                (recipient or "").lower() if suppress_for is not None else None,
            )
            period = period_key
            if held is not None and held["account_id"] is not None:
                if held["account_id"] != account_id:
                    raise HoldAccountMismatch(hold_id, held["account_id"], account_id)
                period = held["period_key"]
            account, usage = await self._account_and_usage(conn, account_id, period)
            if held is not None and held["address"] is not None and suppress_for is not None and suppress_for(account):
                raise RecipientSuppressed(
                    Suppression(held["address"], held["reason"], held["detail"], held["queue_id"], held["created_at"])
                )
            admission = decide(account, usage)
            if rate is not None and admission.granted > 0:
                admission = await _apply_rate(conn, account, admission, rate, now)
            if admission.granted > 0:
                await self._add_to_hold(conn, account_id, period, hold_id, node, admission.granted, now.isoformat())
            return admission

        return await self._write(body)

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

        `spooled` must be None: a PostgreSQL node keeps its messages in its file spool
        (the inline spool is SQLite's, spool.inline).

        Idempotent on queue_id (checked again once the account is locked, so two
        commits of one message on two connections count it once). Emails held beyond
        `emails` go back to the account. Charges go in under their idempotency key.
        `account_id`: the account the caller commits for; a hold of another account is
        refused (HoldAccountMismatch) and nothing changes.
        """
        if spooled is not None:
            raise ValueError("the inline spool (spool.inline) needs the SQLite store; PostgreSQL nodes spool to files")
        expected_account = account_id

        async def body(conn: asyncpg.Connection) -> None:
            done, owner = await conn.fetchrow(
                "SELECT EXISTS (SELECT 1 FROM messages WHERE queue_id = $1),"
                " (SELECT account_id FROM holds WHERE id = $2)",
                queue_id,
                hold_id,
            )
            if done:
                return
            if owner is None:
                raise UnknownHold(hold_id)
            if expected_account is not None and owner != expected_account:
                raise HoldAccountMismatch(hold_id, owner, expected_account)
            await self._lock(conn, owner)
            if await conn.fetchval("SELECT 1 FROM messages WHERE queue_id = $1", queue_id):
                return  # a commit of the same message on another connection won the lock first
            row = await conn.fetchrow(
                "DELETE FROM holds WHERE id = $1 RETURNING account_id, period_key, emails", hold_id
            )
            if row is None:
                raise UnknownHold(hold_id)
            account_id, period_key, held = row["account_id"], row["period_key"], row["emails"]
            if emails > held:  # raising rolls the delete back: nothing changes
                raise ValueError(f"commit of {emails} emails exceeds the {held} held")
            await conn.execute(  # one statement: usage, message, awaiting results, breakdown
                "WITH counted AS (UPDATE period_usage SET reserved = reserved - $1, accepted = accepted + $2"
                " WHERE account_id = $3 AND period_key = $4 RETURNING 1),"
                " message AS (INSERT INTO messages (queue_id, account_id, period_key, recipients, node, accepted_at,"
                " region) VALUES ($5, $3, $4, $2, $6, $7, $8) RETURNING 1),"
                " awaiting AS (UPDATE accounts SET awaiting_results = awaiting_results + $2 WHERE id = $3 RETURNING 1)"
                " INSERT INTO usage_breakdown (account_id, period_key, campaign, region, accepted)"
                " VALUES ($3, $4, $9, $8, $2) ON CONFLICT (account_id, period_key, campaign, region)"
                " DO UPDATE SET accepted = usage_breakdown.accepted + excluded.accepted",
                held,
                emails,
                account_id,
                period_key,
                queue_id,
                node,
                now.isoformat(),
                region,
                campaign,
            )
            if settle is not None:
                await self._settle(conn, account_id, period_key, settle, now)

        await self._write(body)

    async def release(self, hold_id: str) -> int:
        """Return a hold's emails to the account; returns how many (0 if already gone)."""

        async def body(conn: asyncpg.Connection) -> int:
            owner = await conn.fetchval("SELECT account_id FROM holds WHERE id = $1", hold_id)
            if owner is None:
                return 0
            await self._lock(conn, owner)
            return await self._release(conn, hold_id)

        return await self._write(body)

    async def release_node_holds(self, node: str) -> int:
        """Release every hold a node left behind (it restarted: its sessions are gone).

        Only that node's holds: the other nodes' sessions are alive and keep theirs.
        """

        async def body(conn: asyncpg.Connection) -> int:
            rows = await conn.fetch("SELECT id, account_id FROM holds WHERE node = $1 ORDER BY account_id, id", node)
            total = 0
            for row in rows:  # accounts in id order: one lock order for every transaction
                await self._lock(conn, row["account_id"])
                total += await self._release(conn, row["id"])
            return total

        return await self._write(body)

    async def message_committed(self, queue_id: str) -> bool:
        return await self._fetchrow("SELECT 1 FROM messages WHERE queue_id = $1", queue_id) is not None

    async def message_account(self, queue_id: str) -> int | None:
        row = await self._fetchrow("SELECT account_id FROM messages WHERE queue_id = $1", queue_id)
        return None if row is None else int(row[0])

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
        is counted exactly once (its event and suppression as SqliteLedger.record_result).

        The account lock serializes two reports of the same recipient (a retry after a
        crash, on any node): the second sees the first's final result and returns False.
        """

        async def body(conn: asyncpg.Connection) -> bool:
            await self._lock(conn, account_id)
            return await self._record_locked(
                conn, queue_id, recipient, result, detail, account_id, period_key, now, reason, suppress
            )

        return await self._write(body)

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
        """record_result for a queue id, finding its account in the same transaction.

        None: not a metered message (a bounce or notice the relay made itself).
        """

        async def body(conn: asyncpg.Connection) -> bool | None:
            account_id = await conn.fetchval("SELECT account_id FROM messages WHERE queue_id = $1", queue_id)
            if account_id is None:
                return None
            await self._lock(conn, account_id)
            account = await self._account_in_tx(conn, account_id)
            suppress = suppress_for is not None and suppress_for(account)
            return await self._record_locked(
                conn, queue_id, recipient, result, detail, account_id, period_key_for(account), now, reason, suppress
            )

        return await self._write(body)

    async def record_message_results(
        self,
        reports: Sequence[ResultReport],
        period_key_for: Callable[[Account, datetime], str],
        suppress_for: Callable[[Account], bool] | None = None,
    ) -> list[bool | None | Exception]:
        """record_message_result for many reports in one transaction (the delivery side's group commit).

        Accounts are locked in id order. Per report: True (counted), False (the recipient
        already had a final result), None (not a metered message).
        """

        async def body(conn: asyncpg.Connection) -> list[bool | None | Exception]:
            owners = {
                row["queue_id"]: int(row["account_id"])
                for row in await conn.fetch(
                    "SELECT queue_id, account_id FROM messages WHERE queue_id = ANY($1::text[])",
                    sorted({report.queue_id for report in reports}),
                )
            }
            accounts: dict[int, Account] = {}
            for account_id in sorted(set(owners.values())):
                await self._lock(conn, account_id)
                accounts[account_id] = await self._account_in_tx(conn, account_id)
            outcomes: list[bool | None | Exception] = []
            for report in reports:
                owner = owners.get(report.queue_id)
                if owner is None:
                    outcomes.append(None)
                    continue
                period_key = period_key_for(accounts[owner], report.at)
                outcomes.append(
                    await self._record_locked(
                        conn,
                        report.queue_id,
                        report.recipient,
                        report.result,
                        report.detail,
                        owner,
                        period_key,
                        report.at,
                        report.reason,
                        suppress_for is not None and suppress_for(accounts[owner]),
                    )
                )
            return outcomes

        return await self._write(body)

    @staticmethod
    async def _record_locked(
        conn: asyncpg.Connection,
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
        """The result under the account's lock: False if the recipient already had a final one.
        Its event goes into the outbox, and with `suppress` an Invalid Email recipient onto
        the suppression list, in the same transaction."""
        previous = await conn.fetchval(
            "SELECT result FROM recipient_results WHERE queue_id = $1 AND recipient = $2", queue_id, recipient
        )
        if previous is not None and Result(previous).final:
            return False

        def upsert(reason_parameter: str) -> str:
            return (
                "INSERT INTO recipient_results (queue_id, recipient, result, period_key, detail, updated_at, reason)"
                f" VALUES ($1, $2, $3, $4, $5, $6, {reason_parameter})"
                " ON CONFLICT (queue_id, recipient) DO UPDATE SET result = excluded.result,"
                " period_key = excluded.period_key, detail = excluded.detail, updated_at = excluded.updated_at,"
                " reason = excluded.reason"
            )

        values = (queue_id, recipient, result.value, period_key, detail[:500], now.isoformat())
        kind, data = result_event(queue_id, recipient, result, reason, detail)
        event = (kind, data, f",{kind},")
        # The event (if the account's webhook takes its kind) in the same statement: $9-$11.
        outbox = (
            "outbox AS (INSERT INTO events (account_id, kind, data, created_at, next_attempt_at)"
            " SELECT $7, $9, $10, $6, $6 FROM webhooks WHERE account_id = $7"
            " AND position($11 in ',' || webhooks.events || ',') > 0 RETURNING 1)"
        )
        counter = _COUNTER_FOR_RESULT.get(result)
        if counter is None:
            await conn.execute(
                f"WITH {outbox} {upsert('$8')}",
                *values,
                account_id,
                reason,
                *event,
            )
        else:
            await conn.execute(  # one statement: the result, awaiting results, the period's counter, the event
                f"WITH result AS ({upsert('$8')} RETURNING 1),"
                " awaiting AS (UPDATE accounts SET awaiting_results = GREATEST(awaiting_results - 1, 0)"
                f" WHERE id = $7 RETURNING 1), {outbox}"
                f" INSERT INTO period_usage (account_id, period_key, {counter}) VALUES ($7, $4, 1)"
                f" ON CONFLICT (account_id, period_key) DO UPDATE SET {counter} = period_usage.{counter} + 1",
                *values,
                account_id,
                reason,
                *event,
            )
        if suppress and suppresses(result.value, reason):
            await add_suppression(conn, account_id, recipient, reason, detail, queue_id, now)
        return True

    async def usage(self, account_id: int, period_key: str, awaiting_results: int | None = None) -> Usage:
        row = await self._fetchrow(
            "SELECT accepted, reserved, delivered, soft_bounced, hard_bounced, history FROM period_usage"
            " WHERE account_id = $1 AND period_key = $2",
            account_id,
            period_key,
        )
        return _usage_of(row, awaiting_results)

    async def deferred_recipients(self, account_id: int) -> int:
        row = await self._fetchrow(
            "SELECT COUNT(*) FROM recipient_results r JOIN messages m ON m.queue_id = r.queue_id"
            " WHERE r.result = 'deferred' AND m.account_id = $1",
            account_id,
        )
        return int(row[0]) if row else 0

    # -- usage breakdowns ---------------------------------------------------------------

    async def breakdown(self, account_id: int, period_key: str) -> list[asyncpg.Record]:
        return await self._fetch(
            "SELECT campaign, region, accepted FROM usage_breakdown WHERE account_id = $1 AND period_key = $2"
            " ORDER BY campaign, region",
            account_id,
            period_key,
        )

    async def results_by_region(self, account_id: int, period_key: str) -> list[asyncpg.Record]:
        return await self._fetch(
            "SELECT m.region AS region, r.result AS result, COUNT(*) AS n FROM recipient_results r"
            " JOIN messages m ON m.queue_id = r.queue_id"
            " WHERE m.account_id = $1 AND r.period_key = $2 AND r.result != 'deferred'"
            " GROUP BY m.region, r.result ORDER BY m.region, r.result",
            account_id,
            period_key,
        )

    async def results_by_reason(self, account_id: int, period_key: str) -> list[asyncpg.Record]:
        """The period's final bounces by category and sub-type (model C's Soft Bounce and Invalid Email)."""
        return await self._fetch(
            "SELECT r.result AS result, r.reason AS reason, COUNT(*) AS n FROM recipient_results r"
            " JOIN messages m ON m.queue_id = r.queue_id"
            " WHERE m.account_id = $1 AND r.period_key = $2 AND r.result IN ('soft_bounced', 'hard_bounced')"
            " GROUP BY r.result, r.reason ORDER BY r.result, r.reason",
            account_id,
            period_key,
        )


def _usage_of(row: asyncpg.Record | None, awaiting_results: int | None) -> Usage:
    if row is None:
        return Usage(awaiting_results=awaiting_results)
    return Usage(
        accepted=row[0],
        reserved=row[1],
        delivered=row[2],
        soft_bounced=row[3],
        hard_bounced=row[4],
        awaiting_results=awaiting_results,
        history=history_from_json(row[5]),
    )


async def _apply_rate(
    conn: asyncpg.Connection, account: Account, admission: Admission, rate_for: RateFor, now: datetime
) -> Admission:
    """Cap a grant by the account's sending rate and count it in the current window (the
    caller holds the account's lock). As in SQLite: a released hold does not give back."""
    rate = rate_for(account)
    if rate is None:
        return admission
    moment = now.timestamp()
    start = rate.window_start(moment)
    used = await conn.fetchval(
        "WITH gone AS (DELETE FROM rate_windows WHERE account_id = $1 AND window_start + window_seconds <= $4)"
        " SELECT recipients FROM rate_windows WHERE account_id = $1 AND window_seconds = $2 AND window_start = $3",
        account.id,
        rate.seconds,
        start,
        int(moment),
    )
    granted = admit_rate(rate, used or 0, admission.granted)
    if granted > 0:
        await conn.execute(
            "INSERT INTO rate_windows (account_id, window_seconds, window_start, recipients) VALUES ($1, $2, $3, $4)"
            " ON CONFLICT (account_id, window_seconds, window_start) DO UPDATE"
            " SET recipients = rate_windows.recipients + excluded.recipients",
            account.id,
            rate.seconds,
            start,
            granted,
        )
    if granted == admission.granted:
        return admission
    return replace(
        admission, granted=granted, refusal=Refusal.RATE_LIMITED, rate=str(rate), retry_after=rate.retry_after(moment)
    )
