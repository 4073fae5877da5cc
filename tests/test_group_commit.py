"""Group commit in the SQLite store: concurrent writes share a transaction, not their fate."""

from __future__ import annotations

import asyncio
from pathlib import Path

from metering.meter import Meter
from metering.sqlite_store import SqliteStore, UnknownHold
from policies import parse_plans


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
