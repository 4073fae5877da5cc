"""The PostgreSQL store's accounts: add, change, pay, top up, repay (each under the account's row
lock), and read them, with a period's counters in one round trip."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from datetime import date, datetime

import asyncpg

from mailmeter.metering.postgres.base import ACCOUNT_FULL, full_account
from mailmeter.metering.postgres.events import add_event
from mailmeter.metering.postgres.holds import PgHolds
from mailmeter.metering.postgres.tx import rows_affected
from mailmeter.metering.records import (
    Account,
    AccountEdit,
    AccountUpdate,
    applying_due_plan_change,
    edit_columns,
    history_from_json,
    payment_event,
)
from mailmeter.policies.decision import Usage


class PgAccounts(PgHolds):
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
        monthly_payment: str = "[]",
    ) -> None:
        domain_list, network_list, contact_list = list(domains), list(networks), list(contacts)

        async def body(conn: asyncpg.Connection) -> None:
            try:
                account_id = await conn.fetchval(
                    "INSERT INTO accounts (name, password_hash, plan, subscribed_on, created_at, contacts,"
                    " monthly_payment) VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
                    name,
                    password_hash,
                    plan,
                    subscribed_on.isoformat(),
                    now.isoformat(),
                    json.dumps(contact_list),
                    monthly_payment,
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

        async def body(conn: asyncpg.Connection) -> bool:
            account_id = await self._lock_named(conn, name)
            if account_id is None:
                return False
            await conn.execute(
                "UPDATE accounts SET payment_ok = $1, payment_detail = $2 WHERE id = $3",
                int(ok),
                detail[:500],
                account_id,
            )
            if ok:
                await conn.execute(
                    "UPDATE charges SET status = 'pending', next_attempt_at = $1"
                    " WHERE status = 'failed' AND account_id = $2"
                    " AND kind NOT IN ('topup', 'repay')",  # a declined payment of the holder's: paid again by them
                    now.isoformat(),
                    account_id,
                )
            await add_event(conn, account_id, "payment", payment_event(ok, detail), now)
            return True

        return await self._write(body)

    async def edit_account(self, name: str, edit: AccountEdit) -> bool:
        """Apply an operator's change of the account's settings under its row lock; False: no such account."""

        async def body(conn: asyncpg.Connection) -> bool:
            row = await conn.fetchrow("SELECT id, contacts FROM accounts WHERE name = $1 FOR UPDATE", name)
            if row is None:
                return False
            account_id = row["id"]
            for domain in edit.remove_domains:
                await conn.execute(
                    "DELETE FROM account_domains WHERE account_id = $1 AND domain = $2", account_id, domain
                )
            for domain in edit.add_domains:
                await conn.execute(
                    "INSERT INTO account_domains VALUES ($1, $2) ON CONFLICT DO NOTHING", account_id, domain
                )
            for network in edit.remove_networks:
                await conn.execute(
                    "DELETE FROM account_networks WHERE account_id = $1 AND network = $2", account_id, network
                )
            for network in edit.add_networks:
                await conn.execute(
                    "INSERT INTO account_networks VALUES ($1, $2) ON CONFLICT DO NOTHING", account_id, network
                )
            columns = edit_columns(edit, json.loads(row["contacts"]))
            if columns:
                assignments = ", ".join(f"{column} = ${number}" for number, column in enumerate(columns, start=1))
                await conn.execute(
                    f"UPDATE accounts SET {assignments} WHERE id = ${len(columns) + 1}", *columns.values(), account_id
                )
            return True

        return await self._write(body)

    async def add_balance(self, name: str, amount: int, kind: str, reference: str, now: datetime) -> int:
        """Add to (or, negative, take from) the prepaid balance; returns the new balance."""

        async def body(conn: asyncpg.Connection) -> int:
            row = await conn.fetchrow("SELECT id, prepaid_balance FROM accounts WHERE name = $1 FOR UPDATE", name)
            if row is None:
                raise LookupError(f"no account named {name!r} (see `mailmeter account list`)")
            await conn.execute(
                "UPDATE accounts SET prepaid_balance = prepaid_balance + $1 WHERE id = $2", amount, row["id"]
            )
            await conn.execute(
                "INSERT INTO balance_entries (account_id, amount, kind, reference, created_at)"
                " VALUES ($1, $2, $3, $4, $5)",
                row["id"],
                amount,
                kind,
                reference,
                now.isoformat(),
            )
            return int(row["prepaid_balance"]) + amount

        return await self._write(body)

    async def change_account(
        self,
        name: str,
        period_key: str,
        now: datetime,
        change: Callable[[Account, Usage], AccountUpdate],
    ) -> AccountUpdate | None:
        """An admin change of the account's plan or limits, in one transaction under the
        account's lock (see SqliteStore.change_account: same contract)."""

        async def body(conn: asyncpg.Connection) -> AccountUpdate | None:
            account_id = await self._lock_named(conn, name)
            if account_id is None:
                return None
            account, usage = await self._account_and_usage(conn, account_id, period_key)
            due = applying_due_plan_change(account, now)
            if due is not None:
                await self._write_account(conn, account_id, due)
                account, usage = await self._account_and_usage(conn, account_id, period_key)
            update = change(account, usage)
            await self._write_account(conn, account_id, update)
            if update.history is not None:
                await self._store_history(conn, account_id, period_key, update.history)
            return update

        return await self._write(body)

    @staticmethod
    async def _write_account(conn: asyncpg.Connection, account_id: int, update: AccountUpdate) -> None:
        columns = update.columns()
        if columns:
            assignments = ", ".join(f"{column} = ${number}" for number, column in enumerate(columns, start=2))
            await conn.execute(f"UPDATE accounts SET {assignments} WHERE id = $1", account_id, *columns.values())

    async def set_monthly_payment(self, name: str, changes: str) -> bool:
        """Store the account's monthly payments (records.payment_changes_to_json)."""

        async def body(conn: asyncpg.Connection) -> bool:
            status = await conn.execute("UPDATE accounts SET monthly_payment = $1 WHERE name = $2", changes, name)
            return rows_affected(status) == 1

        return await self._write(body)

    async def set_sending_rate(self, name: str, rate: str | None) -> bool:
        """The account's own sending rate (policies/rate.py; None: the plan's), live at the next RCPT."""

        async def body(conn: asyncpg.Connection) -> bool:
            status = await conn.execute("UPDATE accounts SET sending_rate = $1 WHERE name = $2", rate, name)
            return rows_affected(status) == 1

        return await self._write(body)

    async def repay(self, name: str, now: datetime) -> int:
        """Settle every overdrawn invoice of the account at once; returns the amount repaid."""

        async def body(conn: asyncpg.Connection) -> int:
            account_id = await self._lock_named(conn, name)
            if account_id is None:
                raise LookupError(f"no account named {name!r} (see `mailmeter account list`)")
            amount = int(
                await conn.fetchval(
                    "SELECT COALESCE(SUM(amount_due), 0)::bigint FROM invoices"
                    " WHERE account_id = $1 AND status = 'overdrawn'",
                    account_id,
                )
            )
            if amount:
                await conn.execute(
                    "UPDATE invoices SET status = 'paid' WHERE account_id = $1 AND status = 'overdrawn'", account_id
                )
                await conn.execute(
                    "INSERT INTO balance_entries (account_id, amount, kind, reference, created_at)"
                    " VALUES ($1, $2, 'repay', '', $3)",
                    account_id,
                    amount,
                    now.isoformat(),
                )
            return amount

        return await self._write(body)

    async def get_account(self, name: str) -> Account | None:
        row = await self._fetchrow(f"{ACCOUNT_FULL} WHERE a.name = $1", name)
        return None if row is None else full_account(row)

    async def account_with_usage(self, name: str, period_key: str) -> tuple[Account, Usage] | None:
        """The whole account and its counters for the period, in one round trip (MAIL's check)."""
        row = await self._fetchrow(
            f"SELECT f.*, u.accepted AS usage_accepted, u.reserved AS usage_reserved,"
            f" u.delivered AS usage_delivered, u.soft_bounced AS usage_soft_bounced,"
            f" u.hard_bounced AS usage_hard_bounced, u.history AS usage_history"
            f" FROM ({ACCOUNT_FULL} WHERE a.name = $1) f"
            f" LEFT JOIN period_usage u ON u.account_id = f.id AND u.period_key = $2",
            name,
            period_key,
        )
        if row is None:
            return None
        account = full_account(row)
        return account, Usage(
            accepted=row["usage_accepted"] or 0,
            reserved=row["usage_reserved"] or 0,
            delivered=row["usage_delivered"] or 0,
            soft_bounced=row["usage_soft_bounced"] or 0,
            hard_bounced=row["usage_hard_bounced"] or 0,
            awaiting_results=account.awaiting_results,
            history=history_from_json(row["usage_history"]),
        )

    async def get_account_by_id(self, account_id: int) -> Account | None:
        row = await self._fetchrow(f"{ACCOUNT_FULL} WHERE a.id = $1", account_id)
        return None if row is None else full_account(row)

    async def list_accounts(self) -> list[Account]:
        return [full_account(row) for row in await self._fetch(f"{ACCOUNT_FULL} ORDER BY a.name")]

    async def all_networks(self) -> list[tuple[str, str]]:
        rows = await self._fetch(
            "SELECT n.network, a.name FROM account_networks n JOIN accounts a ON a.id = n.account_id"
            " WHERE a.deleted_at IS NULL"
        )
        return [(row[0], row[1]) for row in rows]

    async def networks_version(self) -> int:
        """Changes whenever a bound network or its account's name does (schema 13's triggers)."""
        row = await self._fetchrow("SELECT version FROM network_bindings_version")
        return int(row[0]) if row is not None else 0
