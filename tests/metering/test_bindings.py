"""Bound client networks: longest prefix wins, as testing every binding did, in a few probes
however many accounts are bound (metering/bindings.py; issue 19 item 5)."""

from __future__ import annotations

import ipaddress
from datetime import date, datetime, timezone
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailmeter.metering.bindings import Bindings
from mailmeter.metering.meter import Meter
from mailmeter.metering.postgres import PgStore
from mailmeter.metering.sqlite import SqliteStore
from mailmeter.policies import parse_plans
from tests.pgserver import PG_URL, isolated_schema


def every_binding(rows: list[tuple[str, str]], address: str) -> str | None:
    """The rule as it was first written: each binding in turn, the longest prefix holding the address."""
    ip = ipaddress.ip_address(address)
    best: tuple[int, str] | None = None
    for network, name in rows:
        net = ipaddress.ip_network(network, strict=False)
        if ip.version == net.version and ip in net and (best is None or net.prefixlen > best[0]):
            best = (net.prefixlen, name)
    return best[1] if best else None


v4 = st.builds(lambda a, p: f"{ipaddress.IPv4Address(a)}/{p}", st.integers(0, 2**32 - 1), st.integers(8, 32))
v6 = st.builds(lambda a, p: f"{ipaddress.IPv6Address(a)}/{p}", st.integers(0, 2**128 - 1), st.integers(32, 128))
near = st.sampled_from(["10.1.2.3/32", "10.1.2.0/24", "10.1.0.0/16", "10.0.0.0/8", "::1/128", "2001:db8::/32"])


@given(
    rows=st.lists(st.tuples(st.one_of(v4, v6, near), st.sampled_from(["a", "b", "c"])), max_size=30),
    address=st.one_of(
        st.sampled_from(["10.1.2.3", "10.1.2.4", "10.1.9.9", "10.9.9.9", "::1", "2001:db8::5", "127.0.0.1"]),
        st.builds(lambda a: str(ipaddress.IPv4Address(a)), st.integers(0, 2**32 - 1)),
    ),
)
def test_the_same_account_as_testing_every_binding(rows: list[tuple[str, str]], address: str) -> None:
    assert Bindings.build(rows).lookup(ipaddress.ip_address(address)) == every_binding(rows, address)


def test_longest_prefix_and_the_first_of_a_network_bound_twice() -> None:
    rows = [("10.0.0.0/8", "wide"), ("10.1.0.0/16", "mid"), ("10.1.2.3/32", "host"), ("10.1.0.0/16", "again")]
    bindings = Bindings.build(rows)
    assert bindings.lookup(ipaddress.ip_address("10.1.2.3")) == "host"
    assert bindings.lookup(ipaddress.ip_address("10.1.2.4")) == "mid"
    assert bindings.lookup(ipaddress.ip_address("10.200.0.1")) == "wide"
    assert bindings.lookup(ipaddress.ip_address("11.0.0.1")) is None
    assert bindings.lookup(ipaddress.ip_address("::ffff:10.1.2.3")) is None  # another family, as before


async def test_a_lookup_among_10000_bindings_tests_no_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a real store with 10,000 bound accounts: a connection's lookup never tests the
    address against a network (it tested all 10,000), and once NETWORKS_TTL has passed the
    relay asks for the bindings' version and reads them again only if it changed."""
    store = SqliteStore(tmp_path / "meter.db")
    meter = Meter(store, parse_plans({"p": {"email_quota": 10}}), node="n1")
    await store.open()
    try:
        now = datetime.now(timezone.utc)
        for number in range(10_000):
            network = f"198.18.{number // 256}.{number % 256}/32"
            await store.add_account(f"acct{number}", None, "p", date.today(), [], [network], now)
        assert await meter.account_for_client("198.18.39.15") == "acct9999"
        tested = []
        real_contains = ipaddress.IPv4Network.__contains__

        def contains(net: ipaddress.IPv4Network, address: object) -> bool:
            tested.append(net)
            return real_contains(net, address)

        monkeypatch.setattr(ipaddress.IPv4Network, "__contains__", contains)
        assert await meter.account_for_client("198.18.0.7") == "acct7"
        assert await meter.account_for_client("198.19.0.7") is None
        assert tested == []
        statements: list[str] = []
        reader = store._reader
        assert reader is not None and meter._networks is not None
        await reader._execute(reader._conn.set_trace_callback, statements.append)
        loaded = meter._networks[1]
        meter._networks = (meter._networks[0] - 3600, loaded, meter._networks[2])  # the TTL ran out
        assert await meter.account_for_client("198.18.0.8") == "acct8"
        assert meter._networks[1] is loaded  # unchanged version: not read, not built again
        assert not any("account_networks" in statement for statement in statements), statements
        await store.add_account("late", None, "p", date.today(), [], ["203.0.113.0/24"], now)
        meter._networks = (meter._networks[0] - 3600, loaded, meter._networks[2])
        assert await meter.account_for_client("203.0.113.9") == "late"  # a new binding is seen
        assert any("account_networks" in statement for statement in statements)
    finally:
        await store.close()


async def test_the_bindings_version_changes_with_any_binding_on_both_stores(tmp_path: Path) -> None:
    """Schema 12's triggers: a network bound, or one changed or removed by hand (SQL), or an
    account renamed or deleted, each changes the version; a message's writes to accounts do not."""
    sqlite_store = SqliteStore(tmp_path / "meter.db")
    async with isolated_schema() as schema:
        pg_store = PgStore(PG_URL, server_settings={"search_path": schema})
        for store in (sqlite_store, pg_store):
            await store.open()
            try:
                meter = Meter(store, parse_plans({"p": {"email_quota": 10}}), node="n1")
                seen = [await store.networks_version()]

                async def changed(store: SqliteStore | PgStore = store, seen: list[int] = seen) -> bool:
                    seen.append(await store.networks_version())
                    return seen[-1] != seen[-2]

                await meter.add_account("a", None, "p", ["a.test"], ["192.0.2.0/24"])
                assert await changed()
                await meter.add_account("b", None, "p", ["b.test"], [])  # no network: may or may not
                await changed()
                grant = await meter.reserve("a", None, 1)
                await meter.commit(grant.hold_id, "Q1", 1, account="a")  # UPDATE accounts (awaiting_results)
                await meter.record_result("Q1", "r@x.test", "delivered", "ok", 250)
                assert not await changed()
                await meter.delete_account("b")  # a soft delete: its networks bind no client any more
                assert await changed()
                for sql in (
                    "UPDATE account_networks SET network = '192.0.3.0/24'",
                    "UPDATE accounts SET name = 'a2' WHERE name = 'a'",
                    "DELETE FROM account_networks",
                ):
                    await raw_sql(store, sql)
                    assert await changed(), sql
            finally:
                await store.close()


async def raw_sql(store: SqliteStore | PgStore, sql: str) -> None:
    """A change made by hand, outside the store's methods (what the triggers are for)."""
    if isinstance(store, SqliteStore):
        async with store._tx() as db:
            await db.execute(sql)
    else:
        assert store._pool is not None
        async with store._pool.acquire() as conn:
            await conn.execute(sql)
