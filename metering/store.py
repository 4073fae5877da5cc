"""The meter's store interface, split by concern; the SQLite and PostgreSQL stores satisfy all of it.

The meter, the billing job, the notices and the admin service depend on these
Protocols, not on a database, each on the parts it uses: one node runs on its
embedded SQLite file (metering/sqlite/), several nodes share one PostgreSQL
database (metering/postgres/), and the same pure policy callbacks decide in both.
The types they exchange (rows, records, errors) are in metering/records.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import date, datetime
from pathlib import Path
from typing import Any, Protocol

from mailmeter.metering.records import (
    Account,
    AccountUpdate,
    AuditDraft,
    Decide,
    InvoiceRecord,
    LeasedCommit,
    Result,
    ResultReport,
    Row,
    Settle,
)
from mailmeter.policies.charges import Charge
from mailmeter.policies.decision import Admission, Usage


class NodeClaimKeeper(Protocol):
    """A live claim on the node's name (PostgreSQL; an SQLite meter has nothing to claim)."""

    async def keep(self, on_lost: Callable[[str], None]) -> None: ...


class StoreLifecycle(Protocol):
    """Open, migrate, claim the node's name, back up, and answer health checks."""

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def claim_node(self, node: str, owner: str) -> NodeClaimKeeper | None: ...  # raises NodeClaimed
    async def migrate(self) -> int: ...
    async def schema_version(self) -> int: ...
    async def backup(self, target: Path) -> None: ...
    async def ping(self) -> None: ...


class AccountStore(Protocol):
    """Accounts: their settings, payment state, prepaid balance and debt."""

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
    ) -> None: ...
    async def set_payment(self, name: str, ok: bool, detail: str, now: datetime) -> bool: ...
    async def add_balance(self, name: str, amount: int, kind: str, reference: str, now: datetime) -> int: ...
    async def change_account(
        self,
        name: str,
        period_key: str,
        now: datetime,
        change: Callable[[Account, Usage], AccountUpdate],
    ) -> AccountUpdate | None: ...
    async def set_monthly_payment(self, name: str, changes: str) -> bool: ...
    async def repay(self, name: str, now: datetime) -> int: ...
    async def get_account(self, name: str) -> Account | None: ...
    async def get_account_by_id(self, account_id: int) -> Account | None: ...
    async def account_with_usage(self, name: str, period_key: str) -> tuple[Account, Usage] | None: ...
    async def list_accounts(self) -> list[Account]: ...
    async def all_networks(self) -> list[tuple[str, str]]: ...
    async def networks_version(self) -> int: ...


class UsageStore(Protocol):
    """Reads of the ledger: a period's counters and their breakdowns."""

    async def usage(self, account_id: int, period_key: str, awaiting_results: int | None = None) -> Usage: ...
    async def deferred_recipients(self, account_id: int) -> int: ...
    async def breakdown(self, account_id: int, period_key: str) -> Sequence[Row]: ...
    async def results_by_region(self, account_id: int, period_key: str) -> Sequence[Row]: ...
    async def results_by_reason(self, account_id: int, period_key: str) -> Sequence[Row]: ...


class LedgerStore(UsageStore, Protocol):
    """The ledger of messages: holds (reservations), commits and per-recipient results."""

    async def reserve(
        self,
        account_id: int,
        period_key: str,
        hold_id: str,
        node: str,
        requested: int,
        now: datetime,
        decide: Decide,
    ) -> Admission: ...
    async def commit(
        self,
        hold_id: str,
        queue_id: str,
        emails: int,
        node: str,
        now: datetime,
        campaign: str = "",
        region: str = "",
        settle: Settle | None = None,
        account_id: int | None = None,
    ) -> None: ...
    async def release(self, hold_id: str) -> int: ...
    async def release_node_holds(self, node: str) -> int: ...
    async def message_committed(self, queue_id: str) -> bool: ...
    async def message_account(self, queue_id: str) -> int | None: ...
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
    ) -> bool: ...
    async def record_message_result(
        self,
        queue_id: str,
        recipient: str,
        result: Result,
        detail: str,
        now: datetime,
        period_key_for: Callable[[Account], str],
        reason: str = "",
    ) -> bool | None: ...


