"""The PostgreSQL store's foundation: the pool, one-transaction writes, locks, the audit hook.

Every write runs as one transaction through `_write`, which retries serialization
failures and deadlocks (metering/postgres/tx.py) and maps every other database error to
StoreUnavailable. A transaction that touches an account's counters, balance or
ledger locks that account's row first (`_lock`, `SELECT ... FOR UPDATE`) and reads
only after the lock is granted: under READ COMMITTED each later statement then sees
everything the previous lock holder committed. One lock, always first, also gives
every transaction the same lock order, so nodes queue instead of deadlocking.

An admin change's audit event goes into the change's own transaction, as in
SqliteStore.audited; here the transaction also locks the target account first, so
`before` and `after` bracket exactly this change while other nodes work on it.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

from mailmeter.metering.postgres import backup as pg_backup
from mailmeter.metering.postgres import schema as pg_schema
from mailmeter.metering.postgres.claim import NodeClaim
from mailmeter.metering.postgres.tx import DB_ERRORS, unavailable, with_retries
from mailmeter.metering.private_file import create_owner_only
from mailmeter.metering.records import Account, AuditDraft, DuplicateEvent, StoreUnavailable, account_core, charge_key
from mailmeter.policies.charges import Charge

T = TypeVar("T")

# The account with its overdrawn debt (as SqliteStore's), plus its domains and networks
# as arrays so one round trip reads a whole account.
# ... and the usage of the periods not invoiced yet, as SqliteStore's _OPEN_PERIODS.
OPEN_PERIODS = (
    "(SELECT string_agg(u.period_key || ' ' || u.accepted || ' ' || u.reserved || ' ' || u.delivered"
    " || ' ' || u.soft_bounced || ' ' || u.hard_bounced, ',') FROM period_usage u"
    " WHERE u.account_id = a.id AND u.period_key > COALESCE(a.settled_through, '')) AS open_periods"
)
ACCOUNT_SELECT = (
    "SELECT a.*, (SELECT COALESCE(SUM(i.amount_due), 0)::bigint FROM invoices i"
    f" WHERE i.account_id = a.id AND i.status = 'overdrawn') AS debt, {OPEN_PERIODS} FROM accounts a"
)
ACCOUNT_FULL = (
    "SELECT a.*, (SELECT COALESCE(SUM(i.amount_due), 0)::bigint FROM invoices i"
    f" WHERE i.account_id = a.id AND i.status = 'overdrawn') AS debt, {OPEN_PERIODS},"
    " ARRAY(SELECT d.domain FROM account_domains d WHERE d.account_id = a.id ORDER BY d.domain) AS domains,"
    " ARRAY(SELECT n.network FROM account_networks n WHERE n.account_id = a.id ORDER BY n.network) AS networks"
    " FROM accounts a"
)
AUDIT_DRAFT: ContextVar[AuditDraft | None] = ContextVar("mailmeter_pg_audit_draft", default=None)


def full_account(row: asyncpg.Record) -> Account:
    """An Account from an ACCOUNT_FULL row."""
    return account_core(row, tuple(row["domains"]), tuple(row["networks"]))


class PgBase:
    def __init__(
        self,
        url: str,
        pool_size: int = 10,
        server_settings: Mapping[str, str] | None = None,
        retries: int = 5,
        connect_timeout: float = 5.0,
        command_timeout: float = 30.0,
        acquire_timeout: float = 10.0,
    ) -> None:
        """`retries`: how often a transaction that lost a serialization or deadlock race is
        run again; `acquire_timeout`: how long a call waits for a free pooled connection
        (then StoreUnavailable: 451); `command_timeout`: for one statement, lock waits included.
        Extra `server_settings` (e.g. search_path) apply to every connection."""
        self.url = url
        self._pool_size = pool_size
        self._server_settings = dict(server_settings or {})
        self._retries = retries
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._acquire_timeout = acquire_timeout
        self._pool: asyncpg.Pool | None = None
        self._claim: NodeClaim | None = None

    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self.url,
                min_size=1,
                max_size=self._pool_size,
                timeout=self._connect_timeout,
                command_timeout=self._command_timeout,
                server_settings=self._server_settings or None,
            )
        except DB_ERRORS as error:
            raise unavailable(error) from error
        except ValueError as error:  # a DSN asyncpg cannot parse
            raise StoreUnavailable(f"meter store (PostgreSQL): bad database.url: {error}") from error
        try:
            await self.migrate()
        except BaseException:
            await self.close()  # a half-open store holds no connections
            raise

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()
        claim, self._claim = self._claim, None
        if claim is not None:
            await claim.release()

    async def claim_node(self, node: str, owner: str) -> NodeClaim:
        """Claim `node` for this process for as long as the store is open (metering/postgres/claim.py).
        Raises NodeClaimed when another live process holds the name."""
        claim = NodeClaim(self.url, self._server_settings, node, owner, self._connect_timeout)
        await claim.take()
        self._claim = claim
        return claim

    def _open_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StoreUnavailable("the meter store is not open")
        return self._pool

    # -- transactions and reads -------------------------------------------------

    async def _write(self, body: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """Run `body` as one transaction (with the pending audit draft), retrying conflicts."""
        pool = self._open_pool()
        draft = AUDIT_DRAFT.get()
        if draft is not None and draft.written:
            draft = None
        saved_before = draft.before if draft is not None else None

        async def attempt() -> T:
            async with pool.acquire(timeout=self._acquire_timeout) as conn:
                async with conn.transaction():
                    if draft is not None:
                        draft.before = await self._audit_view(conn, draft, lock=True)
                    result = await body(conn)
                    audit = await self._audit_insert(conn, draft) if draft is not None else None
            if draft is not None and audit is not None:  # committed: now the draft is written
                draft.after, draft.id, draft.written = audit[0], audit[1], True
            return result

        def undo() -> None:
            if draft is not None:
                draft.before = saved_before

        return await with_retries(attempt, self._retries, on_failure=undo)

    async def _fetch(self, sql: str, *args: object) -> list[asyncpg.Record]:
        try:
            async with self._open_pool().acquire(timeout=self._acquire_timeout) as conn:
                return list(await conn.fetch(sql, *args))
        except DB_ERRORS as error:
            raise unavailable(error) from error

    async def _fetchrow(self, sql: str, *args: object) -> asyncpg.Record | None:
        rows = await self._fetch(sql, *args)
        return rows[0] if rows else None

    async def migrate(self) -> int:
        """Apply pending migrations (advisory-locked: nodes may upgrade at once)."""
        try:
            async with self._open_pool().acquire(timeout=self._acquire_timeout) as conn:
                return await pg_schema.migrate(conn)
        except DB_ERRORS as error:
            raise unavailable(error) from error

    async def schema_version(self) -> int:
        row = await self._fetchrow("SELECT version FROM schema_version")
        return int(row[0]) if row else 0

    async def backup(self, target: Path) -> None:
        """A consistent online copy of this store's schema (pg_dump, one snapshot), in a new
        file only its owner may read (mode 0600, whatever the umask)."""
        row = await self._fetchrow("SELECT current_schema()")
        create_owner_only(target)  # pg_dump writes into it, keeping the mode
        await pg_backup.dump(self.url, str(row[0]) if row else "public", target)

    # -- locks --------------------------------------------------------------------

    @staticmethod
    async def _lock(conn: asyncpg.Connection, account_id: int) -> bool:
        """Lock the account row for the rest of the transaction; False if there is none."""
        return await conn.fetchval("SELECT id FROM accounts WHERE id = $1 FOR UPDATE", account_id) is not None

    @staticmethod
    async def _lock_named(conn: asyncpg.Connection, name: str) -> int | None:
        account_id = await conn.fetchval("SELECT id FROM accounts WHERE name = $1 FOR UPDATE", name)
        return None if account_id is None else int(account_id)

    async def _account_in_tx(self, conn: asyncpg.Connection, account_id: int) -> Account:
        row = await conn.fetchrow(f"{ACCOUNT_SELECT} WHERE a.id = $1", account_id)
        if row is None:
            raise LookupError(f"account id {account_id} is gone")
        return account_core(row)

    @staticmethod
    async def _insert_charges(
        conn: asyncpg.Connection, account: Account, period_key: str, charges: list[Charge], now: datetime
    ) -> None:
        """Insert charges under their idempotency keys; a key already there is left alone."""
        if not charges:
            return
        await conn.executemany(
            "INSERT INTO charges (idempotency_key, account_id, period_key, kind, seq, amount, emails_unlocked,"
            " description, created_at, next_attempt_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
            " ON CONFLICT (idempotency_key) DO NOTHING",
            [
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
                )
                for charge in charges
            ],
        )

    # -- the audit hook of admin changes (PgAudit.audited sets the draft) ---------------

    async def _audit_view(
        self, conn: asyncpg.Connection, draft: AuditDraft, lock: bool = False
    ) -> dict[str, Any] | None:
        if lock and await self._lock_named(conn, draft.target) is None:
            return None
        row = await conn.fetchrow(f"{ACCOUNT_FULL} WHERE a.name = $1", draft.target)
        return None if row is None else draft.view(full_account(row))

    async def _audit_insert(self, conn: asyncpg.Connection, draft: AuditDraft) -> tuple[dict[str, Any], int] | None:
        """Write the draft's event at the end of the change's transaction; None if no account."""
        after = await self._audit_view(conn, draft)
        if after is None:
            return None
        try:
            event_id = await conn.fetchval(
                "INSERT INTO audit_events (time, actor, action, target, before, after, detail, event_id)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
                draft.at.isoformat(),
                draft.actor,
                draft.action,
                draft.target,
                None if draft.before is None else json.dumps(draft.before, sort_keys=True),
                json.dumps(after, sort_keys=True),
                json.dumps(draft.detail, sort_keys=True),
                draft.event_id,
            )
        except asyncpg.UniqueViolationError:
            raise DuplicateEvent(f"event {draft.event_id!r} was already applied") from None
        return after, int(event_id)

    async def ping(self) -> None:
        """Raise StoreUnavailable unless the database answers (for health checks)."""
        await self._fetch("SELECT 1")
