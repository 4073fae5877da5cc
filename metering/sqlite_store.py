"""The embedded store: one SQLite file through aiosqlite, WAL, synchronous=FULL.

Every state change is one `BEGIN IMMEDIATE` transaction, so the write lock is
taken before anything is read: a reserve reads the counters, asks the pure
policy, and writes the hold without another writer (another session, another
process, the CLI) slipping in between. That is what makes the last cent safe.
The PostgreSQL store gives the same guarantee with `SELECT ... FOR UPDATE`.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any, TypeVar
from contextvars import ContextVar
from datetime import date, datetime
from pathlib import Path

import aiosqlite

from metering.records import (
    Account,
    AccountUpdate,
    AuditDraft,
    DuplicateEvent,
    HoldAccountMismatch,
    InvoiceRecord,
    Result,
    Settlement,
    StoreUnavailable,
    UnknownHold,
    account_core,
    applying_due_plan_change,
    charge_key,
    history_from_json,
    history_to_json,
)
from metering.schema import MIGRATIONS
from policies.charges import Charge
from policies.decision import Admission, Usage

_T = TypeVar("_T")

# The usage of every period not invoiced yet (after settled_through), which a prepaid
# balance still holds until the invoices deduct it: "KEY ACCEPTED RESERVED DELIVERED SOFT HARD",
# comma-separated (records.open_periods_from_text). Usually one row: the current period.
_OPEN_PERIODS = (
    "(SELECT group_concat(u.period_key || ' ' || u.accepted || ' ' || u.reserved || ' ' || u.delivered"
    " || ' ' || u.soft_bounced || ' ' || u.hard_bounced, ',') FROM period_usage u"
    " WHERE u.account_id = a.id AND u.period_key > COALESCE(a.settled_through, '')) AS open_periods"
)
_ACCOUNT_SELECT = (
    "SELECT a.*, (SELECT COALESCE(SUM(i.amount_due), 0) FROM invoices i"
    f" WHERE i.account_id = a.id AND i.status = 'overdrawn') AS debt, {_OPEN_PERIODS} FROM accounts a"
)


_COUNTER_FOR_RESULT = {
    Result.DELIVERED: "delivered",
    Result.SOFT_BOUNCED: "soft_bounced",
    Result.HARD_BOUNCED: "hard_bounced",
}


class SqliteStore:
    def __init__(self, path: Path, busy_timeout_ms: int = 5000) -> None:
        self.path = path
        self._busy_timeout_ms = busy_timeout_ms
        self._db: aiosqlite.Connection | None = None  # every write, one batch at a time
        self._reader: aiosqlite.Connection | None = None  # reads: never queued behind a write's fsync
        self._lock = asyncio.Lock()
        self._writes: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any], bool]] = []
        self._flusher: asyncio.Future[None] | None = None

    async def open(self) -> None:
        """Open (creating the file if needed) and migrate; StoreUnavailable if it cannot be used
        (a read-only file or directory, a file that is not an SQLite database, a full disk)."""
        try:
            await self._open()
        except (sqlite3.Error, OSError, StoreUnavailable) as error:
            await self.close()
            reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
            reason = reason.removeprefix("meter store: ")
            raise StoreUnavailable(f"cannot open {self.path}: {reason}") from error

    async def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(self.path, isolation_level=None)
        self._db = db  # from here close() closes it, if what follows fails
        await db.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
        await db.execute("PRAGMA journal_mode = WAL")
        await db.execute("PRAGMA synchronous = FULL")
        # 64 MiB of page cache: the hot indexes of a store with millions of messages stay in
        # memory (SQLite's default, about 2 MiB, made every commit read index pages).
        await db.execute("PRAGMA cache_size = -65536")
        await db.execute("PRAGMA foreign_keys = ON")
        db.row_factory = sqlite3.Row
        await self.migrate()
        # A second connection for reads (MAIL's account check, AUTH, the API): in WAL mode
        # it reads the last commit while the writer holds its lock and waits for the disk.
        # On the writer's connection a read waited for the whole batch in flight, its
        # fsync included.
        reader = await aiosqlite.connect(self.path, isolation_level=None)
        self._reader = reader
        await reader.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
        await reader.execute("PRAGMA query_only = ON")
        await reader.execute("PRAGMA cache_size = -65536")
        reader.row_factory = sqlite3.Row
        # From here the writer waits for the write lock itself (_begin_immediate), in
        # steps of a fifth of a millisecond, not SQLite's 1, 2, 5, 10, 15... ms sleeps.
        await db.execute("PRAGMA busy_timeout = 0")

    async def claim_node(self, node: str, owner: str) -> None:
        """Nothing to claim: an SQLite meter has one machine, whose spool lock (relay/spool.py)
        keeps a second process of the same config from starting (PgBase.claim_node)."""
        return None

    async def close(self) -> None:
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)
        if self._reader is not None:
            await self._reader.close()
            self._reader = None
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
                await db._execute(_begin_immediate, db._conn, self._busy_timeout_ms / 1000)
            except sqlite3.Error as error:
                raise StoreUnavailable(f"meter store: {error}") from error
            try:
                await self._audit_begin(db)
                yield db
                await self._audit_end(db)
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

    async def _run(
        self, operation: Callable[[sqlite3.Connection], _T], write: bool = True, durable: bool = True
    ) -> _T:
        """Run `operation` whole in the connection's thread: one hop, not one per statement.

        The hot path (reserve, commit, release, results, account reads) goes through here:
        statement-by-statement awaits cost a thread round trip each, which was most of a
        message's CPU. Reads run as they are. Writes are group-committed: the writes that
        arrive while a batch is being written go into the next one, each in a savepoint
        of one BEGIN IMMEDIATE ... COMMIT, one fsync for all. Every write still sees the
        ones before it (they run one after another, so a reserve's decision is as atomic
        as alone), one that fails rolls back alone, and none is answered before its
        COMMIT is durable: commits are grouped, never skipped.

        `durable=False` is for holds only (reserve, release): a batch of nothing else
        commits without waiting for the disk (WAL, synchronous=NORMAL: atomic, but a power
        loss may forget it). A forgotten hold costs nothing: a restarting node releases
        all its holds anyway. A batch with any other write is fsynced (synchronous=FULL),
        and that also makes every hold written before it durable.
        """
        if self._db is None:
            raise StoreUnavailable("the meter store is not open")
        if not write:
            reader = self._reader
            if reader is None:
                raise StoreUnavailable("the meter store is not open")
            try:
                return await reader._execute(_in_snapshot, reader._conn, operation)
            except sqlite3.Error as error:
                raise StoreUnavailable(f"meter store: {error}") from error
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._writes.append((operation, future, durable))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush_writes())
        return await future  # type: ignore[no-any-return]

    async def _flush_writes(self) -> None:
        """Write the queued operations in batches until none is left."""
        while self._writes:
            async with self._lock:
                batch, self._writes = self._writes, []
                db = self._db
                try:
                    if db is None:
                        raise StoreUnavailable("the meter store is not open")
                    durable = any(must_sync for _, _, must_sync in batch)
                    outcomes = await db._execute(_write_batch, db._conn, [op for op, _, _ in batch], durable,
                                                 self._busy_timeout_ms / 1000)
                except (sqlite3.Error, StoreUnavailable, ValueError) as error:
                    failure = error if isinstance(error, StoreUnavailable) else StoreUnavailable(f"meter store: {error}")
                    for _, future, _ in batch:
                        if not future.done():
                            future.set_exception(failure)
                    continue
            for (_, future, _), (ok, value) in zip(batch, outcomes):
                if future.done():
                    continue
                if ok:
                    future.set_result(value)
                elif isinstance(value, sqlite3.Error):
                    future.set_exception(StoreUnavailable(f"meter store: {value}"))
                else:
                    future.set_exception(value)

    async def _read(self, sql: str, params: Iterable[object] = ()) -> list[sqlite3.Row]:
        """One statement on the reader: it sees every write whose call has returned."""
        reader = self._reader
        if reader is None:
            raise StoreUnavailable("the meter store is not open")
        try:
            return await reader._execute(_fetch_all, reader._conn, sql, tuple(params))
        except sqlite3.Error as error:
            raise StoreUnavailable(f"meter store: {error}") from error

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

    async def schema_version(self) -> int:
        rows = await self._read("SELECT version FROM schema_version")
        return int(rows[0][0]) if rows else 0

    async def backup(self, target: Path) -> None:
        """A consistent online copy (SQLite's backup API), safe while the relay writes."""
        if self._db is None:
            raise StoreUnavailable("the meter store is not open")
        if target.exists():
            raise FileExistsError(f"{target} exists; choose a new file for the backup")
        async with self._lock:
            async with aiosqlite.connect(target) as copy:
                await self._db.backup(copy)

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
        contacts: Iterable[str] = (),
        monthly_payment: str = "[]",
    ) -> None:
        """`monthly_payment`: the account's own monthly payments (records.payment_changes_to_json)."""
        async with self._tx() as db:
            try:
                cursor = await db.execute(
                    "INSERT INTO accounts (name, password_hash, plan, subscribed_on, created_at, contacts,"
                    " monthly_payment) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (name, password_hash, plan, subscribed_on.isoformat(), now.isoformat(),
                     json.dumps(list(contacts)), monthly_payment),
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

    async def set_payment(self, name: str, ok: bool, detail: str, now: datetime) -> bool:
        """Block or release sending. A release also retries the charges that failed."""
        async with self._tx() as db:
            cursor = await db.execute(
                "UPDATE accounts SET payment_ok = ?, payment_detail = ? WHERE name = ?",
                (int(ok), detail[:500], name),
            )
            if cursor.rowcount != 1:
                return False
            if ok:
                await db.execute(
                    "UPDATE charges SET status = 'pending', next_attempt_at = ?"
                    " WHERE status = 'failed' AND account_id = (SELECT id FROM accounts WHERE name = ?)",
                    (now.isoformat(), name),
                )
            return True

    async def add_balance(self, name: str, amount: int, kind: str, reference: str, now: datetime) -> int:
        """Add to (or, negative, take from) the prepaid balance; returns the new balance."""
        async with self._tx() as db:
            cursor = await db.execute("SELECT id, prepaid_balance FROM accounts WHERE name = ?", (name,))
            row = await cursor.fetchone()
            if row is None:
                raise LookupError(f"no account named {name!r} (see `mailmeter account list`)")
            await db.execute(
                "UPDATE accounts SET prepaid_balance = prepaid_balance + ? WHERE id = ?", (amount, row["id"])
            )
            await db.execute(
                "INSERT INTO balance_entries (account_id, amount, kind, reference, created_at) VALUES (?, ?, ?, ?, ?)",
                (row["id"], amount, kind, reference, now.isoformat()),
            )
            return int(row["prepaid_balance"]) + amount

    async def change_account(
        self,
        name: str,
        period_key: str,
        now: datetime,
        change: Callable[[Account, Usage], AccountUpdate],
    ) -> AccountUpdate | None:
        """An admin change of the account's plan or limits, in one transaction: a pending plan
        change that is due is put in force first, then `change` decides from the account and
        the period's counters as they are, and its writes (and the period's history) go in.

        None: no such account. Whatever `change` raises rolls everything back.
        """
        async with self._tx() as db:
            cursor = await db.execute("SELECT id FROM accounts WHERE name = ?", (name,))
            row = await cursor.fetchone()
            if row is None:
                return None
            account_id = int(row["id"])
            account = await self._account_in_tx(db, account_id)
            due = applying_due_plan_change(account, now)
            if due is not None:
                await self._write_account(db, account_id, due)
                account = await self._account_in_tx(db, account_id)
            cursor = await db.execute(
                "SELECT accepted, reserved, delivered, soft_bounced, hard_bounced, history FROM period_usage"
                " WHERE account_id = ? AND period_key = ?",
                (account_id, period_key),
            )
            usage = _usage_of(await cursor.fetchone(), account.awaiting_results)
            update = change(account, usage)
            await self._write_account(db, account_id, update)
            if update.history is not None:
                await db.execute(
                    "INSERT INTO period_usage (account_id, period_key, history) VALUES (?, ?, ?)"
                    " ON CONFLICT (account_id, period_key) DO UPDATE SET history = excluded.history",
                    (account_id, period_key, history_to_json(update.history)),
                )
            return update

    @staticmethod
    async def _write_account(db: aiosqlite.Connection, account_id: int, update: AccountUpdate) -> None:
        columns = update.columns()
        if columns:
            assignments = ", ".join(f"{column} = ?" for column in columns)
            await db.execute(f"UPDATE accounts SET {assignments} WHERE id = ?", (*columns.values(), account_id))

    async def set_monthly_payment(self, name: str, changes: str) -> bool:
        """Store the account's monthly payments (records.payment_changes_to_json)."""
        async with self._tx() as db:
            cursor = await db.execute("UPDATE accounts SET monthly_payment = ? WHERE name = ?", (changes, name))
            return cursor.rowcount == 1

    async def add_monthly_credit(self, account_id: int, period_key: str, credit: Charge | None, now: datetime) -> bool:
        """Record a period's monthly credit (model B): the charge that collects it, and its amount
        added to the prepaid balance, once; then mark the period credited.

        Idempotent on the charge's key: a retry, a restart or another node recording the
        same period's credit finds the charge there and adds nothing. Returns whether this
        call added it. `credit` None (a payment of 0) only marks the period credited.
        """
        async with self._tx() as db:
            account = await self._account_in_tx(db, account_id)
            added = False
            if credit is not None and await self._insert_charge(db, account, period_key, credit, now):
                await db.execute(
                    "UPDATE accounts SET prepaid_balance = prepaid_balance + ? WHERE id = ?", (credit.amount, account_id)
                )
                await db.execute(
                    "INSERT INTO balance_entries (account_id, amount, kind, reference, created_at)"
                    " VALUES (?, ?, 'monthly', ?, ?)",
                    (account_id, credit.amount, charge_key(account.name, period_key, credit.key), now.isoformat()),
                )
                added = True
            await db.execute(
                "UPDATE accounts SET credited_through = ? WHERE id = ?"
                " AND (credited_through IS NULL OR credited_through < ?)",
                (period_key, account_id, period_key),
            )
            return added

    async def repay(self, name: str, now: datetime) -> int:
        """Settle every overdrawn invoice of the account at once; returns the amount repaid."""
        async with self._tx() as db:
            cursor = await db.execute("SELECT id FROM accounts WHERE name = ?", (name,))
            row = await cursor.fetchone()
            if row is None:
                raise LookupError(f"no account named {name!r} (see `mailmeter account list`)")
            cursor = await db.execute(
                "SELECT COALESCE(SUM(amount_due), 0) FROM invoices WHERE account_id = ? AND status = 'overdrawn'",
                (row["id"],),
            )
            amount = int((await cursor.fetchone())[0])
            if amount:
                await db.execute(
                    "UPDATE invoices SET status = 'paid' WHERE account_id = ? AND status = 'overdrawn'", (row["id"],)
                )
                await db.execute(
                    "INSERT INTO balance_entries (account_id, amount, kind, reference, created_at)"
                    " VALUES (?, ?, 'repay', '', ?)",
                    (row["id"], amount, now.isoformat()),
                )
            return amount

    async def get_account(self, name: str) -> Account | None:
        return await self._run(lambda conn: _full_account(conn, "a.name = ?", name), write=False)

    async def account_with_usage(self, name: str, period_key: str) -> tuple[Account, Usage] | None:
        """The whole account and its counters for the period, in one hop (MAIL's check)."""

        def read(conn: sqlite3.Connection) -> tuple[Account, Usage] | None:
            account = _full_account(conn, "a.name = ?", name)
            if account is None:
                return None
            return account, _usage_row(conn, account.id, period_key, account.awaiting_results)

        return await self._run(read, write=False)

    async def get_account_by_id(self, account_id: int) -> Account | None:
        return await self._run(lambda conn: _full_account(conn, "a.id = ?", account_id), write=False)

    async def list_accounts(self) -> list[Account]:
        """Every account in one query: the billing job lists them all on every pass.

        Built in the store's thread, so that 10,000 rows become accounts without holding
        the event loop (the interpreter hands the GIL over every few milliseconds).
        """

        def accounts(conn: sqlite3.Connection) -> list[Account]:
            return [_account_with_lists(row) for row in _fetch_all(conn, f"{_FULL_ACCOUNT_SELECT} ORDER BY a.name", ())]

        return await self._run(accounts, write=False)

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
        decide: Callable[[Account, Usage], Admission],
    ) -> Admission:
        """Atomically: read the account and the period's counters, ask `decide`, add the grant.

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
            account = _account_row(conn, account_id)
            usage = _usage_row(conn, account_id, period, account.awaiting_results)
            admission = decide(account, usage)
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
    ) -> None:
        """The commit point of a message: its usage, its queue id, and the charges and
        notices that usage makes due, in one transaction.

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
            cursor = conn.execute(
                "SELECT account_id, period_key, emails FROM holds WHERE id = ?", (hold_id,)
            )
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
            conn.execute(
                "INSERT INTO usage_breakdown (account_id, period_key, campaign, region, accepted)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (account_id, period_key, campaign, region)"
                " DO UPDATE SET accepted = accepted + excluded.accepted",
                (account_id, period_key, campaign, region, emails),
            )
            if settle is not None:
                account = _account_row(conn, account_id)
                usage = _usage_row(conn, account_id, period_key, account.awaiting_results)
                cursor = conn.execute(
                    "SELECT COALESCE(MAX(seq), 0) FROM charges WHERE account_id = ? AND period_key = ?"
                    " AND kind NOT IN ('invoice', 'monthly')",
                    (account_id, period_key),
                )
                last_seq = int((cursor.fetchone())[0])
                settlement = settle(account, usage, last_seq, period_key)
                for charge in settlement.charges:
                    _insert_charge_sync(conn, account, period_key, charge, now)
                for key, body in settlement.notices:
                    conn.execute(
                        "INSERT OR IGNORE INTO notices (account_id, period_key, key, body, created_at)"
                        " VALUES (?, ?, ?, ?, ?)",
                        (account_id, period_key, key, body, now.isoformat()),
                    )

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
    ) -> bool:
        """Record a recipient's result (its billing category) and sub-type; a final result
        is counted exactly once.

        Returns False when the recipient already had a final result (a retry after a
        crash reported it again), so nothing is counted twice.
        """
        return await self._run(
            lambda conn: _record_result_sync(conn, queue_id, recipient, result, detail, account_id, period_key, now,
                                             reason)
        )

    async def usage(self, account_id: int, period_key: str, awaiting_results: int | None = None) -> Usage:
        return await self._run(lambda conn: _usage_row(conn, account_id, period_key, awaiting_results), write=False)

    async def record_message_result(
        self,
        queue_id: str,
        recipient: str,
        result: Result,
        detail: str,
        now: datetime,
        period_key_for: Callable[[Account], str],
        reason: str = "",
    ) -> bool | None:
        """record_result for a queue id, finding its account in the same transaction.

        None: not a metered message (a bounce or notice the relay made itself).
        """

        def operation(conn: sqlite3.Connection) -> bool | None:
            row = conn.execute("SELECT account_id FROM messages WHERE queue_id = ?", (queue_id,)).fetchone()
            if row is None:
                return None
            account = _account_row(conn, row[0])
            return _record_result_sync(conn, queue_id, recipient, result, detail, account.id,
                                       period_key_for(account), now, reason)

        return await self._run(operation)

    async def _account_in_tx(self, db: aiosqlite.Connection, account_id: int) -> Account:
        cursor = await db.execute(f"{_ACCOUNT_SELECT} WHERE a.id = ?", (account_id,))
        row = await cursor.fetchone()
        if row is None:
            raise LookupError(f"account id {account_id} is gone")
        return account_core(row)

    async def _insert_charge(
        self, db: aiosqlite.Connection, account: Account, period_key: str, charge: Charge, now: datetime
    ) -> bool:
        """Insert a charge under its idempotency key; False if the key was already there."""
        cursor = await db.execute(
            "INSERT OR IGNORE INTO charges (idempotency_key, account_id, period_key, kind, seq, amount,"
            " emails_unlocked, description, created_at, next_attempt_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                charge_key(account.name, period_key, charge.key),
                account.id,
                period_key,
                charge.kind,
                charge.index,
                charge.amount,
                charge.emails_unlocked,
                charge.description,
                now.isoformat(),
                now.isoformat(),
            ),
        )
        return cursor.rowcount == 1

    async def deferred_recipients(self, account_id: int) -> int:
        rows = await self._read(
            "SELECT COUNT(*) FROM recipient_results r JOIN messages m ON m.queue_id = r.queue_id"
            " WHERE r.result = 'deferred' AND m.account_id = ?",
            (account_id,),
        )
        return int(rows[0][0])

    # -- ledger: charges, invoices, notices, breakdowns ------------------------------

    async def charges_due_for_collection(self, now: datetime, limit: int = 100) -> list[sqlite3.Row]:
        return await self._read(
            "SELECT c.*, a.name AS account FROM charges c JOIN accounts a ON a.id = c.account_id"
            " WHERE c.status = 'pending' AND c.next_attempt_at <= ? ORDER BY c.created_at LIMIT ?",
            (now.isoformat(), limit),
        )

    async def charge(self, key: str) -> sqlite3.Row | None:
        rows = await self._read(
            "SELECT c.*, a.name AS account FROM charges c JOIN accounts a ON a.id = c.account_id"
            " WHERE c.idempotency_key = ?",
            (key,),
        )
        return rows[0] if rows else None

    async def charges_of(self, account_id: int, period_key: str | None = None) -> list[sqlite3.Row]:
        if period_key is None:
            return await self._read(
                "SELECT * FROM charges WHERE account_id = ? ORDER BY created_at, seq", (account_id,)
            )
        return await self._read(
            "SELECT * FROM charges WHERE account_id = ? AND period_key = ? ORDER BY created_at, seq",
            (account_id, period_key),
        )

    async def set_charge_result(
        self, key: str, status: str, detail: str, attempts: int, next_attempt_at: datetime
    ) -> bool:
        """Record a gateway verdict. A failed charge blocks the account's sending at once.

        Only a charge still open (pending, submitted, or recorded for an external system to
        collect) changes: a late duplicate verdict is ignored.
        """
        async with self._tx() as db:
            cursor = await db.execute(
                "UPDATE charges SET status = ?, detail = ?, attempts = ?, next_attempt_at = ?"
                " WHERE idempotency_key = ? AND status IN ('pending', 'submitted', 'recorded')",
                (status, detail[:500], attempts, next_attempt_at.isoformat(), key),
            )
            changed = cursor.rowcount == 1
            if changed and status == "failed":
                await db.execute(
                    "UPDATE accounts SET payment_ok = 0, payment_detail = ?"
                    " WHERE id = (SELECT account_id FROM charges WHERE idempotency_key = ?)",
                    (f"charge {key} failed: {detail}"[:500], key),
                )
            if changed and status == "succeeded":
                await db.execute(
                    "UPDATE invoices SET status = 'paid' WHERE (account_id, period_key) ="
                    " (SELECT account_id, period_key FROM charges WHERE idempotency_key = ? AND kind = 'invoice')",
                    (key,),
                )
            return changed

    async def last_invoiced_periods(self) -> dict[int, str]:
        rows = await self._read("SELECT account_id, MAX(period_key) FROM invoices GROUP BY account_id")
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
        once, exactly one insert wins and only that one deducts and charges.
        """
        async with self._tx() as db:
            cursor = await db.execute(
                "INSERT OR IGNORE INTO invoices (id, account_id, period_key, period_end, issued_at, invoice_date,"
                " due_date, statement_date, total, amount_due, prepaid_applied, status, body)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    invoice.id, invoice.account_id, invoice.period_key, invoice.period_end, invoice.issued_at,
                    invoice.invoice_date, invoice.due_date, invoice.statement_date, invoice.total,
                    invoice.amount_due, invoice.prepaid_applied, invoice.status, invoice.body,
                ),
            )
            if cursor.rowcount != 1:
                return False
            await db.execute(
                "UPDATE accounts SET settled_through = ? WHERE id = ?"
                " AND (settled_through IS NULL OR settled_through < ?)",
                (invoice.period_key, invoice.account_id, invoice.period_key),
            )
            if prepaid_applied:
                await db.execute(
                    "UPDATE accounts SET prepaid_balance = prepaid_balance - ? WHERE id = ?",
                    (prepaid_applied, invoice.account_id),
                )
                await db.execute(
                    "INSERT INTO balance_entries (account_id, amount, kind, reference, created_at)"
                    " VALUES (?, ?, 'usage', ?, ?)",
                    (invoice.account_id, -prepaid_applied, invoice.id, now.isoformat()),
                )
            if collect is not None:
                account = await self._account_in_tx(db, invoice.account_id)
                await self._insert_charge(db, account, invoice.period_key, collect, now)
            await db.execute(
                "INSERT OR IGNORE INTO notices (account_id, period_key, key, body, created_at)"
                " VALUES (?, ?, 'invoice', ?, ?)",
                (invoice.account_id, invoice.period_key, notice_body, now.isoformat()),
            )
            return True

    async def invoices(self, account_id: int | None = None) -> list[InvoiceRecord]:
        sql = "SELECT id, account_id, period_key, period_end, issued_at, invoice_date, due_date, statement_date," \
              " total, amount_due, prepaid_applied, status, body FROM invoices"
        rows = await (
            self._read(sql + " ORDER BY period_key, id")
            if account_id is None
            else self._read(sql + " WHERE account_id = ? ORDER BY period_key", (account_id,))
        )
        return [InvoiceRecord(*tuple(row)) for row in rows]

    async def statements_due(self, today_by_invoice: Callable[[InvoiceRecord], bool]) -> list[InvoiceRecord]:
        rows = await self._read(
            "SELECT id, account_id, period_key, period_end, issued_at, invoice_date, due_date, statement_date,"
            " total, amount_due, prepaid_applied, status, body FROM invoices WHERE statement_sent = 0"
        )
        return [r for r in (InvoiceRecord(*tuple(row)) for row in rows) if today_by_invoice(r)]

    async def mark_statement(self, invoice: InvoiceRecord, body: str, now: datetime) -> None:
        async with self._tx() as db:
            await db.execute("UPDATE invoices SET statement_sent = 1 WHERE id = ?", (invoice.id,))
            await db.execute(
                "INSERT OR IGNORE INTO notices (account_id, period_key, key, body, created_at)"
                " VALUES (?, ?, 'statement', ?, ?)",
                (invoice.account_id, invoice.period_key, body, now.isoformat()),
            )

    async def pending_notices(self) -> list[sqlite3.Row]:
        return await self._read(
            "SELECT n.*, a.name AS account, a.contacts AS contacts FROM notices n"
            " JOIN accounts a ON a.id = n.account_id WHERE n.email_sent = 0 OR n.webhook_sent = 0"
            " ORDER BY n.created_at"
        )

    async def mark_notice(self, account_id: int, period_key: str, key: str, channel: str) -> None:
        column = {"email": "email_sent", "webhook": "webhook_sent"}[channel]
        async with self._tx() as db:
            await db.execute(
                f"UPDATE notices SET {column} = 1 WHERE account_id = ? AND period_key = ? AND key = ?",
                (account_id, period_key, key),
            )

    async def notices_of(self, account_id: int) -> list[sqlite3.Row]:
        return await self._read(
            "SELECT * FROM notices WHERE account_id = ? ORDER BY created_at, key", (account_id,)
        )

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

    # -- the audit trail of admin changes ----------------------------------------------

    @asynccontextmanager
    async def audited(self, draft: AuditDraft) -> AsyncIterator[AuditDraft]:
        """Record `draft` inside the next write transaction this task runs.

        Admin changes go through the meter, whose methods each run one transaction
        of their own; this puts the audit row into that same transaction (with the
        account's view read just after BEGIN IMMEDIATE and just before COMMIT), so a
        change is never committed without its audit event, nor an event without its
        change. A context variable carries the draft, so the SMTP sessions' transactions
        on the same connection (other tasks) never pick it up. No row is written when
        the target account does not exist (the change did nothing); a draft whose
        `event_id` was already recorded raises DuplicateEvent and rolls the change back.
        """
        token = _AUDIT_DRAFT.set(draft)
        try:
            yield draft
        finally:
            _AUDIT_DRAFT.reset(token)

    async def _audit_begin(self, db: aiosqlite.Connection) -> None:
        draft = _AUDIT_DRAFT.get()
        if draft is not None and not draft.written:
            draft.before = await self._audit_view(db, draft)

    async def _audit_end(self, db: aiosqlite.Connection) -> None:
        draft = _AUDIT_DRAFT.get()
        if draft is None or draft.written:
            return
        after = await self._audit_view(db, draft)
        if after is None:
            return
        try:
            cursor = await db.execute(
                "INSERT INTO audit_events (time, actor, action, target, before, after, detail, event_id)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (draft.at.isoformat(), draft.actor, draft.action, draft.target,
                 None if draft.before is None else json.dumps(draft.before, sort_keys=True),
                 json.dumps(after, sort_keys=True), json.dumps(draft.detail, sort_keys=True), draft.event_id),
            )
        except sqlite3.IntegrityError:
            raise DuplicateEvent(f"event {draft.event_id!r} was already applied") from None
        draft.after, draft.written, draft.id = after, True, cursor.lastrowid

    async def _audit_view(self, db: aiosqlite.Connection, draft: AuditDraft) -> dict[str, Any] | None:
        cursor = await db.execute(f"{_ACCOUNT_SELECT} WHERE a.name = ?", (draft.target,))
        row = await cursor.fetchone()
        if row is None:
            return None
        domains = await (await db.execute(
            "SELECT domain FROM account_domains WHERE account_id = ? ORDER BY domain", (row["id"],))).fetchall()
        networks = await (await db.execute(
            "SELECT network FROM account_networks WHERE account_id = ? ORDER BY network", (row["id"],))).fetchall()
        return draft.view(account_core(row, tuple(r[0] for r in domains), tuple(r[0] for r in networks)))

    async def add_audit_event(
        self,
        at: datetime,
        actor: str,
        action: str,
        target: str,
        before: object,
        after: object,
        detail: dict[str, Any],
    ) -> int:
        """An audit event for a change that is not one account's (a billing run)."""
        async with self._tx() as db:
            cursor = await db.execute(
                "INSERT INTO audit_events (time, actor, action, target, before, after, detail)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (at.isoformat(), actor, action, target,
                 None if before is None else json.dumps(before, sort_keys=True),
                 None if after is None else json.dumps(after, sort_keys=True), json.dumps(detail, sort_keys=True)),
            )
            return int(cursor.lastrowid or 0)

    async def audit_events(self, target: str | None = None, limit: int = 100) -> list[sqlite3.Row]:
        """The newest `limit` events, newest first; only those of `target` when given."""
        sql = "SELECT * FROM audit_events"
        if target is None:
            return await self._read(sql + " ORDER BY id DESC LIMIT ?", (limit,))
        return await self._read(sql + " WHERE target = ? ORDER BY id DESC LIMIT ?", (target, limit))

    async def audit_event_for(self, event_id: str) -> sqlite3.Row | None:
        rows = await self._read("SELECT * FROM audit_events WHERE event_id = ?", (event_id,))
        return rows[0] if rows else None

    async def ping(self) -> None:
        """Raise StoreUnavailable unless the database answers (for health checks)."""
        await self._read("SELECT 1")


