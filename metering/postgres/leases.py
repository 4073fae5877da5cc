"""Allowance leases in the shared PostgreSQL store (several nodes, one meter).

A lease is an ordinary row of `holds`, owned by one node (id `lease/NODE/ACCOUNT/PERIOD/TOKEN`):
the node borrowed its emails under the account's row lock through the same pure
decision every reserve runs, so `accepted + reserved` never passes what the account
may spend. The node then answers its sessions' reserves from the lease in memory
(metering/leases.py) and comes back here only to renew the lease, to commit messages
carved from it (in batches: one transaction and one account lock for many messages),
and to give back what it did not use.

The row is the only truth: a commit takes its emails out of the lease row and fails
for a message whose lease no longer holds them (the lease was reclaimed), so a node
whose memory disagrees with the row can fail a message (451), never overspend.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime

import asyncpg

from mailmeter.metering.postgres.holds import PgHolds
from mailmeter.metering.records import Account, LeasedCommit, Settlement, UnknownHold
from mailmeter.policies.decision import Admission, Usage

LEASE_PREFIX = "lease/"


class PgLeases(PgHolds):
    async def renew_lease(
        self,
        lease_id: str,
        account_id: int,
        period_key: str,
        node: str,
        returning: int,
        existing: bool,
        now: datetime,
        decide: Callable[[Account, Usage], Admission],
    ) -> Admission | None:
        """In one transaction: give back `returning` unused emails of the lease, then add
        what `decide` grants on the account's current standing and counters.

        None: the lease was `existing` but its row is gone or holds fewer than
        `returning` emails (another node reclaimed it): the caller drops it.
        """
        stamp = now.isoformat()

        async def body(conn: asyncpg.Connection) -> Admission | None:
            await self._lock(conn, account_id)
            if existing and not await self._take_from_lease(conn, lease_id, returning, stamp):
                return None
            account, usage = await self._account_and_usage(conn, account_id, period_key)
            admission = decide(account, usage)
            if admission.granted > 0:
                await self._add_to_hold(conn, account_id, period_key, lease_id, node, admission.granted, stamp)
            return admission

        return await self._write(body)

    @staticmethod
    async def _take_from_lease(conn: asyncpg.Connection, lease_id: str, emails: int, stamp: str) -> bool:
        """Move `emails` of the lease back to the account (the caller holds its lock); mark it renewed."""
        taken = await conn.fetchval(
            "WITH lease AS (UPDATE holds SET emails = emails - $2, created_at = $3"
            " WHERE id = $1 AND emails >= $2 RETURNING account_id, period_key),"
            " counted AS (UPDATE period_usage u SET reserved = u.reserved - $2 FROM lease"
            " WHERE u.account_id = lease.account_id AND u.period_key = lease.period_key RETURNING 1)"
            " SELECT count(*) FROM lease",
            lease_id,
            emails,
            stamp,
        )
        return bool(taken)

    async def shrink_lease(self, lease_id: str, returning: int, drop_if_empty: bool, now: datetime) -> int | None:
        """Give back `returning` unused emails and mark the lease renewed (the node is alive).

        Returns the emails the lease still holds (its sessions' carves), after deleting
        the row if that is 0 and `drop_if_empty`; None if the row was gone or short.
        """
        stamp = now.isoformat()

        async def body(conn: asyncpg.Connection) -> int | None:
            owner = await conn.fetchval("SELECT account_id FROM holds WHERE id = $1", lease_id)
            if owner is None:
                return None
            await self._lock(conn, owner)
            if not await self._take_from_lease(conn, lease_id, returning, stamp):
                return None
            left = int(await conn.fetchval("SELECT emails FROM holds WHERE id = $1", lease_id))
            if left == 0 and drop_if_empty:
                await conn.execute("DELETE FROM holds WHERE id = $1", lease_id)
            return left

        return await self._write(body)

    async def reclaim_stale_leases(self, renewed_before: datetime, node: str) -> int:
        """Give back the leases other nodes stopped renewing (they died and did not restart).

        Their emails return to their accounts; a commit the owner might still attempt
        from them then fails (the row is gone), so nothing is spent twice.
        """
        stamp = renewed_before.isoformat()

        async def body(conn: asyncpg.Connection) -> int:
            rows = await conn.fetch(
                "SELECT id, account_id FROM holds WHERE id LIKE 'lease/%' AND node != $1 AND created_at < $2"
                " ORDER BY account_id, id",
                node,
                stamp,
            )
            total = 0
            for row in rows:  # accounts in id order: one lock order for every transaction
                await self._lock(conn, row["account_id"])
                total += await self._release(conn, row["id"])
            return total

        return await self._write(body)

    async def commit_leased(
        self,
        commits: Sequence[LeasedCommit],
        node: str,
        now: datetime,
        region: str,
        settle: Callable[[Account, Usage, int, str], Settlement] | None,
    ) -> list[Exception | None]:
        """Commit many messages carved from leases in one transaction.

        Per message: None (counted, or already counted before: idempotent on the queue
        id) or UnknownHold (its lease no longer holds its emails: not counted). Accounts
        are locked in id order; each (account, period) is written with one statement and
        settled once, on its final counters (charges_due is prefix-closed, so the same
        charges fall due as if each message were settled alone).
        """
        stamp = now.isoformat()
        groups: dict[tuple[int, str], list[int]] = {}
        for index, item in enumerate(commits):
            groups.setdefault((item.account_id, item.period_key), []).append(index)

        async def body(conn: asyncpg.Connection) -> list[Exception | None]:
            outcomes: list[Exception | None] = [None] * len(commits)
            for (account_id, period_key), indexes in sorted(groups.items()):
                await self._lock(conn, account_id)
                items = [commits[i] for i in indexes]
                lease_ids = sorted({item.lease_id for item in items})
                available = {  # only leases of this account: emails never move between accounts
                    row["id"]: int(row["emails"])
                    for row in await conn.fetch(
                        "SELECT id, emails FROM holds WHERE id = ANY($1::text[]) AND account_id = $2",
                        lease_ids,
                        account_id,
                    )
                }
                done = {
                    row["queue_id"]
                    for row in await conn.fetch(
                        "SELECT queue_id FROM messages WHERE queue_id = ANY($1::text[])",
                        [item.queue_id for item in items],
                    )
                }
                taken: dict[str, int] = {}
                messages: list[tuple[str, int]] = []
                campaigns: dict[str, int] = {}
                for index, item in zip(indexes, items):
                    if item.queue_id in done:
                        continue  # counted before (a retried commit): once only
                    left = available.get(item.lease_id, 0) - taken.get(item.lease_id, 0)
                    if item.emails > left:
                        outcomes[index] = UnknownHold(item.lease_id)
                        continue
                    done.add(item.queue_id)
                    taken[item.lease_id] = taken.get(item.lease_id, 0) + item.emails
                    messages.append((item.queue_id, item.emails))
                    campaigns[item.campaign] = campaigns.get(item.campaign, 0) + item.emails
                if not messages:
                    continue
                total = sum(emails for _, emails in messages)
                await conn.execute(  # one statement: messages, leases, counters, awaiting results, breakdown
                    "WITH message AS (INSERT INTO messages (queue_id, account_id, period_key, recipients, node,"
                    " accepted_at, region) SELECT q, $1, $2, n, $3, $4, $5"
                    " FROM unnest($6::text[], $7::bigint[]) AS t(q, n) RETURNING 1),"
                    " lease AS (UPDATE holds h SET emails = h.emails - t.n"
                    " FROM unnest($8::text[], $9::bigint[]) AS t(id, n) WHERE h.id = t.id RETURNING 1),"
                    " counted AS (UPDATE period_usage SET reserved = reserved - $10, accepted = accepted + $10"
                    " WHERE account_id = $1 AND period_key = $2 RETURNING 1),"
                    " awaiting AS (UPDATE accounts SET awaiting_results = awaiting_results + $10 WHERE id = $1"
                    " RETURNING 1)"
                    " INSERT INTO usage_breakdown (account_id, period_key, campaign, region, accepted)"
                    " SELECT $1, $2, c, $5, n FROM unnest($11::text[], $12::bigint[]) AS t(c, n)"
                    " ON CONFLICT (account_id, period_key, campaign, region)"
                    " DO UPDATE SET accepted = usage_breakdown.accepted + excluded.accepted",
                    account_id,
                    period_key,
                    node,
                    stamp,
                    region,
                    [q for q, _ in messages],
                    [n for _, n in messages],
                    list(taken),
                    list(taken.values()),
                    total,
                    list(campaigns),
                    list(campaigns.values()),
                )
                if settle is not None:
                    await self._settle(conn, account_id, period_key, settle, now)
            return outcomes

        return await self._write(body)


__all__ = ["LEASE_PREFIX", "PgLeases"]
