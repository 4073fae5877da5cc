"""The shared store: one PostgreSQL database for every relay node, through an asyncpg pool.

Same interface (metering/store.py) and guarantees as SqliteStore, for several
nodes at once. A reserve locks the account row (`SELECT ... FOR UPDATE`), then
reads the account and the period's counters, runs the same pure `decide` the
SQLite store runs, and writes the hold, all in one transaction: however many
nodes race, no two decide on the same counters, so nothing is overspent. A commit
locks the account too and is idempotent on the queue id; a recipient's final
result is counted once (the account lock serializes two reports of it).

PgStore is composed of one part per concern: the foundation (pool, transactions,
retries, locks, the audit hook) is metering/postgres/base.py and tx.py; accounts
accounts.py; the ledger (holds, commits, results) ledger.py; the steps shared under
the account lock holds.py; allowance leases leases.py; charges, invoices and notices
invoices.py; the audit trail audit.py; webhooks, events, suppression and account tokens
events.py; the schema schema.py; the node-name claim claim.py; `db backup` backup.py.
"""

from __future__ import annotations

from mailmeter.metering.postgres.accounts import PgAccounts
from mailmeter.metering.postgres.audit import PgAudit
from mailmeter.metering.postgres.events import PgEvents
from mailmeter.metering.postgres.invoices import PgInvoices
from mailmeter.metering.postgres.leases import PgLeases
from mailmeter.metering.postgres.ledger import PgLedger
from mailmeter.metering.postgres.portal import PgPortal


class PgStore(PgAccounts, PgLedger, PgInvoices, PgLeases, PgPortal, PgAudit, PgEvents):
    """The whole store interface (metering/store.py), and leasing, on one PostgreSQL database."""


__all__ = ["PgStore"]