_AUDIT_DRAFT: ContextVar[AuditDraft | None] = ContextVar("mailmeter_audit_draft", default=None)


def _account_row(conn: sqlite3.Connection, account_id: int) -> Account:
    row = conn.execute(f"{_ACCOUNT_SELECT} WHERE a.id = ?", (account_id,)).fetchone()
    if row is None:
        raise LookupError(f"account id {account_id} is gone")
    return account_core(row)


_FULL_ACCOUNT_SELECT = (
    "SELECT a.*, (SELECT COALESCE(SUM(i.amount_due), 0) FROM invoices i"
    f" WHERE i.account_id = a.id AND i.status = 'overdrawn') AS debt, {_OPEN_PERIODS},"
    " (SELECT group_concat(domain, ' ') FROM (SELECT domain FROM account_domains"
    "  WHERE account_id = a.id ORDER BY domain)) AS domain_list,"
    " (SELECT group_concat(network, ' ') FROM (SELECT network FROM account_networks"
    "  WHERE account_id = a.id ORDER BY network)) AS network_list"
    " FROM accounts a"
)


def _full_account(conn: sqlite3.Connection, where: str, value: object) -> Account | None:
    """An account with its domains and networks, in one query (it is read on every MAIL)."""
    row = conn.execute(f"{_FULL_ACCOUNT_SELECT} WHERE {where}", (value,)).fetchone()
    return None if row is None else _account_with_lists(row)


