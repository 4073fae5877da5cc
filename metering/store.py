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
    AccountEdit,
    AccountUpdate,
    AuditDraft,
    Decide,
    DueEvent,
    EventRecord,
    InvoiceRecord,
    LeasedCommit,
    RateFor,
    Result,
    ResultReport,
    Row,
    Settle,
    Suppression,
    Webhook,
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
    async def edit_account(self, name: str, edit: AccountEdit) -> bool: ...
    async def add_balance(self, name: str, amount: int, kind: str, reference: str, now: datetime) -> int: ...
    async def change_account(
        self,
        name: str,
        period_key: str,
        now: datetime,
        change: Callable[[Account, Usage], AccountUpdate],
    ) -> AccountUpdate | None: ...
    async def set_monthly_payment(self, name: str, changes: str) -> bool: ...
    async def set_sending_rate(self, name: str, rate: str | None) -> bool: ...
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
        rate: RateFor | None = None,
        recipient: str | None = None,
        suppress_for: Callable[[Account], bool] | None = None,
    ) -> Admission: ...  # raises RecipientSuppressed
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
        spooled: bytes | None = None,
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
        suppress: bool = False,
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
        suppress_for: Callable[[Account], bool] | None = None,
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


class EventStore(Protocol):
    """An account's webhook, the outbox of its events with their delivery log, its
    suppression list and its own API token (as a SHA-256). Results, usage notices and
    payment changes write their events in their own transactions (for an account whose
    webhook takes the kind); an Invalid Email result (does not exist, format error)
    puts its recipient on the list when the plan suppresses (record_result's `suppress`)."""

    async def set_webhook(self, name: str, url: str, secret: str, events: tuple[str, ...], now: datetime) -> bool: ...
    async def remove_webhook(self, name: str) -> bool: ...
    async def webhook_of(self, account_id: int) -> Webhook | None: ...
    async def claim_due_events(self, now: datetime, lease_until: datetime, limit: int = 50) -> list[DueEvent]: ...
    async def record_event_attempt(
        self,
        event_id: int,
        at: datetime,
        status_code: int | None,
        error: str,
        status: str,
        next_attempt_at: datetime,
    ) -> int: ...
    async def events_of(self, account_id: int, limit: int = 100) -> list[EventRecord]: ...
    async def prune_events(self, before: datetime) -> int: ...
    async def suppression(self, account_id: int, address: str) -> Suppression | None: ...
    async def suppressions(self, account_id: int) -> list[Suppression]: ...
    async def remove_suppression(self, name: str, address: str) -> bool: ...
    async def set_account_token(self, name: str, token_hash: str, now: datetime) -> bool: ...
    async def account_id_for_token(self, token_hash: str) -> int | None: ...


class PortalStore(Protocol):
    """The account holder's side (mailmeter/portal/): the usage chart's hourly sums, and the
    payments an account makes itself (kind `topup` or `repay`, charges whose effect comes with
    their success in set_charge_result). Its sign-in token is EventStore's account token."""

    async def usage_by_hour(self, account_id: int, period_key: str) -> Sequence[tuple[str, int]]: ...
    async def add_payment(
        self, name: str, period_key: str, kind: str, amount: int, description: str, now: datetime
    ) -> Row | None: ...


class Store(
    StoreLifecycle, AccountStore, LedgerStore, BillingStore, NoticeStore, AuditStore, EventStore, PortalStore, Protocol
):
    """Every state change is one atomic transaction; any database failure is StoreUnavailable."""


class ResultBatchStore(Protocol):
    """A store that records many delivery results in one transaction (PostgreSQL)."""

    async def record_message_results(
        self,
        reports: Sequence[ResultReport],
        period_key_for: Callable[[Account, datetime], str],
        suppress_for: Callable[[Account], bool] | None = None,
    ) -> list[bool | None | Exception]: ...


class InlineSpoolStore(Protocol):
    """Small messages kept in the commit's transaction (SQLite; spool.inline, issue 19 item 3).

    `commit(..., spooled=data)` writes the message with its usage, one fsync for both;
    these read and forget it, for the relay process (`node`) whose delivery owns it.
    """

    async def spooled_ids(self, node: str) -> list[str]: ...
    async def read_spooled(self, queue_id: str) -> bytes | None: ...
    async def drop_spooled(self, queue_id: str) -> None: ...


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
    "EventStore",
    "InlineSpoolStore",
    "LeasingStore",
    "LedgerStore",
    "NodeClaimKeeper",
    "NoticeStore",
    "ResultBatchStore",
    "Store",
    "StoreLifecycle",
    "UsageStore",
]
