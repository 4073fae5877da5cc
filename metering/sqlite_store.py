"""The embedded store: one SQLite file through aiosqlite, WAL, synchronous=FULL.

Every state change is one `BEGIN IMMEDIATE` transaction, so the write lock is
taken before anything is read: a reserve reads the counters, asks the pure
policy, and writes the hold without another writer (another session, another
process, the CLI) slipping in between. That is what makes the last cent safe.
The PostgreSQL store gives the same guarantee with `SELECT ... FOR UPDATE`.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from datetime import date, datetime
from pathlib import Path

import aiosqlite

from metering.records import Account, Result
from metering.schema import MIGRATIONS
from policies.decision import Admission, Usage


class StoreUnavailable(RuntimeError):
    """The store could not answer (locked, unreachable, corrupt). Callers fail closed."""


class UnknownHold(LookupError):
    """A hold id that is not (or no longer) in the store."""


_COUNTER_FOR_RESULT = {
    Result.DELIVERED: "delivered",
    Result.SOFT_BOUNCED: "soft_bounced",
    Result.HARD_BOUNCED: "hard_bounced",
}


class SqliteStore:
    def __init__(self, path: Path, busy_timeout_ms: int = 5000) -> None:
        self.path = path
        self._busy_timeout_ms = busy_timeout_ms
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(self.path, isolation_level=None)
        await db.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
        await db.execute("PRAGMA journal_mode = WAL")
        await db.execute("PRAGMA synchronous = FULL")
        await db.execute("PRAGMA foreign_keys = ON")
        self._db = db
        await self.migrate()

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[aiosqlite.Connection]:
        """One immediate transaction; any database error becomes StoreUnavailable."""
        if self._db is None:
            raise StoreUnavailable("the meter store is not open")
        async with self._lock:
            db = self._db
            try:
                await db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as error:
                raise StoreUnavailable(f"meter store: {error}") from error
            try:
                yield db
            except BaseException:
                try:
                    await db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                raise
            try:
                await db.execute("COMMIT")
            except sqlite3.Error as error:
                try:
                    await db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                raise StoreUnavailable(f"meter store commit failed: {error}") from error

    async def _read(self, sql: str, params: Iterable[object] = ()) -> list[sqlite3.Row]:
        if self._db is None:
            raise StoreUnavailable("the meter store is not open")
        async with self._lock:
            try:
                cursor = await self._db.execute(sql, tuple(params))
                rows = await cursor.fetchall()
                await cursor.close()
            except sqlite3.Error as error:
                raise StoreUnavailable(f"meter store: {error}") from error
        return list(rows)

    async def migrate(self) -> int:
        """Apply pending migrations; returns the schema version now in force."""
        async with self._tx() as db:
            await db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            cursor = await db.execute("SELECT version FROM schema_version")
            row = await cursor.fetchone()
            version = row[0] if row else 0
            if row is None:
                await db.execute("INSERT INTO schema_version (version) VALUES (0)")
            for number, script in enumerate(MIGRATIONS, start=1):
                if number <= version:
                    continue
                for statement in script.split(";"):
                    if statement.strip():
                        await db.execute(statement)
                await db.execute("UPDATE schema_version SET version = ?", (number,))
                version = number
        return version

    # -- accounts ---------------------------------------------------------

    async def add_account(
        self,
        name: str,
        password_hash: str | None,
        plan: str,
        subscribed_on: date,
        domains: Iterable[str],
        networks: Iterable[str],
        now: datetime,
    ) -> None:
        async with self._tx() as db:
            try:
                cursor = await db.execute(
                    "INSERT INTO accounts (name, password_hash, plan, subscribed_on, created_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (name, password_hash, plan, subscribed_on.isoformat(), now.isoformat()),
                )
            except sqlite3.IntegrityError:
                raise ValueError(f"account {name!r} already exists") from None
            account_id = cursor.lastrowid
            for domain in domains:
                await db.execute(
                    "INSERT OR IGNORE INTO account_domains VALUES (?, ?)", (account_id, domain)
                )
            for network in networks:
                await db.execute(
                    "INSERT OR IGNORE INTO account_networks VALUES (?, ?)", (account_id, network)
                )

    async def set_payment_ok(self, name: str, ok: bool) -> bool:
        async with self._tx() as db:
            cursor = await db.execute(
                "UPDATE accounts SET payment_ok = ? WHERE name = ?", (int(ok), name)
            )
            return cursor.rowcount == 1

    async def get_account(self, name: str) -> Account | None:
        rows = await self._read("SELECT * FROM accounts WHERE name = ?", (name,))
        if not rows:
            return None
        return await self._account_from_row(rows[0])

    async def get_account_by_id(self, account_id: int) -> Account | None:
        rows = await self._read("SELECT * FROM accounts WHERE id = ?", (account_id,))
        return await self._account_from_row(rows[0]) if rows else None

    async def list_accounts(self) -> list[Account]:
        rows = await self._read("SELECT * FROM accounts ORDER BY name")
        return [await self._account_from_row(row) for row in rows]

    async def _account_from_row(self, row: sqlite3.Row) -> Account:
        domains = await self._read(
            "SELECT domain FROM account_domains WHERE account_id = ? ORDER BY domain", (row[0],)
        )
        networks = await self._read(
            "SELECT network FROM account_networks WHERE account_id = ? ORDER BY network", (row[0],)
        )
        return Account(
            id=row[0],
            name=row[1],
            password_hash=row[2],
            plan=row[3],
            subscribed_on=date.fromisoformat(row[4]),
            payment_ok=bool(row[5]),
            suspended=bool(row[6]),
            prepaid_balance=row[7],
            domains=tuple(r[0] for r in domains),
            networks=tuple(r[0] for r in networks),
        )

    async def all_networks(self) -> list[tuple[str, str]]:
        rows = await self._read(
            "SELECT n.network, a.name FROM account_networks n JOIN accounts a ON a.id = n.account_id"
        )
        return [(row[0], row[1]) for row in rows]

    # -- holds, commits, results -------------------------------------------

    async def reserve(
        self,
        account_id: int,
        period_key: str,
        hold_id: str,
        node: str,
        requested: int,
        now: datetime,
        decide: Callable[[Usage], Admission],
    ) -> Admission:
        """Atomically: read the period's counters, ask `decide`, add the grant to the hold."""
        async with self._tx() as db:
            usage = await self._usage(db, account_id, period_key)
            admission = decide(usage)
            if admission.granted > 0:
                await db.execute(
                    "INSERT INTO period_usage (account_id, period_key, reserved) VALUES (?, ?, ?)"
                    " ON CONFLICT (account_id, period_key) DO UPDATE"
                    " SET reserved = reserved + excluded.reserved",
                    (account_id, period_key, admission.granted),
                )
                await db.execute(
                    "INSERT INTO holds (id, account_id, period_key, emails, node, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (id) DO UPDATE SET emails = emails + excluded.emails",
                    (hold_id, account_id, period_key, admission.granted, node, now.isoformat()),
                )
            return admission

    async def commit(self, hold_id: str, queue_id: str, emails: int, node: str, now: datetime) -> None:
        """The commit point of a message: its usage and its queue id, in one transaction.

        Idempotent on queue_id. Emails held beyond `emails` go back to the account.
        """
        async with self._tx() as db:
            cursor = await db.execute("SELECT 1 FROM messages WHERE queue_id = ?", (queue_id,))
            if await cursor.fetchone():
                return
            cursor = await db.execute(
                "SELECT account_id, period_key, emails FROM holds WHERE id = ?", (hold_id,)
            )
            row = await cursor.fetchone()
            if row is None:
                raise UnknownHold(hold_id)
            account_id, period_key, held = row
            if emails > held:
                raise ValueError(f"commit of {emails} emails exceeds the {held} held")
            await db.execute(
                "UPDATE period_usage SET reserved = reserved - ?, accepted = accepted + ?"
                " WHERE account_id = ? AND period_key = ?",
                (held, emails, account_id, period_key),
            )
            await db.execute("DELETE FROM holds WHERE id = ?", (hold_id,))
            await db.execute(
                "INSERT INTO messages (queue_id, account_id, period_key, recipients, node, accepted_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (queue_id, account_id, period_key, emails, node, now.isoformat()),
            )

    async def release(self, hold_id: str) -> int:
        """Return a hold's emails to the account; returns how many (0 if already gone)."""
        async with self._tx() as db:
            return await self._release(db, hold_id)

    async def _release(self, db: aiosqlite.Connection, hold_id: str) -> int:
        cursor = await db.execute(
            "SELECT account_id, period_key, emails FROM holds WHERE id = ?", (hold_id,)
        )
        row = await cursor.fetchone()
        if row is None:
            return 0
        account_id, period_key, held = row
        await db.execute(
            "UPDATE period_usage SET reserved = reserved - ? WHERE account_id = ? AND period_key = ?",
            (held, account_id, period_key),
        )
        await db.execute("DELETE FROM holds WHERE id = ?", (hold_id,))
        return int(held)

    async def release_node_holds(self, node: str) -> int:
        """Release every hold a node left behind (it restarted: its sessions are gone)."""
        async with self._tx() as db:
            cursor = await db.execute("SELECT id FROM holds WHERE node = ?", (node,))
            total = 0
            for (hold_id,) in await cursor.fetchall():
                total += await self._release(db, hold_id)
            return total

    async def message_committed(self, queue_id: str) -> bool:
        rows = await self._read("SELECT 1 FROM messages WHERE queue_id = ?", (queue_id,))
        return bool(rows)

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
    ) -> bool:
        """Record a recipient's result; a final result is counted exactly once.

        Returns False when the recipient already had a final result (a retry after a
        crash reported it again), so nothing is counted twice.
        """
        async with self._tx() as db:
            cursor = await db.execute(
                "SELECT result FROM recipient_results WHERE queue_id = ? AND recipient = ?",
                (queue_id, recipient),
            )
            row = await cursor.fetchone()
            if row is not None and Result(row[0]).final:
                return False
            await db.execute(
                "INSERT INTO recipient_results (queue_id, recipient, result, period_key, detail, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (queue_id, recipient) DO UPDATE SET result = excluded.result,"
                " period_key = excluded.period_key, detail = excluded.detail,"
                " updated_at = excluded.updated_at",
                (queue_id, recipient, result.value, period_key, detail[:500], now.isoformat()),
            )
            counter = _COUNTER_FOR_RESULT.get(result)
            if counter is not None:
                await db.execute(
                    f"INSERT INTO period_usage (account_id, period_key, {counter}) VALUES (?, ?, 1)"
                    f" ON CONFLICT (account_id, period_key) DO UPDATE SET {counter} = {counter} + 1",
                    (account_id, period_key),
                )
            return True

    async def usage(self, account_id: int, period_key: str) -> Usage:
        if self._db is None:
            raise StoreUnavailable("the meter store is not open")
        async with self._lock:
            return await self._usage(self._db, account_id, period_key)

    async def _usage(self, db: aiosqlite.Connection, account_id: int, period_key: str) -> Usage:
        try:
            cursor = await db.execute(
                "SELECT accepted, reserved, delivered, soft_bounced, hard_bounced FROM period_usage"
                " WHERE account_id = ? AND period_key = ?",
                (account_id, period_key),
            )
            row = await cursor.fetchone()
        except sqlite3.Error as error:
            raise StoreUnavailable(f"meter store: {error}") from error
        if row is None:
            return Usage()
        return Usage(
            accepted=row[0], reserved=row[1], delivered=row[2], soft_bounced=row[3], hard_bounced=row[4]
        )

    async def deferred_recipients(self, account_id: int) -> int:
        rows = await self._read(
            "SELECT COUNT(*) FROM recipient_results r JOIN messages m ON m.queue_id = r.queue_id"
            " WHERE r.result = 'deferred' AND m.account_id = ?",
            (account_id,),
        )
        return int(rows[0][0])
