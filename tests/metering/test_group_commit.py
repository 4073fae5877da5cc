"""Group commit in the SQLite store: concurrent writes share a transaction, not their fate."""

from __future__ import annotations

import asyncio
from pathlib import Path

from mailmeter.metering.meter import Meter
from mailmeter.metering.records import UnknownHold
from mailmeter.metering.sqlite import SqliteStore
from mailmeter.policies import parse_plans


async def test_a_failing_write_rolls_back_alone_and_the_rest_commit(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "meter.db")
    await store.open()
    try:
        meter = Meter(store, parse_plans({"p": {"email_quota": 1000}}), node="n1")
        await meter.add_account("app", "pw", "p", ["example.com"], [])
        grants = await asyncio.gather(*(meter.reserve("app", None, 1) for _ in range(50)))
        assert sum(g.granted for g in grants) == 50
        commits = [meter.commit(g.hold_id, f"Q{n}", 1) for n, g in enumerate(grants)]
        commits.insert(25, meter.commit("no-such-hold", "QX", 1))  # fails in the middle of a batch
        outcomes = await asyncio.gather(*commits, return_exceptions=True)
        assert isinstance(outcomes[25], UnknownHold)
        assert [o for n, o in enumerate(outcomes) if n != 25] == [None] * 50
        usage = (await meter.usage("app")).usage
        assert (usage.accepted, usage.reserved) == (50, 0)
        assert not await store.message_committed("QX")
    finally:
        await store.close()
    # Everything acknowledged is in the file after a reopen.
    reopened = SqliteStore(tmp_path / "meter.db")
    await reopened.open()
    try:
        assert all([await reopened.message_committed(f"Q{n}") for n in range(50)])
    finally:
        await reopened.close()


async def test_holds_commit_without_fsync_everything_else_with_it(tmp_path: Path) -> None:
    """A batch of only holds (reserve, release) commits with synchronous=NORMAL: a restarting
    node releases its holds anyway. Any batch with a commit, and every other write, is FULL."""
    store = SqliteStore(tmp_path / "meter.db")
    await store.open()
    statements: list[str] = []
    try:
        meter = Meter(store, parse_plans({"p": {"email_quota": 1000}}), node="n1")
        await meter.add_account("app", "pw", "p", ["example.com"], [])
        db = store._db
        assert db is not None
        await db._execute(db._conn.set_trace_callback, statements.append)  # in the connection's thread

        def syncs() -> list[str]:
            seen = [s for s in statements if s.startswith(("PRAGMA synchronous", "BEGIN", "COMMIT"))]
            statements.clear()
            return seen

        grant = await meter.reserve("app", "h1", 2)
        assert syncs() == ["PRAGMA synchronous = NORMAL", "BEGIN IMMEDIATE", "COMMIT", "PRAGMA synchronous = FULL"]
        await meter.commit(grant.hold_id, "Q1", 1)
        assert syncs() == ["BEGIN IMMEDIATE", "COMMIT"]  # the connection's FULL: fsynced
        await meter.reserve("app", "h2", 1)
        syncs()
        # A reserve and a commit in one batch: the batch is durable.
        await asyncio.gather(meter.reserve("app", "h3", 1), meter.commit("h2", "Q2", 1))
        seen = syncs()
        assert "PRAGMA synchronous = NORMAL" not in seen and seen.count("COMMIT") == 1
        assert await meter.release("h3") == 1
        assert syncs()[0] == "PRAGMA synchronous = NORMAL"
        await meter.add_balance("app", 1_000_000)  # an admin write after a holds-only batch
        assert "PRAGMA synchronous = NORMAL" not in syncs()
        level = await db._execute(lambda: db._conn.execute("PRAGMA synchronous").fetchone()[0])
        assert level == 2  # FULL, on the writer's connection
        usage = (await meter.usage("app")).usage
        assert (usage.accepted, usage.reserved) == (2, 0)  # a commit gives back what it did not use
    finally:
        await store.close()


async def test_reads_do_not_wait_for_a_write_in_flight(tmp_path: Path) -> None:
    """MAIL's account check reads the last commit while a write batch waits for the disk
    or for the database lock (here: another process holds it for a second)."""
    import sqlite3

    store = SqliteStore(tmp_path / "meter.db", busy_timeout_ms=3000)
    await store.open()
    locker = sqlite3.connect(tmp_path / "meter.db", isolation_level=None)
    try:
        meter = Meter(store, parse_plans({"p": {"email_quota": 1000}}), node="n1")
        await meter.add_account("app", "pw", "p", ["example.com"], [])
        locker.execute("BEGIN IMMEDIATE")  # another writer: our next batch waits for it
        reserve = asyncio.ensure_future(meter.reserve("app", "h1", 1))
        await asyncio.sleep(0.2)
        assert not reserve.done()
        domains, refusal = await meter.mail_check("app")
        assert domains == ("example.com",) and refusal is None
        assert (await meter.usage("app")).usage.reserved == 0  # the last commit, not the pending hold
        assert not reserve.done()  # the reads did not wait for the write (it waits for the locker)
        locker.execute("COMMIT")
        assert (await reserve).granted == 1
        assert (await meter.usage("app")).usage.reserved == 1  # a read sees a write once it returned
    finally:
        locker.close()
        await store.close()
