"""Every query a message makes of the SQLite store finds its rows through an index (issue 19 item 5).

A relay with 10,000 accounts and 10 million earlier messages must answer as fast as
an empty one: that holds only while no statement a message runs reads a whole
table. This records every statement the store runs for real messages through a
running relay (SMTP in with AUTH and with a bound network, the meter's checks, the
hold, the commit at end of DATA, a released hold, delivery's per-recipient results:
delivered, refused for good, deferred), then asks SQLite for each one's plan
(EXPLAIN QUERY PLAN, on the store's own file and schema) and fails on a full scan
of a table or an index SQLite would build for the statement on the fly.

SQLite plans without statistics (the store never runs ANALYZE), so a plan does not
depend on how many rows the tables hold: the small store here plans as the big one.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
from pathlib import Path

import aiosmtplib
import asyncpg

from mailmeter.metering.meter import Meter
from mailmeter.metering.postgres import PgStore
from mailmeter.metering.sqlite import SqliteStore
from mailmeter.node import Relay
from mailmeter.policies import parse_plans
from tests.conftest import PASSWORD, RawSmtp, RelayHarness, Upstream, add_account
from tests.pgserver import PG_URL, isolated_schema

MESSAGE = b"From: app@example.com\r\nTo: a@dest.test\r\nSubject: plans\r\n\r\nhello\r\n"

# The statements allowed to read a whole table: the bound networks' version (a table of one
# row), asked at most every NETWORKS_TTL seconds per process (metering/meter.py
# account_for_client), and every account's bound networks, read only when that version changed.
WHOLE_TABLE_READS = (
    re.compile(r"^SELECT version FROM network_bindings_version$"),
    re.compile(r"^SELECT n\.network, a\.name FROM account_networks n JOIN accounts a"),
)

_DML = re.compile(r"^\s*(SELECT|INSERT|UPDATE|DELETE|WITH)\b", re.IGNORECASE)


class StatementLog:
    """Every statement the store's connections run, as SQLite expanded it (parameters bound)."""

    def __init__(self) -> None:
        self.statements: list[str] = []
        self.recording = False

    def __call__(self, statement: str) -> None:
        if self.recording and _DML.match(statement):
            self.statements.append(statement)

    async def attach(self, relay: Relay) -> None:
        store = relay.meter.store
        for connection in (store._db, store._reader):  # type: ignore[attr-defined]
            # sqlite3 objects belong to aiosqlite's thread: set the callback there.
            await connection._execute(connection._conn.set_trace_callback, self)


def table_scans(database: Path, statement: str) -> list[str]:
    """The plan lines of `statement` that read a whole table or build an index on the fly."""
    with sqlite3.connect(database) as conn:
        plan = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {statement}")]
    return [
        line
        for line in plan
        if (line.startswith("SCAN ") and not line.startswith("SCAN (subquery") and line != "SCAN CONSTANT ROW")
        or "AUTOMATIC" in line
    ]


async def send_messages(harness: RelayHarness) -> None:
    """One message by AUTH (3 recipients: delivered, refused for good, deferred), one from a
    bound network, and a transaction given up with RSET (its hold released)."""
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=harness.port, start_tls=False, timeout=10)
    await client.connect()
    try:
        await client.login("app", PASSWORD)
        errors, _ = await client.sendmail(
            "app@example.com", ["ok@dest.test", "gone@dest.test", "later@dest.test"], MESSAGE
        )
        assert errors == {}
    finally:
        client.close()
    raw = await RawSmtp.open(harness.port, "127.0.0.2")
    try:
        assert (await raw.reply()).code == 220
        assert (await raw.command("EHLO client.test")).code == 250
        for line in ("MAIL FROM:<x@office.test>", "RCPT TO:<a@dest.test>"):
            assert (await raw.command(line)).code == 250
        assert (await raw.command("RSET")).code == 250
        for line in ("MAIL FROM:<x@office.test>", "RCPT TO:<b@dest.test>"):
            assert (await raw.command(line)).code == 250
        assert (await raw.command("DATA")).code == 354
        await raw.send(MESSAGE + b".\r\n")
        assert (await raw.reply()).code == 250
        assert (await raw.command("QUIT")).code == 221
    finally:
        raw.close()


