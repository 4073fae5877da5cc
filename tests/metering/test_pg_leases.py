"""Allowance leasing on the shared PostgreSQL meter: fast, and still never an overspend.

"Nodes" are separate PgStores (own pools) on one fresh schema, each behind its own
Meter with leasing on, as relay processes sharing one database.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from pathlib import Path

import pytest

from mailmeter.metering.leases import LeaseSettings
from mailmeter.metering.meter import Meter
from mailmeter.metering.postgres import PgStore
from mailmeter.metering.records import LeasedCommit, StoreUnavailable, UnknownHold
from mailmeter.metering.sqlite import SqliteStore
from mailmeter.policies import parse_plans
from tests.pgserver import PG_URL, admin_connection, isolated_schema, scalar

PLANS = parse_plans({"small": {"email_quota": 1000}, "other": {"email_quota": 500}})
NOW = datetime(2026, 4, 10, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    async with isolated_schema() as name:
        yield name


class Nodes:
    def __init__(self, schema: str, count: int, settings: LeaseSettings) -> None:
        self.schema = schema
        self.stores = [PgStore(PG_URL, pool_size=5, server_settings={"search_path": schema}) for _ in range(count)]
        self.meters = [
            Meter(store, PLANS, node=f"n{n + 1}", clock=lambda: NOW, region=f"region-{n + 1}", leasing=settings)
            for n, store in enumerate(self.stores)
        ]

    async def __aenter__(self) -> Nodes:
        await asyncio.gather(*(store.open() for store in self.stores))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.gather(*(store.close() for store in self.stores))

    async def counters(self) -> tuple[int, int]:
        """(accepted, reserved) of account 'app' straight from the database."""
        accepted = await scalar(self.schema, "SELECT COALESCE(SUM(accepted), 0) FROM period_usage")
        reserved = await scalar(self.schema, "SELECT COALESCE(SUM(reserved), 0) FROM period_usage")
        return int(accepted), int(reserved)


async def fetch_value(schema: str, sql: str) -> object:
    admin = await admin_connection()
    try:
        await admin.execute(f'SET search_path = "{schema}"')
        return await admin.fetchval(sql)
    finally:
        await admin.close()


async def lease_rows(schema: str) -> int:
    return int(await scalar(schema, "SELECT COALESCE(SUM(emails), 0) FROM holds WHERE id LIKE 'lease/%'"))


async def test_a_lease_answers_reserves_locally_and_commits_take_from_it(schema: str) -> None:
    async with Nodes(schema, 1, LeaseSettings(emails=50, seconds=60)) as nodes:
        meter = nodes.meters[0]
        await meter.add_account("app", "pw", "small", ["example.com"], [])
        first = await meter.reserve("app", "h0", 1)
        assert first.granted == 1
        assert await nodes.counters() == (0, 51)  # the session's email and a block of 50
        assert await lease_rows(schema) == 51
        for n in range(1, 11):  # answered from the lease: the database does not change
            assert (await meter.reserve("app", f"h{n}", 2)).granted == 2
        assert await nodes.counters() == (0, 51)
        await asyncio.gather(*(meter.commit(f"h{n}", f"Q{n}", 1) for n in range(1, 11)))
        assert await nodes.counters() == (10, 41)  # each committed 1 of its 2; the other is free again
        await meter.commit("h1", "Q1", 1)  # the same message again: the hold is gone, nothing changes
        assert await nodes.counters() == (10, 41)
        with pytest.raises(ValueError):
            await meter.commit("h0", "Q0", 2)  # more than held
        assert await meter.release("h0") == 1
        assert await scalar(schema, "SELECT COUNT(*) FROM messages") == 10
        report = await meter.usage("app")
        assert report.as_json()["by_region"] == {"region-1": 10}
        assert await meter.tend_leases(force=True) == 41  # at stop: every unused email goes back
        assert await nodes.counters() == (10, 0)
        assert await scalar(schema, "SELECT COUNT(*) FROM holds") == 0


async def test_concurrent_sessions_share_one_renewal_and_few_commit_transactions(schema: str) -> None:
    async with Nodes(schema, 1, LeaseSettings(emails=50, seconds=60)) as nodes:
        meter = nodes.meters[0]
        await meter.add_account("app", "pw", "small", ["example.com"], [])
        leases = meter.leases
        assert leases is not None
        grants = await asyncio.gather(*(meter.reserve("app", f"h{n}", 1) for n in range(20)))
        assert [grant.granted for grant in grants] == [1] * 20
        assert leases.renewals == 1  # the first session borrowed; the other 19 carved from it
        await asyncio.gather(*(meter.commit(f"h{n}", f"Q{n}", 1) for n in range(20)))
        assert leases.commit_batches <= 2  # the first alone, the 19 that came meanwhile together
        assert await nodes.counters() == (20, 31)
        assert await scalar(schema, "SELECT COUNT(*) FROM messages") == 20


async def test_a_retried_batch_counts_each_message_once(schema: str) -> None:
    async with Nodes(schema, 1, LeaseSettings(emails=50, seconds=60)) as nodes:
        meter = nodes.meters[0]
        await meter.add_account("app", "pw", "small", ["example.com"], [])
        await meter.reserve("app", "h1", 3)
        lease_id = str(await fetch_value(schema, "SELECT id FROM holds"))
        account = await meter.account("app")
        period = meter.period_of(account).key
        batch = [LeasedCommit(lease_id, account.id, period, "Q1", 3, "c1")]
        store = nodes.stores[0]
        assert await store.commit_leased(batch, "n1", NOW, "r", None) == [None]
        assert await store.commit_leased(batch, "n1", NOW, "r", None) == [None]  # idempotent on the queue id
        assert await nodes.counters() == (3, 50)
        too_many = [LeasedCommit(lease_id, account.id, period, "Q2", 51, "")]
        outcome = await store.commit_leased(too_many, "n1", NOW, "r", None)
        assert isinstance(outcome[0], UnknownHold)  # the lease does not hold them: nothing counted
        assert await nodes.counters() == (3, 50)


async def test_four_leasing_nodes_racing_for_the_last_100_never_pass_them(schema: str) -> None:
    async with Nodes(schema, 4, LeaseSettings(emails=50, seconds=0.2)) as nodes:
        first = nodes.meters[0]
        await first.add_account("app", "pw", "small", ["example.com"], [])
        preload = await first.reserve("app", None, 900)
        await first.commit(preload.hold_id, "PRELOAD", 900)
        assert await first.tend_leases(force=True) >= 0
        sent: list[int] = []
        highest = 0

        async def watch() -> None:
            nonlocal highest
            while True:
                accepted, reserved = await nodes.counters()
                highest = max(highest, accepted + reserved)
                await asyncio.sleep(0.01)

        async def sender(n: int) -> None:
            meter = nodes.meters[n % 4]
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 20
            attempt = 0
            while loop.time() < deadline:  # like an MTA's queue: a 4xx is retried later
                attempt += 1
                hold = f"s{n}-{attempt}"
                grant = await meter.reserve("app", hold, 1)
                if grant.granted:
                    await meter.commit(hold, f"Q{n}", 1)
                    sent.append(n)
                    return
                assert grant.refusal == "quota_exhausted"
                await meter.release(hold)
                if (await nodes.counters())[0] >= 1000:
                    return
                await asyncio.sleep(0.05)

        async def tending() -> None:
            while True:
                await asyncio.sleep(0.1)
                await asyncio.gather(*(meter.tend_leases() for meter in nodes.meters))

        watcher, tender = asyncio.create_task(watch()), asyncio.create_task(tending())
        await asyncio.gather(*(sender(n) for n in range(150)))
        watcher.cancel()
        tender.cancel()
        await asyncio.gather(watcher, tender, return_exceptions=True)
        await asyncio.gather(*(meter.tend_leases(force=True) for meter in nodes.meters))
        assert len(sent) == 100  # exactly the last 100, each once
        assert await nodes.counters() == (1000, 0)
        assert highest <= 1000
        assert await scalar(schema, "SELECT COUNT(*) FROM messages") == 101
        assert (await first.reserve("app", None, 1)).granted == 0


async def test_a_restarted_node_releases_its_leases(schema: str) -> None:
    async with Nodes(schema, 2, LeaseSettings(emails=50, seconds=60)) as nodes:
        one, two = nodes.meters
        await one.add_account("app", "pw", "small", ["example.com"], [])
        await one.reserve("app", "h1", 1)
        await two.reserve("app", "h2", 1)
        assert await nodes.counters() == (0, 102)
        assert await one.release_abandoned_holds() == 51  # node one started again: only its lease
        assert await nodes.counters() == (0, 51)
        await two.commit("h2", "Q2", 1)
        assert await nodes.counters() == (1, 50)


async def test_a_dead_nodes_lease_is_reclaimed_and_its_late_commit_counts_nothing(schema: str) -> None:
    async with Nodes(schema, 2, LeaseSettings(emails=50, seconds=0.05, stale_seconds=0.2)) as nodes:
        one, two = nodes.meters
        two.clock = lambda: datetime.now(timezone.utc)  # stale_seconds is measured on the clock
        one.clock = lambda: datetime.now(timezone.utc)
        one.leases.clock = two.leases.clock = lambda: datetime.now(timezone.utc)  # type: ignore[union-attr]
        await one.add_account("app", "pw", "small", ["example.com"], [])
        await one.reserve("app", "h1", 1)  # then node one stops answering (no upkeep)
        assert await nodes.counters() == (0, 51)
        await asyncio.sleep(0.3)
        await two.tend_leases()
        assert await nodes.counters() == (0, 0)  # reclaimed: the account has its emails back
        with pytest.raises(UnknownHold):
            await one.commit("h1", "Q1", 1)  # the lease no longer holds it: not accepted
        assert await nodes.counters() == (0, 0)
        assert await scalar(schema, "SELECT COUNT(*) FROM messages") == 0
        await one.release("h1")
        assert (await one.reserve("app", "h3", 1)).granted == 1  # a new lease


async def test_a_failed_payment_stops_carving_within_the_lease_time(schema: str) -> None:
    async with Nodes(schema, 2, LeaseSettings(emails=50, seconds=0.3)) as nodes:
        one, two = nodes.meters
        await one.add_account("app", "pw", "small", ["example.com"], [])
        assert (await one.reserve("app", "h1", 1)).granted == 1
        await two.set_payment("app", False, "card declined")
        _, refusal = await one.mail_check("app")
        assert refusal is not None and refusal.value == "payment_failed"  # MAIL reads the account: at once
        await asyncio.sleep(0.35)
        grant = await one.reserve("app", "h2", 1)  # the lease is renewed: the standing is decided again
        assert (grant.granted, grant.refusal) == (0, "payment_failed")
        assert await nodes.counters() == (0, 1)  # the unused block went back; h1's carve stays
        await one.commit("h1", "Q1", 1)  # held before the payment failed: it commits, as any hold would
        await two.set_payment("app", True)
        assert (await one.reserve("app", "h3", 1)).granted == 1


async def test_an_idle_lease_is_given_back(schema: str) -> None:
    async with Nodes(schema, 1, LeaseSettings(emails=50, seconds=1.0)) as nodes:
        meter = nodes.meters[0]
        await meter.add_account("app", "pw", "small", ["example.com"], [])
        await meter.reserve("app", "h1", 1)
        await meter.tend_leases()
        assert await nodes.counters() == (0, 51)  # still fresh: kept
        await asyncio.sleep(1.05)
        assert await meter.tend_leases() == 50  # idle: the block goes back; the carve stays
        assert await nodes.counters() == (0, 1)
        assert await meter.release("h1") == 1
        await asyncio.sleep(1.05)
        assert await meter.tend_leases() == 1
        assert await nodes.counters() == (0, 0)
        assert await scalar(schema, "SELECT COUNT(*) FROM holds") == 0


async def test_one_batch_commits_several_accounts_with_their_campaigns(schema: str) -> None:
    async with Nodes(schema, 1, LeaseSettings(emails=50, seconds=60)) as nodes:
        meter = nodes.meters[0]
        await meter.add_account("app", "pw", "small", ["example.com"], [])
        await meter.add_account("shop", "pw", "other", ["shop.test"], [])
        for n in range(20):
            assert (await meter.reserve("app" if n % 2 else "shop", f"h{n}", 2)).granted == 2
        await asyncio.gather(
            *(meter.commit(f"h{n}", f"Q{n}", 2, campaign="spring" if n % 4 < 2 else "") for n in range(20))
        )
        app, shop = (await meter.usage("app")).as_json(), (await meter.usage("shop")).as_json()
        assert (app["accepted"], shop["accepted"]) == (20, 20)
        assert app["by_campaign"] == {"spring": 10, "(untagged)": 10}
        assert (await meter.account("app")).awaiting_results == 20


async def test_leasing_needs_the_postgresql_store(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "m.db")
    with pytest.raises(ValueError, match="PostgreSQL"):
        Meter(store, PLANS, node="n1", leasing=LeaseSettings())


async def test_a_lost_lease_fails_the_open_transaction_not_the_account(schema: str) -> None:
    async with Nodes(schema, 1, LeaseSettings(emails=2, seconds=0.01)) as nodes:
        meter = nodes.meters[0]
        await meter.add_account("app", "pw", "small", ["example.com"], [])
        assert (await meter.reserve("app", "h1", 1)).granted == 1
        await fetch_value(schema, "DELETE FROM holds")  # as if another node reclaimed it
        await asyncio.sleep(0.02)
        with pytest.raises(StoreUnavailable):
            await meter.reserve("app", "h1", 1)  # the hold's lease is gone: 451, the client retries
        await meter.release("h1")
        assert (await meter.reserve("app", "h2", 1)).granted == 1


async def test_a_reserve_waiting_while_an_idle_lease_is_given_back_moves_to_a_new_lease(schema: str) -> None:
    async with Nodes(schema, 1, LeaseSettings(emails=50, seconds=0.05)) as nodes:
        meter = nodes.meters[0]
        await meter.add_account("app", "pw", "small", ["example.com"], [])
        assert (await meter.reserve("app", "h1", 1)).granted == 1
        assert await meter.release("h1") == 1
        await asyncio.sleep(0.06)
        # The upkeep gives the idle lease back (and drops it) while a session asks for an email.
        tend = asyncio.create_task(meter.tend_leases())
        await asyncio.sleep(0)  # the upkeep holds the lease's lock now
        grant = await meter.reserve("app", "h2", 1)
        await tend
        assert grant.granted == 1
        await meter.commit("h2", "Q2", 1)
        await meter.tend_leases(force=True)
        assert await nodes.counters() == (1, 0)
