"""The PostgreSQL store's guarantees, against the real server, several connections at once.

Each test works in its own fresh schema (tests/pgserver.py). "Nodes" here are
separate PgStore instances, each with its own connection pool, sharing one schema:
exactly what several relay processes sharing one database do.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from datetime import date, datetime, timezone
from pathlib import Path

import pytest
import yaml
from structlog.testing import capture_logs

from mailmeter.config import ConfigError, load_config
from mailmeter.factory import open_store
from mailmeter.metering.billing import Billing, CollectionCharge
from mailmeter.metering.gateway import NoGateway
from mailmeter.metering.meter import Meter
from mailmeter.metering.postgres import PgStore
from mailmeter.metering.postgres.schema import PG_MIGRATIONS
from mailmeter.metering.records import Result, StoreUnavailable, UnknownHold
from mailmeter.metering.sqlite import SqliteStore
from mailmeter.metering.sqlite.schema import MIGRATIONS
from mailmeter.policies import Plan, parse_plans
from mailmeter.service import AdminService
from tests.conftest import free_port, write_config
from tests.pgserver import PG_URL, admin_connection, isolated_schema, scalar, schema_url

REPO = Path(__file__).resolve().parents[2]
PLANS = parse_plans({"small": {"email_quota": 1000}})
NOW = datetime(2026, 4, 10, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    async with isolated_schema() as name:
        yield name


class Nodes:
    """Several PgStores (own pools) on one schema, each behind its own Meter, as relay nodes."""

    def __init__(
        self, schema: str, count: int, plans: Mapping[str, Plan] = PLANS, pool_size: int = 5, **settings: str
    ) -> None:
        self.stores = [
            PgStore(PG_URL, pool_size=pool_size, server_settings={"search_path": schema, **settings})
            for _ in range(count)
        ]
        self.meters = [
            Meter(store, plans, node=f"n{n + 1}", clock=lambda: NOW, region=f"region-{n + 1}")
            for n, store in enumerate(self.stores)
        ]

    async def __aenter__(self) -> Nodes:
        await asyncio.gather(*(store.open() for store in self.stores))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.gather(*(store.close() for store in self.stores))


# -- schema and migrations ----------------------------------------------------------------


async def test_migrations_mirror_sqlite_and_concurrent_upgrades_apply_once(schema: str, tmp_path: Path) -> None:
    assert len(PG_MIGRATIONS) == len(MIGRATIONS)  # a migration added to one store only fails here
    async with Nodes(schema, 4):  # four nodes start on an empty schema at the same moment
        pass
    assert await scalar(schema, "SELECT COUNT(*) FROM schema_version") == 1
    assert await scalar(schema, "SELECT version FROM schema_version") == len(MIGRATIONS)
    # The same tables with the same columns as the SQLite store.
    sqlite = SqliteStore(tmp_path / "meter.db")
    await sqlite.open()
    sqlite_columns: set[tuple[str, str]] = set()
    for (table,) in await sqlite._read("SELECT name FROM sqlite_master WHERE type = 'table'"):
        for column in await sqlite._read(f"SELECT name FROM pragma_table_info('{table}')"):
            sqlite_columns.add((table, column[0]))
    await sqlite.close()
    admin = await admin_connection()
    try:
        rows = await admin.fetch(
            "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = $1", schema
        )
    finally:
        await admin.close()
    assert {(row[0], row[1]) for row in rows} == sqlite_columns


async def test_db_upgrade_from_two_processes_at_once(schema: str, tmp_path: Path) -> None:
    configs = []
    for node in ("a", "b"):
        directory = tmp_path / node
        directory.mkdir()
        configs.append(
            write_config(directory, 2526, node={"name": node, "region": node}, database={"url": schema_url(schema)})
        )
    commands = [
        asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "mailmeter.cli",
            "--config",
            str(config),
            "db",
            "upgrade",
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=REPO,
        )
        for config in configs
    ]
    processes = await asyncio.gather(*commands)
    outputs = await asyncio.gather(*(process.communicate() for process in processes))
    for process, (out, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err.decode()
        assert f"is at schema version {len(PG_MIGRATIONS)}" in out.decode()
        assert "postgresql://postgres@127.0.0.1:5432/test" in out.decode()
    assert await scalar(schema, "SELECT COUNT(*) FROM schema_version") == 1


# -- reserve, commit, release ------------------------------------------------------------


async def test_reserve_commit_release(schema: str) -> None:
    async with Nodes(schema, 1) as nodes:
        meter = nodes.meters[0]
        await meter.add_account("app", "pw", "small", ["example.com"], [])
        grant = await meter.reserve("app", "h1", 5)
        assert (grant.granted, (await meter.usage("app")).usage.reserved) == (5, 5)
        with pytest.raises(ValueError):
            await meter.commit("h1", "Q1", 6)  # more than held: refused, nothing changed
        await meter.commit("h1", "Q1", 3)  # two held emails go back
        await meter.commit("h1", "Q1", 3)  # the same queue id again: counted once
        usage = (await meter.usage("app")).usage
        assert (usage.accepted, usage.reserved) == (3, 0)
        assert await meter.release("h1") == 0  # committed: nothing left to release
        with pytest.raises(UnknownHold):
            await meter.commit("h1", "Q2", 1)
        grant = await meter.reserve("app", None, 4)
        assert await meter.release(grant.hold_id) == 4
        assert await meter.release(grant.hold_id) == 0
        usage = (await meter.usage("app")).usage
        assert (usage.accepted, usage.reserved) == (3, 0)
        assert (await meter.usage("app")).as_json()["by_region"] == {"region-1": 3}
        assert await scalar(schema, "SELECT COUNT(*) FROM holds") == 0


async def test_holds_are_released_per_node(schema: str) -> None:
    async with Nodes(schema, 2) as nodes:
        one, two = nodes.meters
        await one.add_account("app", "pw", "small", ["example.com"], [])
        for n in range(3):
            await one.reserve("app", f"one-{n}", 2)
        kept = await two.reserve("app", "two-0", 1)
        assert (await one.usage("app")).usage.reserved == 7
        assert await one.release_abandoned_holds() == 6  # node one restarted: only its holds
        assert (await two.usage("app")).usage.reserved == 1
        assert await one.release_abandoned_holds() == 0
        await two.commit(kept.hold_id, "Q-two", 1)  # node two's session is alive and commits
        usage = (await one.usage("app")).usage
        assert (usage.accepted, usage.reserved) == (1, 0)


async def test_the_same_message_committed_on_two_connections_counts_once(schema: str) -> None:
    async with Nodes(schema, 2) as nodes:
        one, two = nodes.meters
        await one.add_account("app", "pw", "small", ["example.com"], [])
        await one.reserve("app", "h", 10)
        await asyncio.gather(one.commit("h", "Q1", 10), two.commit("h", "Q1", 10))
        usage = (await one.usage("app")).usage
        assert (usage.accepted, usage.reserved) == (10, 0)
        assert (await one.account("app")).awaiting_results == 10


async def test_a_result_reported_many_times_at_once_is_counted_once(schema: str) -> None:
    async with Nodes(schema, 3) as nodes:
        meter = nodes.meters[0]
        await meter.add_account("app", "pw", "small", ["example.com"], [])
        grant = await meter.reserve("app", None, 2)
        await meter.commit(grant.hold_id, "Q1", 2)
        account = await meter.account("app")
        period = meter.period_of(account).key
        reports = [  # straight to the stores: all fifteen transactions in flight at once
            store.record_result("Q1", "r1@dest.test", Result.DELIVERED, "250", account.id, period, NOW)
            for store in nodes.stores
            for _ in range(5)
        ]
        assert sorted(await asyncio.gather(*reports)) == [False] * 14 + [True]
        assert not await meter.record_result("Q1", "r1@dest.test", "delivered")
        assert await meter.record_result("Q1", "r2@dest.test", "deferred")  # not final: counted later
        assert await meter.record_result("Q1", "r2@dest.test", "hard_bounced")
        report = await meter.usage("app")
        assert (report.usage.delivered, report.usage.hard_bounced, report.deferred) == (1, 1, 0)
        assert report.account.awaiting_results == 0


async def test_200_concurrent_reserves_over_several_connections_grant_exactly_the_last_100(schema: str) -> None:
    async with Nodes(schema, 4) as nodes:
        first = nodes.meters[0]
        await first.add_account("app", "pw", "small", ["example.com"], [])
        preload = await first.reserve("app", None, 900)
        await first.commit(preload.hold_id, "PRELOAD", 900)
        grants = await asyncio.gather(*(nodes.meters[n % 4].reserve("app", f"h{n}", 1) for n in range(200)))
        assert sum(grant.granted for grant in grants) == 100
        assert {grant.refusal for grant in grants if not grant.granted} == {"quota_exhausted"}
        assert (await first.usage("app")).usage.reserved == 100
        assert await scalar(schema, "SELECT COUNT(*) FROM holds") == 100
        granted = [grant for grant in grants if grant.granted]
        await asyncio.gather(*(nodes.meters[n % 4].commit(g.hold_id, f"Q{n}", 1) for n, g in enumerate(granted)))
        usage = (await first.usage("app")).usage
        assert (usage.accepted, usage.reserved) == (1000, 0)
        assert (await first.reserve("app", None, 1)).granted == 0


# -- billing: periods closed once, charges never doubled ------------------------------------


async def test_nodes_closing_the_same_periods_at_once_invoice_and_charge_once(schema: str) -> None:
    config = yaml.safe_load((REPO / "config.example.yaml").read_text())
    plans = parse_plans(config["plans"])
    clock = [datetime(2026, 4, 20, tzinfo=timezone.utc)]
    async with Nodes(schema, 3, plans=plans) as nodes:
        meters = [Meter(s, plans, node=f"n{n}", clock=lambda: clock[0]) for n, s in enumerate(nodes.stores)]
        meter = meters[0]
        await meter.add_account("a", "pw", "per-email-threshold", ["example.com"], [], subscribed_on=date(2026, 4, 1))
        await meter.add_account("b", "pw", "prepaid-tiered", ["example.com"], [], subscribed_on=date(2026, 4, 1))
        await meter.add_balance("b", 90_000_000)
        for name, emails in (("a", 400_000), ("b", 50_000)):
            grant = await meter.reserve(name, None, emails)
            await meter.commit(grant.hold_id, f"Q-{name}", grant.granted)
        clock[0] = datetime(2026, 5, 2, tzinfo=timezone.utc)
        billings = [Billing(m, NoGateway()) for m in meters]
        with capture_logs() as logs:
            runs = await asyncio.gather(*(b.close_due_periods() for b in billings for _ in range(2)))
        assert set().union(*runs) == {"INV-a-20260401", "INV-b-20260401"}
        assert await scalar(schema, "SELECT COUNT(*) FROM invoices") == 2
        # Only the winning insert of each invoice deducted and charged.
        assert sorted(log["account"] for log in logs if log["event"] == "billing.invoice") == ["a", "b"]
        # a's remainder is collected; b's month ($50) was paid from its balance: nothing to collect.
        assert await scalar(schema, "SELECT COUNT(*) FROM charges WHERE kind = 'invoice'") == 1
        assert await scalar(schema, "SELECT COUNT(*) FROM balance_entries WHERE kind = 'usage'") == 1
        # b's monthly payment: April's when it was added, May's once however many passes ran.
        assert await scalar(schema, "SELECT COUNT(*) FROM charges WHERE kind = 'monthly'") == 2
        assert await scalar(schema, "SELECT COUNT(*) FROM balance_entries WHERE kind = 'monthly'") == 2
        b = await meter.account("b")
        [invoice] = await meter.store.invoices(b.id)
        assert invoice.prepaid_applied == 50_000_000
        assert b.prepaid_balance == 100_000_000 + 90_000_000 - invoice.prepaid_applied + 100_000_000
        assert await scalar(schema, "SELECT COUNT(*) FROM notices WHERE key = 'invoice'") == 2
        # The store's own race, every node's insert in flight at once: one wins, once.
        b_before = (await meter.account("b")).prepaid_balance
        record = replace(invoice, id="INV-b-race", period_key="2026-05-01T00:00:00+02:00")
        collect = CollectionCharge(amount=7, description="race")
        inserted = await asyncio.gather(
            *(
                store.add_invoice(record, collect, 1_000, "{}", clock[0])  # type: ignore[arg-type]  # as Billing does
                for store in nodes.stores
                for _ in range(3)
            )
        )
        assert sorted(inserted) == [False] * 8 + [True]
        assert (await meter.account("b")).prepaid_balance == b_before - 1_000
        assert await scalar(schema, "SELECT COUNT(*) FROM charges WHERE description = 'race'") == 1


async def test_a_payment_event_delivered_to_two_nodes_at_once_applies_once(schema: str) -> None:
    async with Nodes(schema, 2) as nodes:
        services = [AdminService(m, Billing(m, NoGateway()), actor="test") for m in nodes.meters]
        await services[0].add_account("app", "pw", "small", ["example.com"], [], [])
        await services[0].payment("app", "failed", "card declined")
        event = {"id": "evt_1", "type": "payment_method.updated", "account": "app"}
        answers = await asyncio.gather(*(s.payment_event(event, "evt_1") for s in services))
        assert sorted(answer["duplicate"] for answer in answers) == [False, True]
        assert (await nodes.meters[1].account("app")).payment_ok
        [audit] = [e for e in await services[1].audit("app") if e["event_id"] == "evt_1"]
        assert audit["changes"]["payment_state"] == ["failed", "ok"]  # before/after of exactly this change
        assert [e["action"] for e in await services[1].audit("app")] == [
            "payment_method.updated",
            "payment.failed",
            "account.add",
        ]


# -- failures: retried, or StoreUnavailable (the relay answers 451) --------------------------


async def test_unreachable_closed_or_cut_off_database_is_store_unavailable(schema: str) -> None:
    with pytest.raises(StoreUnavailable, match="PostgreSQL"):
        await PgStore(f"postgresql://postgres@127.0.0.1:{free_port()}/test", connect_timeout=2).open()
    name = f"mm-cut-{secrets.token_hex(4)}"
    async with Nodes(schema, 1, application_name=name) as nodes:
        meter = nodes.meters[0]
        await meter.add_account("app", "pw", "small", ["example.com"], [])
        account = await meter.account("app")
        # A reserve waiting for the account lock loses its connection: 451, and no hold.
        blocker = await admin_connection()
        try:
            await blocker.execute(f'SET search_path = "{schema}"')
            blocked = blocker.transaction()
            await blocked.start()
            await blocker.execute("SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE", account.id)
            waiting = asyncio.ensure_future(meter.reserve("app", "cut", 1))
            while not await blocker.fetchval(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = $1 AND wait_event_type = 'Lock'",
                name,
            ):
                await asyncio.sleep(0.02)
            with pytest.raises(StoreUnavailable):
                await waiting
            await blocked.rollback()
        finally:
            await blocker.close()
        assert await scalar(schema, "SELECT COUNT(*) FROM holds") == 0
        # The pool replaces lost connections: the store serves again.
        assert (await meter.reserve("app", None, 1)).granted == 1
    with pytest.raises(StoreUnavailable, match="not open"):
        await meter.reserve("app", None, 1)


async def test_serialization_failures_are_retried_then_store_unavailable(schema: str) -> None:
    """Under SERIALIZABLE a reserve that waited for a concurrent change must start over."""

    async def race(retries: int) -> object:
        store = PgStore(
            PG_URL,
            pool_size=2,
            retries=retries,
            server_settings={"search_path": schema, "default_transaction_isolation": "serializable"},
        )
        await store.open()
        meter = Meter(store, PLANS, node="n1", clock=lambda: NOW)
        try:
            if await store.get_account("app") is None:
                await meter.add_account("app", "pw", "small", ["example.com"], [])
            account = await meter.account("app")
            other = await admin_connection()
            try:
                await other.execute(f'SET search_path = "{schema}"')
                async with other.transaction():
                    await other.execute("UPDATE accounts SET payment_detail = 'x' WHERE id = $1", account.id)
                    waiting = asyncio.ensure_future(meter.reserve("app", None, 1))
                    await asyncio.sleep(0.3)  # the reserve is now waiting for the row lock
                try:
                    return await waiting
                except StoreUnavailable as error:
                    return error
            finally:
                await other.close()
        finally:
            await store.close()

    with capture_logs() as logs:
        retried = await race(retries=3)
    assert getattr(retried, "granted", None) == 1
    assert any(log["event"] == "store.retry" and log["sqlstate"] == "40001" for log in logs)
    failed = await race(retries=0)
    assert isinstance(failed, StoreUnavailable) and "40001" in str(failed)


# -- configuration, backup -----------------------------------------------------------------


def test_database_url_is_validated_and_chooses_the_store(tmp_path: Path) -> None:
    for url, complaint in (
        ("mysql://db/mailmeter", "is not a PostgreSQL URL"),
        ("postgresql://db:99999/mailmeter", "port"),
        ("postgresql://db:5432", "name the database"),
    ):
        path = write_config(tmp_path, 2526, database={"url": url})
        with pytest.raises(ConfigError, match=f"^database.url: .*{complaint}"):
            load_config(path)
    assert isinstance(open_store(load_config(write_config(tmp_path, 2526))), SqliteStore)
    path = write_config(tmp_path, 2526, database={"url": "postgresql://u:secret@db:5432/mm", "pool_size": 3})
    store = open_store(load_config(path))
    assert isinstance(store, PgStore) and store.url.endswith("/mm")


@pytest.mark.skipif(shutil.which("pg_dump") is None, reason="pg_dump (PostgreSQL client tools) is not installed")
async def test_backup_is_a_pg_dump_of_the_schema(schema: str, tmp_path: Path) -> None:
    store = PgStore(schema_url(schema), pool_size=2)
    await store.open()
    try:
        await Meter(store, PLANS, node="n1").add_account("app", "pw", "small", ["example.com"], [])
        target = tmp_path / "meter.dump"
        umask = os.umask(0)  # permissive: the dump (password hashes) is still owner-only
        try:
            await store.backup(target)
        finally:
            os.umask(umask)
        assert stat.S_IMODE(target.stat().st_mode) == 0o600
        with pytest.raises(FileExistsError):
            await store.backup(target)
    finally:
        await store.close()
    listing = subprocess.run(["pg_restore", "--list", str(target)], capture_output=True, text=True, check=True)
    assert f"TABLE DATA {schema} accounts" in listing.stdout


async def test_results_reported_together_share_one_transaction_and_count_once(schema: str) -> None:
    async with Nodes(schema, 1) as nodes:
        meter = nodes.meters[0]
        await meter.add_account("app", "pw", "small", ["example.com"], [])
        await meter.add_account("shop", "pw", "small", ["shop.test"], [])
        for name, queue_id in (("app", "QA"), ("shop", "QS")):
            grant = await meter.reserve(name, None, 10)
            await meter.commit(grant.hold_id, queue_id, 10)
        reports = [meter.record_result(q, f"r{n}@dest.test", "delivered") for q in ("QA", "QS") for n in range(10)]
        reports += [meter.record_result("QA", "r0@dest.test", "hard_bounced")]  # the same recipient again
        reports += [meter.record_result("NOT-METERED", "x@dest.test", "delivered")]  # a bounce the relay made
        outcomes = await asyncio.gather(*reports)
        assert outcomes == [True] * 20 + [False, False]
        assert meter._results is not None and meter._results.batches <= 2  # the first alone, the rest together
        for name in ("app", "shop"):
            report = await meter.usage(name)
            assert (report.usage.delivered, report.usage.hard_bounced, report.account.awaiting_results) == (10, 0, 0)


async def test_a_login_name_with_a_nul_is_a_wrong_login_not_a_database_error(schema: str) -> None:
    """PostgreSQL refuses NUL in text: AUTH LOGIN as "app\\0x" must be a plain wrong login (535),
    not a StoreUnavailable (454 "temporary failure", retried forever)."""
    async with Nodes(schema, 1) as nodes:
        meter = nodes.meters[0]
        await meter.add_account("app", "pw", "small", ["example.com"], [])
        assert await meter.authenticate("app\0x", b"pw") is None
        assert (await meter.authenticate("app", b"pw")) is not None
