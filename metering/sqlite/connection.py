"""The SQLite store's connection: one writer and one reader, the write lock, group-committed
transactions, migrations and the online backup; the other parts of SqliteStore build on it."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from mailmeter.metering.private_file import create_owner_only
from mailmeter.metering.records import StoreUnavailable
from mailmeter.metering.sqlite.schema import MIGRATIONS

_T = TypeVar("_T")


class SqliteConnection:
    """The connection and transactions every part of SqliteStore runs on (metering/sqlite/__init__.py)."""

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
                await db._execute(_begin_immediate, db._conn, self._busy_timeout_ms / 1000)  # type: ignore[no-untyped-call]
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

    async def _audit_begin(self, db: aiosqlite.Connection) -> None:
        """First in every `_tx` transaction, after BEGIN IMMEDIATE (SqliteAudit records a pending change's before)."""

    async def _audit_end(self, db: aiosqlite.Connection) -> None:
        """Last in every `_tx` transaction, before COMMIT (SqliteAudit writes a pending change's audit event)."""

    async def _run(self, operation: Callable[[sqlite3.Connection], _T], write: bool = True, durable: bool = True) -> _T:
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
                return await reader._execute(_in_snapshot, reader._conn, operation)  # type: ignore[no-any-return, no-untyped-call]
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
                    outcomes = await db._execute(  # type: ignore[no-untyped-call]
                        _write_batch, db._conn, [op for op, _, _ in batch], durable, self._busy_timeout_ms / 1000
                    )
                except (sqlite3.Error, StoreUnavailable, ValueError) as error:
                    failure = (
                        error if isinstance(error, StoreUnavailable) else StoreUnavailable(f"meter store: {error}")
                    )
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
            return await reader._execute(fetch_all, reader._conn, sql, tuple(params))  # type: ignore[no-any-return, no-untyped-call]
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
                for statement in statements(script):
                    await db.execute(statement)
                await db.execute("UPDATE schema_version SET version = ?", (number,))
                version = number
        return version

    async def schema_version(self) -> int:
        rows = await self._read("SELECT version FROM schema_version")
        return int(rows[0][0]) if rows else 0

    async def backup(self, target: Path) -> None:
        """A consistent online copy (SQLite's backup API), safe while the relay writes, in a new
        file only its owner may read (mode 0600, whatever the umask)."""
        if self._db is None:
            raise StoreUnavailable("the meter store is not open")
        create_owner_only(target)  # 0600 from the start: it holds password hashes
        try:
            async with self._lock:
                async with aiosqlite.connect(target) as copy:
                    await self._db.backup(copy)
        except BaseException:
            target.unlink(missing_ok=True)
            raise

    async def ping(self) -> None:
        """Raise StoreUnavailable unless the database answers (for health checks)."""
        await self._read("SELECT 1")


def statements(script: str) -> list[str]:
    """A migration's statements: split at each ';' that ends a complete statement (a trigger's
    body holds ';' of its own)."""
    found, pending = [], ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n;"):
                found.append(pending.strip())
            pending = ""
    if pending.strip(" \n;"):
        found.append(pending.strip())
    return found


def _in_snapshot(conn: sqlite3.Connection, operation: Callable[[sqlite3.Connection], _T]) -> _T:
    """A read of several statements sees one commit, not a write landing between them."""
    conn.execute("BEGIN")
    try:
        return operation(conn)
    finally:
        conn.execute("COMMIT")  # reads only: ends the snapshot, writes nothing


def fetch_all(conn: sqlite3.Connection, sql: str, params: tuple[object, ...]) -> list[sqlite3.Row]:
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