def _account_with_lists(row: sqlite3.Row) -> Account:
    """A _FULL_ACCOUNT_SELECT row: domains and networks never hold spaces."""
    return account_core(
        row, tuple((row["domain_list"] or "").split()), tuple((row["network_list"] or "").split())
    )


def _usage_row(conn: sqlite3.Connection, account_id: int, period_key: str, awaiting_results: int | None) -> Usage:
    row = conn.execute(
        "SELECT accepted, reserved, delivered, soft_bounced, hard_bounced, history FROM period_usage"
        " WHERE account_id = ? AND period_key = ?",
        (account_id, period_key),
    ).fetchone()
    return _usage_of(row, awaiting_results)


def _usage_of(row: sqlite3.Row | None, awaiting_results: int | None) -> Usage:
    """A period's counters and history from (accepted, reserved, delivered, soft, hard, history)."""
    if row is None:
        return Usage(awaiting_results=awaiting_results)
    return Usage(accepted=row[0], reserved=row[1], delivered=row[2], soft_bounced=row[3], hard_bounced=row[4],
                 awaiting_results=awaiting_results, history=history_from_json(row[5]))


def _insert_charge_sync(
    conn: sqlite3.Connection, account: Account, period_key: str, charge: Charge, now: datetime
) -> None:
    conn.execute(
        "INSERT OR IGNORE INTO charges (idempotency_key, account_id, period_key, kind, seq, amount,"
        " emails_unlocked, description, created_at, next_attempt_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (charge_key(account.name, period_key, charge.key), account.id, period_key, charge.kind, charge.index,
         charge.amount, charge.emails_unlocked, charge.description, now.isoformat(), now.isoformat()),
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
        conn.execute("UPDATE accounts SET awaiting_results = MAX(awaiting_results - 1, 0) WHERE id = ?",
                     (account_id,))
        conn.execute(
            f"INSERT INTO period_usage (account_id, period_key, {counter}) VALUES (?, ?, 1)"
            f" ON CONFLICT (account_id, period_key) DO UPDATE SET {counter} = {counter} + 1",
            (account_id, period_key),
        )
    return True


