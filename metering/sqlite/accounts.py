"""The SQLite store's accounts: add, change, pay, top up, repay, and read them (with a period's counters)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable
from datetime import date, datetime

import aiosqlite

from mailmeter.metering.records import (
    Account,
    AccountEdit,
    AccountUpdate,
    account_core,
    applying_due_plan_change,
    edit_columns,
    history_from_json,
    history_to_json,
    payment_event,
)
from mailmeter.metering.sqlite.connection import SqliteConnection, fetch_all
from mailmeter.metering.sqlite.events import ADD_EVENT, add_event_params
from mailmeter.policies.decision import Usage

# The usage of every period not invoiced yet (after settled_through), which a prepaid
# balance still holds until the invoices deduct it: "KEY ACCEPTED RESERVED DELIVERED SOFT HARD",
# comma-separated (records.open_periods_from_text). Usually one row: the current period.
OPEN_PERIODS = (
    "(SELECT group_concat(u.period_key || ' ' || u.accepted || ' ' || u.reserved || ' ' || u.delivered"
    " || ' ' || u.soft_bounced || ' ' || u.hard_bounced, ',') FROM period_usage u"
    " WHERE u.account_id = a.id AND u.period_key > COALESCE(a.settled_through, '')) AS open_periods"
)
ACCOUNT_SELECT = (
    "SELECT a.*, (SELECT COALESCE(SUM(i.amount_due), 0) FROM invoices i"
    f" WHERE i.account_id = a.id AND i.status = 'overdrawn') AS debt, {OPEN_PERIODS} FROM accounts a"
)
FULL_ACCOUNT_SELECT = (
    "SELECT a.*, (SELECT COALESCE(SUM(i.amount_due), 0) FROM invoices i"
    f" WHERE i.account_id = a.id AND i.status = 'overdrawn') AS debt, {OPEN_PERIODS},"
    " (SELECT group_concat(domain, ' ') FROM (SELECT domain FROM account_domains"
    "  WHERE account_id = a.id ORDER BY domain)) AS domain_list,"
    " (SELECT group_concat(network, ' ') FROM (SELECT network FROM account_networks"
    "  WHERE account_id = a.id ORDER BY network)) AS network_list"
    " FROM accounts a"
)


class SqliteAccounts(SqliteConnection):
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
                    (
                        name,
                        password_hash,
                        plan,
                        subscribed_on.isoformat(),
                        now.isoformat(),
                        json.dumps(list(contacts)),
                        monthly_payment,
                    ),
                )
            except sqlite3.IntegrityError:
                raise ValueError(f"account {name!r} already exists") from None
            account_id = cursor.lastrowid
            for domain in domains:
                await db.execute("INSERT OR IGNORE INTO account_domains VALUES (?, ?)", (account_id, domain))
            for network in networks:
                await db.execute("INSERT OR IGNORE INTO account_networks VALUES (?, ?)", (account_id, network))

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
                    " WHERE status = 'failed' AND account_id = (SELECT id FROM accounts WHERE name = ?)"
                    " AND kind NOT IN ('topup', 'repay')",  # a declined payment of the holder's: paid again by them
                    (now.isoformat(), name),
                )
            cursor = await db.execute("SELECT id FROM accounts WHERE name = ?", (name,))
            found = await cursor.fetchone()
            if found is not None:
                await db.execute(ADD_EVENT, add_event_params(found["id"], "payment", payment_event(ok, detail), now))
            return True

    async def edit_account(self, name: str, edit: AccountEdit) -> bool:
        """Apply an operator's change of the account's settings in one transaction; False: no such account."""
        async with self._tx() as db:
            cursor = await db.execute("SELECT id, contacts FROM accounts WHERE name = ?", (name,))
            row = await cursor.fetchone()
            if row is None:
                return False
            account_id = row["id"]
            for domain in edit.remove_domains:
                await db.execute(
                    "DELETE FROM account_domains WHERE account_id = ? AND domain = ?", (account_id, domain)
                )
            for domain in edit.add_domains:
                await db.execute("INSERT OR IGNORE INTO account_domains VALUES (?, ?)", (account_id, domain))
            for network in edit.remove_networks:
                await db.execute(
                    "DELETE FROM account_networks WHERE account_id = ? AND network = ?", (account_id, network)
                )
            for network in edit.add_networks:
                await db.execute("INSERT OR IGNORE INTO account_networks VALUES (?, ?)", (account_id, network))
            columns = edit_columns(edit, json.loads(row["contacts"]))
            if columns:
                assignments = ", ".join(f"{column} = ?" for column in columns)
                await db.execute(f"UPDATE accounts SET {assignments} WHERE id = ?", (*columns.values(), account_id))
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
            account = await account_in_tx(db, account_id)
            due = applying_due_plan_change(account, now)
            if due is not None:
                await self._write_account(db, account_id, due)
                account = await account_in_tx(db, account_id)
            cursor = await db.execute(
                "SELECT accepted, reserved, delivered, soft_bounced, hard_bounced, history FROM period_usage"
                " WHERE account_id = ? AND period_key = ?",
                (account_id, period_key),
            )
            usage = usage_of(await cursor.fetchone(), account.awaiting_results)
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

    async def set_sending_rate(self, name: str, rate: str | None) -> bool:
        """The account's own sending rate (policies/rate.py; None: the plan's), live at the next RCPT."""
        async with self._tx() as db:
            cursor = await db.execute("UPDATE accounts SET sending_rate = ? WHERE name = ?", (rate, name))
            return cursor.rowcount == 1

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
            total = await cursor.fetchone()
            assert total is not None  # an aggregate without GROUP BY returns one row
            amount = int(total[0])
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
        return await self._run(lambda conn: full_account(conn, "a.name = ?", name), write=False)

    async def account_with_usage(self, name: str, period_key: str) -> tuple[Account, Usage] | None:
        """The whole account and its counters for the period, in one hop (MAIL's check)."""

        def read(conn: sqlite3.Connection) -> tuple[Account, Usage] | None:
            account = full_account(conn, "a.name = ?", name)
            if account is None:
                return None
            return account, usage_row(conn, account.id, period_key, account.awaiting_results)

        return await self._run(read, write=False)

    async def get_account_by_id(self, account_id: int) -> Account | None:
        return await self._run(lambda conn: full_account(conn, "a.id = ?", account_id), write=False)

    async def list_accounts(self) -> list[Account]:
        """Every account in one query: the billing job lists them all on every pass.

        Built in the store's thread, so that 10,000 rows become accounts without holding
        the event loop (the interpreter hands the GIL over every few milliseconds).
        """

        def accounts(conn: sqlite3.Connection) -> list[Account]:
            return [account_with_lists(row) for row in fetch_all(conn, f"{FULL_ACCOUNT_SELECT} ORDER BY a.name", ())]

        return await self._run(accounts, write=False)

    async def all_networks(self) -> list[tuple[str, str]]:
        rows = await self._read(
            "SELECT n.network, a.name FROM account_networks n JOIN accounts a ON a.id = n.account_id"
            " WHERE a.deleted_at IS NULL"
        )
        return [(row[0], row[1]) for row in rows]

    async def networks_version(self) -> int:
        """A number that changes whenever a bound network or its account's name does (schema 13's
        triggers): a relay reads all the bindings again only when it has changed."""
        rows = await self._read("SELECT version FROM network_bindings_version")
        return int(rows[0][0]) if rows else 0


async def account_in_tx(db: aiosqlite.Connection, account_id: int) -> Account:
    cursor = await db.execute(f"{ACCOUNT_SELECT} WHERE a.id = ?", (account_id,))
    row = await cursor.fetchone()
    if row is None:
        raise LookupError(f"account id {account_id} is gone")
    return account_core(row)


def account_row(conn: sqlite3.Connection, account_id: int) -> Account:
    row = conn.execute(f"{ACCOUNT_SELECT} WHERE a.id = ?", (account_id,)).fetchone()
    if row is None:
        raise LookupError(f"account id {account_id} is gone")
    return account_core(row)


def full_account(conn: sqlite3.Connection, where: str, value: object) -> Account | None:
    """An account with its domains and networks, in one query (it is read on every MAIL)."""
    row = conn.execute(f"{FULL_ACCOUNT_SELECT} WHERE {where}", (value,)).fetchone()
    return None if row is None else account_with_lists(row)


def account_with_lists(row: sqlite3.Row) -> Account:
    """A FULL_ACCOUNT_SELECT row: domains and networks never hold spaces."""
    return account_core(row, tuple((row["domain_list"] or "").split()), tuple((row["network_list"] or "").split()))


def usage_row(conn: sqlite3.Connection, account_id: int, period_key: str, awaiting_results: int | None) -> Usage:
    row = conn.execute(
        "SELECT accepted, reserved, delivered, soft_bounced, hard_bounced, history FROM period_usage"
        " WHERE account_id = ? AND period_key = ?",
        (account_id, period_key),
    ).fetchone()
    return usage_of(row, awaiting_results)


def usage_of(row: sqlite3.Row | None, awaiting_results: int | None) -> Usage:
    """A period's counters and history from (accepted, reserved, delivered, soft, hard, history)."""
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