async def test_no_statement_of_a_message_scans_a_table(make_relay, upstream: Upstream, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    upstream.handler.rcpt_replies = {"gone@dest.test": "550 5.1.1 no such user", "later@dest.test": "450 4.2.0 busy"}
    harness = make_relay(upstream.port)
    relay = await harness.start()
    await add_account(harness)
    await add_account(harness, name="office", domains=("office.test",), networks=("127.0.0.2/32",), password=None)
    log = StatementLog()
    await log.attach(relay)
    log.recording = True
    await send_messages(harness)
    # Delivery's results: delivered and refused for good counted, deferred recorded (read on a
    # connection of our own: the meter's usage report is not what a message runs).
    database = tmp_path / "meter.db"
    deadline = asyncio.get_running_loop().time() + 15
    while True:
        with sqlite3.connect(database) as conn:
            counted = conn.execute(
                "SELECT SUM(delivered), SUM(hard_bounced), (SELECT COUNT(*) FROM recipient_results"
                " WHERE result = 'deferred') FROM period_usage"
            ).fetchone()
        if tuple(counted) == (2, 1, 1):
            break
        assert asyncio.get_running_loop().time() < deadline, f"results not recorded: {counted}"
        await asyncio.sleep(0.05)
    log.recording = False
    statements = list(dict.fromkeys(log.statements))
    # What a message does, seen: the statements below are the ones this test is about.
    wanted = ["INSERT INTO holds", "INSERT INTO messages", "DELETE FROM holds", "INSERT INTO recipient_results"]
    for fragment in wanted:
        assert any(fragment in s for s in statements), f"no {fragment!r} among {len(statements)} statements"
    scanning = {}
    for statement in statements:
        if any(allowed.match(statement) for allowed in WHOLE_TABLE_READS):
            continue
        found = table_scans(database, statement)
        if found:
            scanning[statement] = found
    assert not scanning, "statements of a message that read a whole table:\n" + "\n".join(
        f"{s}\n  -> {found}" for s, found in scanning.items()
    )


def test_the_check_sees_a_scan() -> None:
    """The check itself: a lookup on an unindexed column is a scan, one on a key is not."""
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE t (id TEXT PRIMARY KEY, other TEXT)")
    plans = {
        sql: [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}")]
        for sql in ("SELECT * FROM t WHERE other = 'x'", "SELECT * FROM t WHERE id = 'x'")
    }
    assert plans["SELECT * FROM t WHERE other = 'x'"] == ["SCAN t"]
    assert plans["SELECT * FROM t WHERE id = 'x'"][0].startswith("SEARCH t USING INDEX")


# -- PostgreSQL: the same calls, the same rule -------------------------------------------------


class PgStatementLog:
    """Every statement the PostgreSQL store's pooled connections run, with its arguments."""

    def __init__(self) -> None:
        self.statements: list[tuple[str, tuple[object, ...]]] = []
        self.recording = False

    def __call__(self, record: asyncpg.connection.LoggedQuery) -> None:
        # pg_advisory_unlock_all(): the pool's reset of a connection it takes back, not the store's.
        if self.recording and _DML.match(record.query) and "pg_advisory_unlock_all" not in record.query:
            self.statements.append((record.query, tuple(record.args)))

    def attach(self, store: PgStore) -> None:
        pool = store._pool
        assert pool is not None
        for holder in pool._holders:  # connections open now, and every one the pool opens later
            if holder._con is not None:
                holder._con.add_query_logger(self)
        previous = pool._init

        async def init(connection: asyncpg.Connection) -> None:
            if previous is not None:
                await previous(connection)
            connection.add_query_logger(self)

        pool._init = init


async def test_no_statement_of_a_message_scans_a_table_on_postgresql() -> None:
    """The meter's calls for messages on the PostgreSQL store (a fresh schema of the real
    server): each statement's plan with sequential scans priced out (enable_seqscan = off),
    so that a table the planner still reads whole is one no index can serve."""
    async with isolated_schema() as schema:
        store = PgStore(PG_URL, server_settings={"search_path": schema})
        meter = Meter(store, parse_plans({"small": {"email_quota": 1000}}), node="n1")
        await store.open()
        try:
            await meter.add_account("app", None, "small", ["example.com"], ["127.0.0.0/8"])
            await meter.add_account("other", None, "small", ["other.test"], ["192.0.2.0/24"])
            log = PgStatementLog()
            log.attach(store)
            log.recording = True
            for number, result in enumerate(("delivered", "hard_bounced", "deferred")):
                name = await meter.account_for_client("127.0.0.1")
                assert name == "app"
                assert (await meter.mail_check(name))[1] is None
                grant = await meter.reserve(name, None, 1)
                assert grant.granted == 1
                await meter.commit(grant.hold_id, f"Q{number}", 1, account=name)
                code = {"delivered": 250, "hard_bounced": 550, "deferred": 450}[result]
                await meter.record_result(f"Q{number}", f"r{number}@dest.test", result, "reply", code)
            given_up = await meter.reserve("app", None, 1)
            await meter.release(given_up.hold_id)
            log.recording = False
            assert (await meter.usage("app")).usage.accepted == 3
            statements = {}  # each statement once, with the arguments it first ran with
            for query, args in log.statements:
                statements.setdefault(query, args)
            for fragment in ("INSERT INTO holds", "INSERT INTO messages", "recipient_results"):
                assert any(fragment in query for query in statements), fragment
            scanning = {}
            admin = await asyncpg.connect(PG_URL, server_settings={"search_path": schema})
            try:
                await admin.execute("SET enable_seqscan = off")
                for query, args in statements.items():
                    if any(allowed.match(query) for allowed in WHOLE_TABLE_READS):
                        continue
                    plan = [row[0] for row in await admin.fetch(f"EXPLAIN {query}", *args)]
                    seq = [line.strip() for line in plan if "Seq Scan" in line]
                    if seq:
                        scanning[query] = seq
                # The check itself: a column no index serves is still read whole.
                unindexed = await admin.fetch("EXPLAIN SELECT 1 FROM recipient_results WHERE detail = 'x'")
                assert any("Seq Scan" in row[0] for row in unindexed)
            finally:
                await admin.close()
            assert not scanning, "statements of a message that read a whole table:\n" + "\n".join(
                f"{q}\n  -> {found}" for q, found in scanning.items()
            )
        finally:
            await store.close()


async def test_a_periods_results_and_the_usage_report_read_only_the_accounts_messages(tmp_path: Path) -> None:
    """The invoice at a period's close (results by region) and the usage report (by sub-type,
    deferred) join results to the account's messages through messages_by_account_period (schema 10):
    before it, both read every result ever recorded, 20 s per account on a store of
    10 million (bench/big_store.py). The deferred count reads the partial index of deferred
    results only (results_deferred: what is in flight, not the history)."""
    store = SqliteStore(tmp_path / "meter.db")
    meter = Meter(store, parse_plans({"small": {"email_quota": 1000}}), node="n1")
    await store.open()
    try:
        await meter.add_account("app", None, "small", ["example.com"], [])
        grant = await meter.reserve("app", None, 1)
        await meter.commit(grant.hold_id, "Q1", 1, account="app")
        await meter.record_result("Q1", "r@dest.test", "hard_bounced", "no", 550, "5.1.1")
        log = StatementLog()
        for connection in (store._db, store._reader):
            assert connection is not None
            await connection._execute(connection._conn.set_trace_callback, log)
        log.recording = True
        account = await meter.account("app")
        report = await meter.usage("app")
        await store.results_by_region(account.id, report.period.key)
        log.recording = False
    finally:
        await store.close()
    joins = [s for s in log.statements if "JOIN messages m" in s]
    assert len(joins) == 3, joins  # by sub-type, deferred, by region
    scanning = {}
    for statement in joins:
        found = [line for line in table_scans(tmp_path / "meter.db", statement) if "results_deferred" not in line]
        if found:
            scanning[statement] = found
    assert not scanning, scanning