class BillingStore(Protocol):
    """Charges, invoices and statements: what the billing job closes and collects."""

    async def charges_due_for_collection(self, now: datetime, limit: int = 100) -> Sequence[Row]: ...
    async def charge(self, key: str) -> Row | None: ...
    async def charges_of(self, account_id: int, period_key: str | None = None) -> Sequence[Row]: ...
    async def set_charge_result(
        self, key: str, status: str, detail: str, attempts: int, next_attempt_at: datetime
    ) -> bool: ...
    async def add_monthly_credit(
        self, account_id: int, period_key: str, credit: Charge | None, now: datetime
    ) -> bool: ...
    async def last_invoiced_periods(self) -> dict[int, str]: ...  # account id -> its latest invoiced period key
    async def add_invoice(
        self,
        invoice: InvoiceRecord,
        collect: Charge | None,
        prepaid_applied: int,
        notice_body: str,
        now: datetime,
    ) -> bool: ...
    async def invoices(self, account_id: int | None = None) -> list[InvoiceRecord]: ...
    async def statements_due(self, today_by_invoice: Callable[[InvoiceRecord], bool]) -> list[InvoiceRecord]: ...
    async def mark_statement(self, invoice: InvoiceRecord, body: str, now: datetime) -> None: ...


class NoticeStore(Protocol):
    """Notices to account holders (usage alerts, invoices, statements) and what was sent."""

    async def pending_notices(self) -> Sequence[Row]: ...
    async def mark_notice(self, account_id: int, period_key: str, key: str, channel: str) -> None: ...
    async def notices_of(self, account_id: int) -> Sequence[Row]: ...


class AuditStore(Protocol):
    """The audit trail of admin changes."""

    def audited(self, draft: AuditDraft) -> AbstractAsyncContextManager[AuditDraft]: ...
    async def add_audit_event(
        self,
        at: datetime,
        actor: str,
        action: str,
        target: str,
        before: object,
        after: object,
        detail: dict[str, Any],
    ) -> int: ...
    async def audit_events(self, target: str | None = None, limit: int = 100) -> Sequence[Row]: ...
    async def audit_event_for(self, event_id: str) -> Row | None: ...


class Store(StoreLifecycle, AccountStore, LedgerStore, BillingStore, NoticeStore, AuditStore, Protocol):
    """Every state change is one atomic transaction; any database failure is StoreUnavailable."""


class ResultBatchStore(Protocol):
    """A store that records many delivery results in one transaction (PostgreSQL)."""

    async def record_message_results(
        self, reports: Sequence[ResultReport], period_key_for: Callable[[Account, datetime], str]
    ) -> list[bool | None | Exception]: ...


class LeasingStore(Protocol):
    """What allowance leasing needs from the shared store (metering/leases.py)."""

    async def renew_lease(
        self,
        lease_id: str,
        account_id: int,
        period_key: str,
        node: str,
        returning: int,
        existing: bool,
        now: datetime,
        decide: Decide,
    ) -> Admission | None: ...
    async def shrink_lease(self, lease_id: str, returning: int, drop_if_empty: bool, now: datetime) -> int | None: ...
    async def reclaim_stale_leases(self, renewed_before: datetime, node: str) -> int: ...
    async def commit_leased(
        self, commits: list[LeasedCommit], node: str, now: datetime, region: str, settle: Settle | None
    ) -> list[Exception | None]: ...


__all__ = [
    "AccountStore",
    "AuditStore",
    "BillingStore",
    "LeasingStore",
    "LedgerStore",
    "NodeClaimKeeper",
    "NoticeStore",
    "ResultBatchStore",
    "Store",
    "StoreLifecycle",
    "UsageStore",
]
