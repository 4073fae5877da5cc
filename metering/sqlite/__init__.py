"""The embedded store: one SQLite file through aiosqlite, WAL, synchronous=FULL.

Every state change is one `BEGIN IMMEDIATE` transaction, so the write lock is
taken before anything is read: a reserve reads the counters, asks the pure
policy, and writes the hold without another writer (another session, another
process, the CLI) slipping in between. That is what makes the last cent safe.
The PostgreSQL store gives the same guarantee with `SELECT ... FOR UPDATE`.

SqliteStore is composed of one part per concern, all on one connection
(metering/sqlite/connection.py): accounts, the ledger of holds, commits and
results, charges, invoices and notices, the audit trail, and events and suppression; the schema's
migrations are metering/sqlite/schema.py.
"""

from __future__ import annotations

from mailmeter.metering.sqlite.accounts import SqliteAccounts
from mailmeter.metering.sqlite.audit import SqliteAudit
from mailmeter.metering.sqlite.events import SqliteEvents
from mailmeter.metering.sqlite.invoices import SqliteInvoices
from mailmeter.metering.sqlite.ledger import SqliteLedger
from mailmeter.metering.sqlite.portal import SqlitePortal


class SqliteStore(SqliteAccounts, SqliteLedger, SqliteInvoices, SqlitePortal, SqliteAudit, SqliteEvents):
    """The whole store interface (metering/store.py) on one SQLite file."""


__all__ = ["SqliteStore"]
