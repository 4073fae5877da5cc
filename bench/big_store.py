"""A store with history, built once: 10,000 accounts and 10 million earlier messages (issue 19 item 5).

The fixture is an SQLite meter store as a relay would have it after a year of
traffic: the schema of the code under test (its own migrations, run by its
SqliteStore), then, in bulk SQL inserts in one transaction:

- `--accounts` accounts (`filler00001`, ...) on plan `bench`, each with a sender
  domain and one bound network (a /32 in 198.18.0.0/15, the benchmarking range;
  no traffic ever goes there: the relay only reads the bindings);
- `--events` accepted messages spread over the 12 calendar months before the
  current one, with time-ordered queue ids as relay/delivery.py makes them
  (hex milliseconds, then random hex), each with one final recipient result
  (97% delivered, 2% soft-bounced, 1% hard-bounced);
- each account's counters and usage breakdown per period, and for every ended
  period an invoice (paid) and its invoice charge; `settled_through` and
  `credited_through` at the last month, so the billing job has nothing left to
  close (a running system's steady state).

The file is kept in a cache directory under a name made of its parameters and a
hash of the schema (MIGRATIONS), so it is built once per schema (a few minutes
for 10 million events) and copied for every run that needs it (`copy_fixture`):
no run measures a store another run has written to.

    .venv/bin/python bench/big_store.py                      # build (or find) the default fixture; print its path
    .venv/bin/python bench/big_store.py --copy-to /tmp/x.db  # and copy it there
    BENCH_STORE_FIXTURE=big bash bench/run                   # bench/run: mailmeter's store starts as this fixture

The fixture is built at the first of the current month's rules (calendar
months, UTC): one built in an earlier month leaves that month uninvoiced, so the
cache name includes the current month too.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import sqlite3
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from code_under_test import module  # noqa: E402

DEFAULT_CACHE = Path(os.environ.get("BENCH_STORE_CACHE", "/var/cache/mailmeter-bench"))
DEFAULT_ACCOUNTS = 10_000
DEFAULT_EVENTS = 10_000_000
MONTHS = 12


def month_start(year: int, month: int) -> datetime:
    return datetime(year, month, 1, tzinfo=timezone.utc)


def months_back(at: datetime, months: int) -> datetime:
    """The first instant of the calendar month `months` before `at`'s."""
    index = at.year * 12 + (at.month - 1) - months
    return month_start(index // 12, index % 12 + 1)


def schema_hash() -> str:
    """The code under test's migrations: a fixture is only valid for the schema it was built with."""
    migrations = module("metering.sqlite.schema").MIGRATIONS
    return hashlib.sha256("\n--\n".join(migrations).encode()).hexdigest()[:12]


def fixture_path(cache: Path, accounts: int, events: int, now: datetime) -> Path:
    return cache / f"store-{accounts}a-{events}e-{now:%Y%m}-{schema_hash()}.db"


async def create_schema(path: Path) -> None:
    """The code under test's own SqliteStore creates the file and runs every migration."""
    store = module("metering.sqlite").SqliteStore(path)
    await store.open()
    await store.close()


def fill(path: Path, accounts: int, events: int, now: datetime) -> None:
    """Bulk inserts, one transaction; the journal is off while loading, WAL again afterwards."""
    current = months_back(now, 0)
    first = months_back(now, MONTHS)
    last_key = months_back(now, 1).strftime("%Y-%m-%dT%H:%M:%SZ")
    start_ms = int(first.timestamp() * 1000)
    span_ms = int(current.timestamp() * 1000) - start_ms
    created = first.isoformat()
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode = OFF")
        db.execute("PRAGMA synchronous = OFF")
        db.execute("PRAGMA cache_size = -1048576")  # 1 GiB while loading
        db.execute("BEGIN")
        # The big tables' own indexes (not their keys) are built after the rows are in, at
        # once, instead of one random insert per row (schema 10's messages_by_account_period took
        # the build from 40 s to 11 minutes).
        indexes = db.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
            " AND tbl_name IN ('messages', 'recipient_results')"
        ).fetchall()
        for name, _ in indexes:
            db.execute(f'DROP INDEX "{name}"')
        numbers = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)"
        db.execute(
            "INSERT INTO accounts (id, name, plan, subscribed_on, created_at, settled_through, credited_through)"
            f" {numbers} SELECT i, printf('filler%05d', i), 'bench', ?, ?, ?, ? FROM n",
            (accounts, first.date().isoformat(), created, last_key, last_key),
        )
        db.execute(
            f"INSERT INTO account_domains (account_id, domain) {numbers} SELECT i, printf('f%05d.fill.test', i) FROM n",
            (accounts,),
        )
        db.execute(
            "INSERT INTO account_networks (account_id, network)"
            f" {numbers} SELECT i, printf('198.%d.%d.%d/32', 18 + (i >> 16) % 2, (i >> 8) % 256, i % 256) FROM n",
            (accounts,),
        )
        # Time-ordered queue ids (relay/delivery.py: 11 hex digits of milliseconds, 10 random).
        db.execute(
            "INSERT INTO messages (queue_id, account_id, period_key, recipients, node, accepted_at, region)"
            f" {numbers}, t(i, ms) AS (SELECT i, ? + ((i - 1) * ?) / ? FROM n)"
            " SELECT printf('%011X%010X', ms, (i * 2654435761) % 1099511627776), 1 + (i * 7919) % ?,"
            " strftime('%Y-%m-01T00:00:00Z', ms / 1000, 'unixepoch'), 1, 'bench',"
            " strftime('%Y-%m-%dT%H:%M:%f+00:00', ms / 1000.0, 'unixepoch'), 'bench' FROM t",
            (events, start_ms, span_ms, events, accounts),
        )
        db.execute(
            "INSERT INTO recipient_results (queue_id, recipient, result, period_key, detail, updated_at, reason)"
            " SELECT queue_id, printf('r%d@d%d.rcpt.test', rowid % 997, rowid % 89),"
            " CASE WHEN rowid % 100 < 97 THEN 'delivered' WHEN rowid % 100 < 99 THEN 'soft_bounced'"
            " ELSE 'hard_bounced' END, period_key, '250 2.0.0 Ok', accepted_at,"
            " CASE WHEN rowid % 100 < 97 THEN '' WHEN rowid % 100 < 99 THEN 'mailbox_full' ELSE 'not_exist' END"
            " FROM messages ORDER BY rowid"
        )
        db.execute(
            "INSERT INTO period_usage (account_id, period_key, accepted, delivered, soft_bounced, hard_bounced)"
            " SELECT m.account_id, m.period_key, COUNT(*), SUM(r.result = 'delivered'),"
            " SUM(r.result = 'soft_bounced'), SUM(r.result = 'hard_bounced')"
            " FROM messages m JOIN recipient_results r ON r.queue_id = m.queue_id"
            " GROUP BY m.account_id, m.period_key"
        )
        db.execute(
            "INSERT INTO usage_breakdown (account_id, period_key, campaign, region, accepted)"
            " SELECT account_id, period_key, '', 'bench', accepted FROM period_usage"
        )
        # Every ended period invoiced and paid (the billing job's steady state), with its charge.
        end = "strftime('%Y-%m-%dT%H:%M:%S+00:00', period_key, '+1 month')"
        db.execute(
            "INSERT INTO invoices (id, account_id, period_key, period_end, issued_at, invoice_date, due_date,"
            " statement_date, total, amount_due, prepaid_applied, status, statement_sent, body)"
            f" SELECT printf('INV-%05d-%s', account_id, substr(period_key, 1, 7)), account_id, period_key, {end},"
            f" {end}, {end}, {end}, {end}, 0, 0, 0, 'paid', 1, '{{}}' FROM period_usage"
        )
        db.execute(
            "INSERT INTO charges (idempotency_key, account_id, period_key, kind, seq, amount, description,"
            " created_at, status, next_attempt_at)"
            " SELECT 'invoice-' || id, account_id, period_key, 'invoice', 0, 0, 'invoice ' || id, issued_at,"
            " 'succeeded', issued_at FROM invoices"
        )
        for _, sql in indexes:
            db.execute(sql)
        db.execute("COMMIT")
        db.execute("PRAGMA journal_mode = WAL")  # as the store keeps it
    finally:
        db.close()


