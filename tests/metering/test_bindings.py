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
from mailmeter.metering.sqlite import SqliteStore
from mailmeter.policies import parse_plans


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
    address against a network (it tested all 10,000), and a reload that finds the same
    bindings parses none of them again."""
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
        assert meter._networks is not None
        loaded = meter._networks[1]
        meter._networks = (meter._networks[0] - 3600, loaded)  # the TTL ran out
        assert await meter.account_for_client("198.18.0.8") == "acct8"
        assert meter._networks[1] is loaded  # read again, found unchanged: not built again
        await store.add_account("late", None, "p", date.today(), [], ["203.0.113.0/24"], now)
        meter._networks = (meter._networks[0] - 3600, loaded)
        assert await meter.account_for_client("203.0.113.9") == "late"  # a new binding is seen
    finally:
        await store.close()
