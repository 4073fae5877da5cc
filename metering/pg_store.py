"""The shared store: one PostgreSQL database for every relay node, through an asyncpg pool.

Same interface and guarantees as SqliteStore (metering/store.py), for several
nodes at once:

- Every state change is one transaction. One that touches an account's counters,
  balance or ledger first locks that account's row (`SELECT ... FOR UPDATE`), and
  reads only after the lock is granted (READ COMMITTED: each later statement sees
  everything the previous lock holder committed). So a reserve reads the counters,
  runs the pure `decide`, and writes the hold with no other node in between: no
  overspend however many nodes race. Locking the account first, always, also gives
  every transaction the same lock order, so they queue instead of deadlocking.
- A charge goes in with `ON CONFLICT DO NOTHING` on its idempotency key: never twice.
- An invoice is unique per (account, period): when several nodes close a period at
  once exactly one insert wins, and only that transaction deducts prepaid and adds
  the collection charge.
- An admin change's audit event is written in the change's own transaction, as in
  SqliteStore.audited (here the target account is also locked for the whole
  transaction, so before/after are exactly what this change saw and left).
- Serialization failures and deadlocks are retried (metering/pg_tx.py); any other
  failure is StoreUnavailable, so the relay fails closed with 451.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from contextvars import ContextVar
from datetime import date, datetime
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

from metering import pg_backup, pg_schema
from metering.pg_tx import DB_ERRORS, rows_affected, unavailable, with_retries
from metering.records import Account, Result, limit_change_to_json
from metering.sqlite_store import (
    AuditDraft,
    DuplicateEvent,
    InvoiceRecord,
    Settlement,
    StoreUnavailable,
    UnknownHold,
    account_core,
    charge_key,
)
from policies.charges import Charge
from policies.decision import Admission, Usage
from policies.limits import LimitChange

T = TypeVar("T")
Conn = asyncpg.Connection

# The account with its overdrawn debt (as SqliteStore's), plus its domains and networks
# as arrays so one round trip reads a whole account.
_ACCOUNT_SELECT = (
    "SELECT a.*, (SELECT COALESCE(SUM(i.amount_due), 0)::bigint FROM invoices i"
    " WHERE i.account_id = a.id AND i.status = 'overdrawn') AS debt FROM accounts a"
)
_ACCOUNT_FULL = (
    "SELECT a.*, (SELECT COALESCE(SUM(i.amount_due), 0)::bigint FROM invoices i"
    " WHERE i.account_id = a.id AND i.status = 'overdrawn') AS debt,"
    " ARRAY(SELECT d.domain FROM account_domains d WHERE d.account_id = a.id ORDER BY d.domain) AS domains,"
    " ARRAY(SELECT n.network FROM account_networks n WHERE n.account_id = a.id ORDER BY n.network) AS networks"
    " FROM accounts a"
)
_INVOICE_COLUMNS = (
    "id, account_id, period_key, period_end, issued_at, invoice_date, due_date, statement_date,"
    " total, amount_due, prepaid_applied, status, body"
)
_COUNTER_FOR_RESULT = {
    Result.DELIVERED: "delivered",
    Result.SOFT_BOUNCED: "soft_bounced",
    Result.HARD_BOUNCED: "hard_bounced",
}
_AUDIT_DRAFT: ContextVar[AuditDraft | None] = ContextVar("mailmeter_pg_audit_draft", default=None)


def _full_account(row: asyncpg.Record) -> Account:
    return account_core(row, tuple(row["domains"]), tuple(row["networks"]))


class PgStore:
    def __init__(
        self,
        url: str,
        pool_size: int = 10,
        server_settings: Mapping[str, str] | None = None,
        retries: int = 5,
        connect_timeout: float = 5.0,
        command_timeout: float = 30.0,
    ) -> None:
        self.url = url
        self._pool_size = pool_size
        self._server_settings = dict(server_settings or {})
        self._retries = retries
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._pool: asyncpg.Pool | None = None

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
        await self.migrate()

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    def _open_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StoreUnavailable("the meter store is not open")
        return self._pool

    # -- transactions and reads -------------------------------------------------

    async def _write(self, body: Callable[[Conn], Awaitable[T]]) -> T:
        """Run `body` as one transaction (with the pending audit draft), retrying conflicts."""
        pool = self._open_pool()
        draft = _AUDIT_DRAFT.get()
        if draft is not None and draft.written:
            draft = None
        saved_before = draft.before if draft is not None else None

        async def attempt() -> T:
            async with pool.acquire(timeout=self._connect_timeout) as conn:
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
            async with self._open_pool().acquire(timeout=self._connect_timeout) as conn:
                return list(await conn.fetch(sql, *args))
        except DB_ERRORS as error:
            raise unavailable(error) from error

    async def _fetchrow(self, sql: str, *args: object) -> asyncpg.Record | None:
        rows = await self._fetch(sql, *args)
        return rows[0] if rows else None

    async def migrate(self) -> int:
        """Apply pending migrations (advisory-locked: nodes may upgrade at once)."""
        try:
            async with self._open_pool().acquire(timeout=self._connect_timeout) as conn:
                return await pg_schema.migrate(conn)
        except DB_ERRORS as error:
            raise unavailable(error) from error

    async def schema_version(self) -> int:
        row = await self._fetchrow("SELECT version FROM schema_version")
        return int(row[0]) if row else 0

    async def backup(self, target: Path) -> None:
        """A consistent online copy of this store's schema (pg_dump, one snapshot)."""
        if target.exists():
            raise FileExistsError(f"{target} exists; choose a new file for the backup")
        row = await self._fetchrow("SELECT current_schema()")
        await pg_backup.dump(self.url, str(row[0]) if row else "public", target)

    # -- locks --------------------------------------------------------------------

    @staticmethod
    async def _lock(conn: Conn, account_id: int) -> bool:
        """Lock the account row for the rest of the transaction; False if there is none."""
        return await conn.fetchval("SELECT id FROM accounts WHERE id = $1 FOR UPDATE", account_id) is not None

    @staticmethod
    async def _lock_named(conn: Conn, name: str) -> int | None:
        account_id = await conn.fetchval("SELECT id FROM accounts WHERE name = $1 FOR UPDATE", name)
        return None if account_id is None else int(account_id)

    # -- accounts -------------------------------------------------------------------

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
    ) -> None:
        domain_list, network_list, contact_list = list(domains), list(networks), list(contacts)

        async def body(conn: Conn) -> None:
            try:
                account_id = await conn.fetchval(
                    "INSERT INTO accounts (name, password_hash, plan, subscribed_on, created_at, contacts)"
                    " VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
                    name, password_hash, plan, subscribed_on.isoformat(), now.isoformat(), json.dumps(contact_list),
                )
            except asyncpg.UniqueViolationError:
                raise ValueError(f"account {name!r} already exists") from None
            if domain_list:
                await conn.executemany(
                    "INSERT INTO account_domains VALUES ($1, $2) ON CONFLICT DO NOTHING",
                    [(account_id, domain) for domain in domain_list],
                )
            if network_list:
                await conn.executemany(
                    "INSERT INTO account_networks VALUES ($1, $2) ON CONFLICT DO NOTHING",
                    [(account_id, network) for network in network_list],
                )

        await self._write(body)

    async def set_payment(self, name: str, ok: bool, detail: str, now: datetime) -> bool:
        """Block or release sending. A release also retries the charges that failed."""

        async def body(conn: Conn) -> bool:
            account_id = await self._lock_named(conn, name)
            if account_id is None:
                return False
            await conn.execute(
                "UPDATE accounts SET payment_ok = $1, payment_detail = $2 WHERE id = $3",
                int(ok), detail[:500], account_id,
            )
            if ok:
                await conn.execute(
                    "UPDATE charges SET status = 'pending', next_attempt_at = $1"
                    " WHERE status = 'failed' AND account_id = $2",
                    now.isoformat(), account_id,
                )
            return True

        return await self._write(body)

    async def add_balance(self, name: str, amount: int, kind: str, reference: str, now: datetime) -> int:
        """Add to (or, negative, take from) the prepaid balance; returns the new balance."""

        async def body(conn: Conn) -> int:
            row = await conn.fetchrow("SELECT id, prepaid_balance FROM accounts WHERE name = $1 FOR UPDATE", name)
            if row is None:
                raise LookupError(f"no account named {name!r} (see `mailmeter account list`)")
            await conn.execute(
                "UPDATE accounts SET prepaid_balance = prepaid_balance + $1 WHERE id = $2", amount, row["id"]
            )
            await conn.execute(
                "INSERT INTO balance_entries (account_id, amount, kind, reference, created_at)"
                " VALUES ($1, $2, $3, $4, $5)",
                row["id"], amount, kind, reference, now.isoformat(),
            )
            return int(row["prepaid_balance"]) + amount

        return await self._write(body)

    async def set_spending_limit(self, name: str, micros: int | None) -> bool:
        async def body(conn: Conn) -> bool:
            status = await conn.execute(
                "UPDATE accounts SET spending_limit_override = $1 WHERE name = $2", micros, name
            )
            return rows_affected(status) == 1

        return await self._write(body)

    async def set_limit_change(self, name: str, which: str, change: LimitChange) -> bool:
        column = {"included": "included_change", "quota": "quota_change"}[which]

        async def body(conn: Conn) -> bool:
            status = await conn.execute(
                f"UPDATE accounts SET {column} = $1 WHERE name = $2", limit_change_to_json(change), name
            )
            return rows_affected(status) == 1

        return await self._write(body)

    async def repay(self, name: str, now: datetime) -> int:
        """Settle every overdrawn invoice of the account at once; returns the amount repaid."""

        async def body(conn: Conn) -> int:
            account_id = await self._lock_named(conn, name)
            if account_id is None:
                raise LookupError(f"no account named {name!r} (see `mailmeter account list`)")
            amount = int(await conn.fetchval(
                "SELECT COALESCE(SUM(amount_due), 0)::bigint FROM invoices"
                " WHERE account_id = $1 AND status = 'overdrawn'",
                account_id,
            ))
            if amount:
                await conn.execute(
                    "UPDATE invoices SET status = 'paid' WHERE account_id = $1 AND status = 'overdrawn'", account_id
                )
                await conn.execute(
                    "INSERT INTO balance_entries (account_id, amount, kind, reference, created_at)"
                    " VALUES ($1, $2, 'repay', '', $3)",
                    account_id, amount, now.isoformat(),
                )
            return amount

        return await self._write(body)

    async def get_account(self, name: str) -> Account | None:
        row = await self._fetchrow(f"{_ACCOUNT_FULL} WHERE a.name = $1", name)
        return None if row is None else _full_account(row)

    async def get_account_by_id(self, account_id: int) -> Account | None:
        row = await self._fetchrow(f"{_ACCOUNT_FULL} WHERE a.id = $1", account_id)
        return None if row is None else _full_account(row)

    async def list_accounts(self) -> list[Account]:
        return [_full_account(row) for row in await self._fetch(f"{_ACCOUNT_FULL} ORDER BY a.name")]

    async def all_networks(self) -> list[tuple[str, str]]:
        rows = await self._fetch(
            "SELECT n.network, a.name FROM account_networks n JOIN accounts a ON a.id = n.account_id"
        )
        return [(row[0], row[1]) for row in rows]

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
    ) -> Admission:
        """Atomically: lock the account, read it and the period's counters, ask `decide`, add the grant."""

        async def body(conn: Conn) -> Admission:
            await self._lock(conn, account_id)
            account = await self._account_in_tx(conn, account_id)
            usage = await self._usage(conn, account_id, period_key, account.awaiting_results)
            admission = decide(account, usage)
            if admission.granted > 0:
                await conn.execute(
                    "INSERT INTO period_usage (account_id, period_key, reserved) VALUES ($1, $2, $3)"
                    " ON CONFLICT (account_id, period_key) DO UPDATE"
                    " SET reserved = period_usage.reserved + excluded.reserved",
                    account_id, period_key, admission.granted,
                )
                await conn.execute(
                    "INSERT INTO holds (id, account_id, period_key, emails, node, created_at)"
                    " VALUES ($1, $2, $3, $4, $5, $6)"
                    " ON CONFLICT (id) DO UPDATE SET emails = holds.emails + excluded.emails",
                    hold_id, account_id, period_key, admission.granted, node, now.isoformat(),
                )
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
    ) -> None:
        """The commit point of a message: its usage, its queue id, and the charges and
        notices that usage makes due, in one transaction.

        Idempotent on queue_id (checked again once the account is locked, so two
        commits of one message on two connections count it once). Emails held beyond
        `emails` go back to the account. Charges go in under their idempotency key.
        """

        async def body(conn: Conn) -> None:
            if await conn.fetchval("SELECT 1 FROM messages WHERE queue_id = $1", queue_id):
                return
            owner = await conn.fetchval("SELECT account_id FROM holds WHERE id = $1", hold_id)
            if owner is None:
                raise UnknownHold(hold_id)
            await self._lock(conn, owner)
            if await conn.fetchval("SELECT 1 FROM messages WHERE queue_id = $1", queue_id):
                return
            row = await conn.fetchrow("SELECT account_id, period_key, emails FROM holds WHERE id = $1", hold_id)
            if row is None:
                raise UnknownHold(hold_id)
            account_id, period_key, held = row["account_id"], row["period_key"], row["emails"]
            if emails > held:
                raise ValueError(f"commit of {emails} emails exceeds the {held} held")
            await conn.execute(
                "UPDATE period_usage SET reserved = reserved - $1, accepted = accepted + $2"
                " WHERE account_id = $3 AND period_key = $4",
                held, emails, account_id, period_key,
            )
            await conn.execute("DELETE FROM holds WHERE id = $1", hold_id)
            await conn.execute(
                "INSERT INTO messages (queue_id, account_id, period_key, recipients, node, accepted_at, region)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7)",
                queue_id, account_id, period_key, emails, node, now.isoformat(), region,
            )
            await conn.execute(
                "UPDATE accounts SET awaiting_results = awaiting_results + $1 WHERE id = $2", emails, account_id
            )
            await conn.execute(
                "INSERT INTO usage_breakdown (account_id, period_key, campaign, region, accepted)"
                " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (account_id, period_key, campaign, region)"
                " DO UPDATE SET accepted = usage_breakdown.accepted + excluded.accepted",
                account_id, period_key, campaign, region, emails,
            )
            if settle is not None:
                account = await self._account_in_tx(conn, account_id)
                usage = await self._usage(conn, account_id, period_key, account.awaiting_results)
                last_seq = int(await conn.fetchval(
                    "SELECT COALESCE(MAX(seq), 0) FROM charges WHERE account_id = $1 AND period_key = $2"
                    " AND kind != 'invoice'",
                    account_id, period_key,
                ))
                settlement = settle(account, usage, last_seq, period_key)
                await self._insert_charges(conn, account, period_key, settlement.charges, now)
                if settlement.notices:
                    await conn.executemany(
                        "INSERT INTO notices (account_id, period_key, key, body, created_at)"
                        " VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                        [(account_id, period_key, key, text, now.isoformat()) for key, text in settlement.notices],
                    )

        await self._write(body)

    async def release(self, hold_id: str) -> int:
        """Return a hold's emails to the account; returns how many (0 if already gone)."""

        async def body(conn: Conn) -> int:
            owner = await conn.fetchval("SELECT account_id FROM holds WHERE id = $1", hold_id)
            if owner is None:
                return 0
            await self._lock(conn, owner)
            return await self._release(conn, hold_id)

        return await self._write(body)

    @staticmethod
    async def _release(conn: Conn, hold_id: str) -> int:
        """Delete the hold (the caller holds its account's lock) and give its emails back."""
        row = await conn.fetchrow(
            "DELETE FROM holds WHERE id = $1 RETURNING account_id, period_key, emails", hold_id
        )
        if row is None:
            return 0
        await conn.execute(
            "UPDATE period_usage SET reserved = reserved - $1 WHERE account_id = $2 AND period_key = $3",
            row["emails"], row["account_id"], row["period_key"],
        )
        return int(row["emails"])

    async def release_node_holds(self, node: str) -> int:
        """Release every hold a node left behind (it restarted: its sessions are gone).

        Only that node's holds: the other nodes' sessions are alive and keep theirs.
        """

        async def body(conn: Conn) -> int:
            rows = await conn.fetch(
                "SELECT id, account_id FROM holds WHERE node = $1 ORDER BY account_id, id", node
            )
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
    ) -> bool:
        """Record a recipient's result; a final result is counted exactly once.

        The account lock serializes two reports of the same recipient (a retry after a
        crash, on any node): the second sees the first's final result and returns False.
        """

        async def body(conn: Conn) -> bool:
            await self._lock(conn, account_id)
            previous = await conn.fetchval(
                "SELECT result FROM recipient_results WHERE queue_id = $1 AND recipient = $2", queue_id, recipient
            )
            if previous is not None and Result(previous).final:
                return False
            await conn.execute(
                "INSERT INTO recipient_results (queue_id, recipient, result, period_key, detail, updated_at)"
                " VALUES ($1, $2, $3, $4, $5, $6)"
                " ON CONFLICT (queue_id, recipient) DO UPDATE SET result = excluded.result,"
                " period_key = excluded.period_key, detail = excluded.detail, updated_at = excluded.updated_at",
                queue_id, recipient, result.value, period_key, detail[:500], now.isoformat(),
            )
            counter = _COUNTER_FOR_RESULT.get(result)
            if counter is not None:
                await conn.execute(
                    "UPDATE accounts SET awaiting_results = GREATEST(awaiting_results - 1, 0) WHERE id = $1",
                    account_id,
                )
                await conn.execute(
                    f"INSERT INTO period_usage (account_id, period_key, {counter}) VALUES ($1, $2, 1)"
                    f" ON CONFLICT (account_id, period_key) DO UPDATE SET {counter} = period_usage.{counter} + 1",
                    account_id, period_key,
                )
            return True

        return await self._write(body)

    async def usage(self, account_id: int, period_key: str, awaiting_results: int | None = None) -> Usage:
        row = await self._fetchrow(
            "SELECT accepted, reserved, delivered, soft_bounced, hard_bounced FROM period_usage"
            " WHERE account_id = $1 AND period_key = $2",
            account_id, period_key,
        )
        return _usage_of(row, awaiting_results)

    async def _account_in_tx(self, conn: Conn, account_id: int) -> Account:
        row = await conn.fetchrow(f"{_ACCOUNT_SELECT} WHERE a.id = $1", account_id)
        if row is None:
            raise LookupError(f"account id {account_id} is gone")
        return account_core(row)

    @staticmethod
    async def _usage(conn: Conn, account_id: int, period_key: str, awaiting_results: int | None) -> Usage:
        row = await conn.fetchrow(
            "SELECT accepted, reserved, delivered, soft_bounced, hard_bounced FROM period_usage"
            " WHERE account_id = $1 AND period_key = $2",
            account_id, period_key,
        )
        return _usage_of(row, awaiting_results)

    @staticmethod
    async def _insert_charges(
        conn: Conn, account: Account, period_key: str, charges: list[Charge], now: datetime
    ) -> None:
        """Insert charges under their idempotency keys; a key already there is left alone."""
        if not charges:
            return
        await conn.executemany(
            "INSERT INTO charges (idempotency_key, account_id, period_key, kind, seq, amount, emails_unlocked,"
            " description, created_at, next_attempt_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
            " ON CONFLICT (idempotency_key) DO NOTHING",
            [
                (charge_key(account.name, period_key, charge.key), account.id, period_key, charge.kind,
                 charge.index, charge.amount, charge.emails_unlocked, charge.description,
                 now.isoformat(), now.isoformat())
                for charge in charges
            ],
        )

    async def deferred_recipients(self, account_id: int) -> int:
        row = await self._fetchrow(
            "SELECT COUNT(*) FROM recipient_results r JOIN messages m ON m.queue_id = r.queue_id"
            " WHERE r.result = 'deferred' AND m.account_id = $1",
            account_id,
        )
        return int(row[0]) if row else 0

    # -- ledger: charges, invoices, notices, breakdowns ----------------------------------

    async def charges_due_for_collection(self, now: datetime, limit: int = 100) -> list[asyncpg.Record]:
        return await self._fetch(
            "SELECT c.*, a.name AS account FROM charges c JOIN accounts a ON a.id = c.account_id"
            " WHERE c.status = 'pending' AND c.next_attempt_at <= $1 ORDER BY c.created_at LIMIT $2",
            now.isoformat(), limit,
        )

    async def charge(self, key: str) -> asyncpg.Record | None:
        return await self._fetchrow(
            "SELECT c.*, a.name AS account FROM charges c JOIN accounts a ON a.id = c.account_id"
            " WHERE c.idempotency_key = $1",
            key,
        )

    async def charges_of(self, account_id: int, period_key: str | None = None) -> list[asyncpg.Record]:
        if period_key is None:
            return await self._fetch(
                "SELECT * FROM charges WHERE account_id = $1 ORDER BY created_at, seq", account_id
            )
        return await self._fetch(
            "SELECT * FROM charges WHERE account_id = $1 AND period_key = $2 ORDER BY created_at, seq",
            account_id, period_key,
        )

    async def set_charge_result(
        self, key: str, status: str, detail: str, attempts: int, next_attempt_at: datetime
    ) -> bool:
        """Record a gateway verdict. A failed charge blocks the account's sending at once.

        Only a charge still pending or submitted changes (a late duplicate verdict is ignored).
        """

        async def body(conn: Conn) -> bool:
            owner = await conn.fetchval("SELECT account_id FROM charges WHERE idempotency_key = $1", key)
            if owner is None:
                return False
            await self._lock(conn, owner)
            changed = rows_affected(await conn.execute(
                "UPDATE charges SET status = $1, detail = $2, attempts = $3, next_attempt_at = $4"
                " WHERE idempotency_key = $5 AND status IN ('pending', 'submitted')",
                status, detail[:500], attempts, next_attempt_at.isoformat(), key,
            )) == 1
            if changed and status == "failed":
                await conn.execute(
                    "UPDATE accounts SET payment_ok = 0, payment_detail = $1 WHERE id = $2",
                    f"charge {key} failed: {detail}"[:500], owner,
                )
            if changed and status == "succeeded":
                await conn.execute(
                    "UPDATE invoices SET status = 'paid' WHERE (account_id, period_key) ="
                    " (SELECT account_id, period_key FROM charges WHERE idempotency_key = $1 AND kind = 'invoice')",
                    key,
                )
            return changed

        return await self._write(body)

    async def last_invoiced_period(self, account_id: int) -> str | None:
        row = await self._fetchrow("SELECT MAX(period_key) FROM invoices WHERE account_id = $1", account_id)
        return row[0] if row else None

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
        once, they queue on the account's lock, exactly one insert wins and only that
        one deducts and charges; the others insert nothing and return False.
        """

        async def body(conn: Conn) -> bool:
            await self._lock(conn, invoice.account_id)
            inserted = rows_affected(await conn.execute(
                f"INSERT INTO invoices ({_INVOICE_COLUMNS})"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) ON CONFLICT DO NOTHING",
                invoice.id, invoice.account_id, invoice.period_key, invoice.period_end, invoice.issued_at,
                invoice.invoice_date, invoice.due_date, invoice.statement_date, invoice.total,
                invoice.amount_due, invoice.prepaid_applied, invoice.status, invoice.body,
            ))
            if inserted != 1:
                return False
            if prepaid_applied:
                await conn.execute(
                    "UPDATE accounts SET prepaid_balance = prepaid_balance - $1 WHERE id = $2",
                    prepaid_applied, invoice.account_id,
                )
                await conn.execute(
                    "INSERT INTO balance_entries (account_id, amount, kind, reference, created_at)"
                    " VALUES ($1, $2, 'usage', $3, $4)",
                    invoice.account_id, -prepaid_applied, invoice.id, now.isoformat(),
                )
            if collect is not None:
                account = await self._account_in_tx(conn, invoice.account_id)
                await self._insert_charges(conn, account, invoice.period_key, [collect], now)
            await conn.execute(
                "INSERT INTO notices (account_id, period_key, key, body, created_at)"
                " VALUES ($1, $2, 'invoice', $3, $4) ON CONFLICT DO NOTHING",
                invoice.account_id, invoice.period_key, notice_body, now.isoformat(),
            )
            return True

        return await self._write(body)

    async def invoices(self, account_id: int | None = None) -> list[InvoiceRecord]:
        sql = f"SELECT {_INVOICE_COLUMNS} FROM invoices"
        rows = await (
            self._fetch(sql + " ORDER BY period_key, id")
            if account_id is None
            else self._fetch(sql + " WHERE account_id = $1 ORDER BY period_key", account_id)
        )
        return [InvoiceRecord(*tuple(row)) for row in rows]

    async def statements_due(self, today_by_invoice: Callable[[InvoiceRecord], bool]) -> list[InvoiceRecord]:
        rows = await self._fetch(f"SELECT {_INVOICE_COLUMNS} FROM invoices WHERE statement_sent = 0")
        return [r for r in (InvoiceRecord(*tuple(row)) for row in rows) if today_by_invoice(r)]

    async def mark_statement(self, invoice: InvoiceRecord, body: str, now: datetime) -> None:
        async def run(conn: Conn) -> None:
            await self._lock(conn, invoice.account_id)
            await conn.execute("UPDATE invoices SET statement_sent = 1 WHERE id = $1", invoice.id)
            await conn.execute(
                "INSERT INTO notices (account_id, period_key, key, body, created_at)"
                " VALUES ($1, $2, 'statement', $3, $4) ON CONFLICT DO NOTHING",
                invoice.account_id, invoice.period_key, body, now.isoformat(),
            )

        await self._write(run)

    async def pending_notices(self) -> list[asyncpg.Record]:
        return await self._fetch(
            "SELECT n.*, a.name AS account, a.contacts AS contacts FROM notices n"
            " JOIN accounts a ON a.id = n.account_id WHERE n.email_sent = 0 OR n.webhook_sent = 0"
            " ORDER BY n.created_at"
        )

    async def mark_notice(self, account_id: int, period_key: str, key: str, channel: str) -> None:
        column = {"email": "email_sent", "webhook": "webhook_sent"}[channel]

        async def body(conn: Conn) -> None:
            await conn.execute(
                f"UPDATE notices SET {column} = 1 WHERE account_id = $1 AND period_key = $2 AND key = $3",
                account_id, period_key, key,
            )

        await self._write(body)

    async def notices_of(self, account_id: int) -> list[asyncpg.Record]:
        return await self._fetch("SELECT * FROM notices WHERE account_id = $1 ORDER BY created_at, key", account_id)

    async def breakdown(self, account_id: int, period_key: str) -> list[asyncpg.Record]:
        return await self._fetch(
            "SELECT campaign, region, accepted FROM usage_breakdown WHERE account_id = $1 AND period_key = $2"
            " ORDER BY campaign, region",
            account_id, period_key,
        )

    async def results_by_region(self, account_id: int, period_key: str) -> list[asyncpg.Record]:
        return await self._fetch(
            "SELECT m.region AS region, r.result AS result, COUNT(*) AS n FROM recipient_results r"
            " JOIN messages m ON m.queue_id = r.queue_id"
            " WHERE m.account_id = $1 AND r.period_key = $2 AND r.result != 'deferred'"
            " GROUP BY m.region, r.result ORDER BY m.region, r.result",
            account_id, period_key,
        )

    # -- the audit trail of admin changes ------------------------------------------------

    @asynccontextmanager
    async def audited(self, draft: AuditDraft) -> AsyncIterator[AuditDraft]:
        """Record `draft` inside the next write transaction this task runs (see
        SqliteStore.audited: same contract). The transaction locks the target account
        first, so `before` and `after` bracket exactly this change, even with other
        nodes changing the account at the same moment.
        """
        token = _AUDIT_DRAFT.set(draft)
        try:
            yield draft
        finally:
            _AUDIT_DRAFT.reset(token)

    async def _audit_view(self, conn: Conn, draft: AuditDraft, lock: bool = False) -> dict[str, Any] | None:
        if lock and await self._lock_named(conn, draft.target) is None:
            return None
        row = await conn.fetchrow(f"{_ACCOUNT_FULL} WHERE a.name = $1", draft.target)
        return None if row is None else draft.view(_full_account(row))

    async def _audit_insert(self, conn: Conn, draft: AuditDraft) -> tuple[dict[str, Any], int] | None:
        """Write the draft's event at the end of the change's transaction; None if no account."""
        after = await self._audit_view(conn, draft)
        if after is None:
            return None
        try:
            event_id = await conn.fetchval(
                "INSERT INTO audit_events (time, actor, action, target, before, after, detail, event_id)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
                draft.at.isoformat(), draft.actor, draft.action, draft.target,
                None if draft.before is None else json.dumps(draft.before, sort_keys=True),
                json.dumps(after, sort_keys=True), json.dumps(draft.detail, sort_keys=True), draft.event_id,
            )
        except asyncpg.UniqueViolationError:
            raise DuplicateEvent(f"event {draft.event_id!r} was already applied") from None
        return after, int(event_id)

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

        async def body(conn: Conn) -> int:
            return int(await conn.fetchval(
                "INSERT INTO audit_events (time, actor, action, target, before, after, detail)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
                at.isoformat(), actor, action, target,
                None if before is None else json.dumps(before, sort_keys=True),
                None if after is None else json.dumps(after, sort_keys=True), json.dumps(detail, sort_keys=True),
            ))

        return await self._write(body)

    async def audit_events(self, target: str | None = None, limit: int = 100) -> list[asyncpg.Record]:
        """The newest `limit` events, newest first; only those of `target` when given."""
        if target is None:
            return await self._fetch("SELECT * FROM audit_events ORDER BY id DESC LIMIT $1", limit)
        return await self._fetch(
            "SELECT * FROM audit_events WHERE target = $1 ORDER BY id DESC LIMIT $2", target, limit
        )

    async def audit_event_for(self, event_id: str) -> asyncpg.Record | None:
        return await self._fetchrow("SELECT * FROM audit_events WHERE event_id = $1", event_id)

    async def ping(self) -> None:
        """Raise StoreUnavailable unless the database answers (for health checks)."""
        await self._fetch("SELECT 1")


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
    )