def _in_snapshot(conn: sqlite3.Connection, operation: Callable[[sqlite3.Connection], _T]) -> _T:
    """A read of several statements sees one commit, not a write landing between them."""
    conn.execute("BEGIN")
    try:
        return operation(conn)
    finally:
        conn.execute("COMMIT")  # reads only: ends the snapshot, writes nothing


def _fetch_all(conn: sqlite3.Connection, sql: str, params: tuple[object, ...]) -> list[sqlite3.Row]:
    cursor = conn.execute(sql, params)
    try:
        return cursor.fetchall()
    finally:
        cursor.close()


_LOCK_POLL = 0.0002  # seconds before the second try for the write lock; doubling from there
_LOCK_POLL_MAX = 0.002  # at most this between tries: a long hold (a slow disk) costs few tries


def _begin_immediate(conn: sqlite3.Connection, timeout: float) -> None:
    """BEGIN IMMEDIATE, trying again after 0.2, 0.4, 0.8, 1.6, 2, 2... ms while another
    connection writes.

    With several relay processes on one file (listen.processes, the CLI) the write lock
    is often taken, usually for well under a millisecond. SQLite's own busy handler
    sleeps 1, 2, 5, 10, 15... up to 100 ms between tries, so a waiting writer lost far
    more than the lock was held. Fixed 0.2 ms polling, tried first, burnt CPU while a
    slow disk held the lock for tens of milliseconds: hence the doubling, capped at 2 ms.
    """
    deadline = time.monotonic() + timeout
    pause = _LOCK_POLL
    while True:
        try:
            conn.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as error:
            if error.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY or time.monotonic() >= deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, _LOCK_POLL_MAX)


def _write_batch(
    conn: sqlite3.Connection,
    operations: list[Callable[[sqlite3.Connection], Any]],
    durable: bool = True,
    lock_timeout: float = 5.0,
) -> list[tuple[bool, Any]]:
    """Run write operations in one transaction, each in its own savepoint (group commit).

    Returns (True, result) or (False, exception) per operation. A failed BEGIN or COMMIT
    raises: then none of them happened. `durable`: COMMIT waits for the disk (see _run).
    """
    if not durable:
        conn.execute("PRAGMA synchronous = NORMAL")
    try:
        _begin_immediate(conn, lock_timeout)
        outcomes: list[tuple[bool, Any]] = []
        try:
            for operation in operations:
                conn.execute("SAVEPOINT op")
                try:
                    outcomes.append((True, operation(conn)))
                except Exception as error:
                    conn.execute("ROLLBACK TO op")
                    outcomes.append((False, error))
                conn.execute("RELEASE op")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    finally:
        if not durable:  # every other transaction on this connection waits for the disk
            conn.execute("PRAGMA synchronous = FULL")
    return outcomes