def build(cache: Path, accounts: int, events: int, now: datetime | None = None) -> Path:
    """The fixture's path, building it first if the cache has none for these parameters and this schema."""
    now = now or datetime.now(timezone.utc)
    path = fixture_path(cache, accounts, events, now)
    if path.exists():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + f".building-{os.getpid()}")
    partial.unlink(missing_ok=True)
    started = time.monotonic()
    try:
        asyncio.run(create_schema(partial))
        fill(partial, accounts, events, now)
        os.replace(partial, path)
    finally:
        for leftover in (partial, partial.with_name(partial.name + "-wal"), partial.with_name(partial.name + "-shm")):
            leftover.unlink(missing_ok=True)
    size = path.stat().st_size / 2**30
    print(
        f"built {path} ({accounts:,} accounts, {events:,} messages with results, {size:.1f} GiB)"
        f" in {time.monotonic() - started:.0f} s",
        file=sys.stderr,
    )
    return path


def copy_fixture(fixture: Path, target: Path) -> None:
    """A private copy for one run, synced, so the kernel is not writing gigabytes back while it is measured."""
    target.parent.mkdir(parents=True, exist_ok=True)
    for suffix in ("-wal", "-shm"):
        Path(str(target) + suffix).unlink(missing_ok=True)
    shutil.copyfile(fixture, target)
    os.sync()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accounts", type=int, default=DEFAULT_ACCOUNTS)
    parser.add_argument("--events", type=int, default=DEFAULT_EVENTS)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where fixtures are kept")
    parser.add_argument("--copy-to", type=Path, help="copy the fixture to this file (a store to run on)")
    args = parser.parse_args(argv)
    fixture = build(args.cache, args.accounts, args.events)
    if args.copy_to is not None:
        copy_fixture(fixture, args.copy_to)
    print(fixture)
    return 0


if __name__ == "__main__":
    sys.exit(main())
