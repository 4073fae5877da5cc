"""Several smarthosts (relay/upstreams.py): a failing upstream moves the attempt to the next
one at once, is skipped while it is down, and its health shows in metrics and the spool.

The upstreams are real servers on loopback: a port nothing listens on, the raw faulty
servers of tests/test_upstream_faults.py (421 banner, 421 to MAIL, silence), and the
aiosmtpd sink of conftest. The retry delay is 300 s, so only a failover can deliver in time.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from mailmeter.config import ConfigError, load_config
from mailmeter.node import upstream_health
from mailmeter.relay.upstreams import UpstreamHealth, read_health_file
from tests.conftest import RelayHarness, Upstream, UpstreamHandler, add_account, free_port, write_config
from tests.test_upstream_faults import RawUpstream, counts, send

SLOW_RETRY = {"retry_first_delay": 300, "retry_factor": 2, "retry_max_delay": 300, "max_age": 3600}


def upstream_entry(port: int, **extra: Any) -> dict[str, Any]:
    return {"host": "127.0.0.1", "port": port, "tls": "none", "timeout": 0.5, **extra}


def metric(harness: RelayHarness, name: str, upstream_port: int) -> float:
    assert harness.relay is not None
    text = harness.relay.metrics.render().decode()
    match = re.search(rf'^{name}{{upstream="127.0.0.1:{upstream_port}"}} (\S+)$', text, re.MULTILINE)
    assert match is not None, f"{name} for port {upstream_port} not in /metrics"
    return float(match.group(1))


def results(directory: Path, queue_id: str) -> dict[str, tuple[str, str]]:
    """recipient -> (result, detail), as the meter recorded them."""
    with sqlite3.connect(directory / "meter.db") as db:
        rows = db.execute(
            "SELECT recipient, result, detail FROM recipient_results WHERE queue_id = ?", (queue_id,)
        ).fetchall()
    return {recipient: (result, detail) for recipient, result, detail in rows}


async def until(check: Any, timeout: float = 10.0) -> float:
    """Wait until check() (sync or async) is true; the seconds it took."""
    started = time.monotonic()
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


@pytest.fixture
async def sink() -> Any:
    handler = UpstreamHandler(rcpt_replies={"nobody@dest.test": "550 5.1.1 No such user"})
    up = Upstream(port=free_port(), handler=handler)
    await up.start()
    yield up
    await up.stop()


@pytest.fixture
async def faulty() -> Any:
    started: list[RawUpstream] = []

    async def start(fault: str, faulty: int = 1000) -> RawUpstream:
        server = RawUpstream(free_port(), fault, faulty)
        await server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop()


@pytest.mark.parametrize("fault", ["refused", "greeting_421", "mail_421", "silent"])
async def test_a_failing_first_upstream_hands_the_message_to_the_second_at_once(  # type: ignore[no-untyped-def]
    make_relay, tmp_path: Path, sink: Upstream, faulty, fault: str
) -> None:
    """Connection refused, a 421 banner, a 421 to MAIL, or no answer until the timeout (0.5 s):
    the same attempt goes on to the second upstream, which delivers two recipients and
    refuses the third; each keeps its own result, nothing waits for the 300 s retry. The first
    upstream shows down in metrics and in the spool's health file, and the next message
    skips it (no new connection to it)."""
    if fault == "refused":
        first_port, first = free_port(), None
    else:
        first = await faulty(fault)
        first_port = first.port
    harness = make_relay(
        sink.port,
        upstream=[upstream_entry(first_port), upstream_entry(sink.port)],
        delivery={**SLOW_RETRY, "upstream_down_seconds": 60},
    )
    await harness.start()
    await add_account(harness)
    queue_id = await send(harness.port, ["a@dest.test", "b@dest.test", "nobody@dest.test"])

    async def settled() -> bool:
        return (await counts(harness))["deferred"] == 0 and len(results(tmp_path, queue_id)) == 3

    seconds = await until(settled)
    assert seconds < 3.0  # the timeout (0.5 s) at most, never the retry delay (300 s)
    recorded = results(tmp_path, queue_id)
    assert {r: result for r, (result, _) in recorded.items()} == {
        "a@dest.test": "delivered",
        "b@dest.test": "delivered",
        "nobody@dest.test": "hard_bounced",
    }
    assert recorded["nobody@dest.test"][1].startswith("550 5.1.1")
    await until(lambda: len(sink.handler.messages) == 2)
    assert sink.handler.messages[0].rcpt_tos == ["a@dest.test", "b@dest.test"]
    assert sink.handler.messages[1].rcpt_tos == ["app@example.com"]  # the DSN for nobody@
    assert first is None or first.messages == []
    assert metric(harness, "mailmeter_upstream_up", first_port) == 0.0
    assert metric(harness, "mailmeter_upstream_failures_total", first_port) == 1.0
    assert metric(harness, "mailmeter_upstream_up", sink.port) == 1.0
    assert metric(harness, "mailmeter_upstream_failures_total", sink.port) == 0.0
    assert harness.relay is not None
    health = {s.upstream: s for s in read_health_file(harness.relay.spool.root)}
    down = health[f"127.0.0.1:{first_port}"]
    assert not down.up and down.failures == 1 and down.position == 1 and down.last_error
    assert health[f"127.0.0.1:{sink.port}"].up
    # What `mailmeter queue list` shows, read from the spool by another process's code path.
    shown = upstream_health(load_config(tmp_path / "config.yaml"))
    assert [(s.upstream, s.up, s.failures) for s in shown] == [
        (f"127.0.0.1:{first_port}", False, 1),
        (f"127.0.0.1:{sink.port}", True, 0),
    ]
    assert shown[0].last_error == down.last_error and shown[0].down_until > time.time()

    # The next message skips the upstream that is down: no connection to it at all.
    connections = first.connections if first is not None else 0
    await send(harness.port, ["c@dest.test"])
    await until(lambda: "c@dest.test" in sink.handler.delivered_to())
    assert (first.connections if first is not None else 0) == connections
    assert metric(harness, "mailmeter_upstream_failures_total", first_port) == 1.0


async def test_a_large_message_fails_over_too(make_relay, tmp_path: Path, sink: Upstream) -> None:  # type: ignore[no-untyped-def]
    """Over 1 MB a message is sent from a process of its own (relay/delivery.py _send_large):
    it moves to the second upstream the same way, and the health is the relay's."""
    first_port = free_port()
    harness = make_relay(
        sink.port,
        upstream=[upstream_entry(first_port), upstream_entry(sink.port, timeout=10)],
        delivery={**SLOW_RETRY, "upstream_down_seconds": 60},
        limits={"message_size": 4_000_000},
    )
    await harness.start()
    await add_account(harness)
    large = (
        b"From: app@example.com\r\nTo: big@dest.test\r\nSubject: large\r\n\r\n"
        + b"0123456789abcdef" * 4 * 1024 * 24
        + b"\r\n"
    )
    large = large.replace(b"abcdef0", b"abcdef\r\n0")
    queue_id = await send(harness.port, ["big@dest.test"], message=large)
    await until(lambda: results(tmp_path, queue_id).get("big@dest.test", ("", ""))[0] == "delivered", timeout=60)
    assert sink.handler.messages[0].rcpt_tos == ["big@dest.test"]
    assert len(sink.handler.messages[0].content) > 1024 * 1024
    assert metric(harness, "mailmeter_upstream_up", first_port) == 0.0
    assert metric(harness, "mailmeter_upstream_failures_total", first_port) == 1.0


async def test_a_recovered_first_upstream_is_used_again_after_its_backoff(  # type: ignore[no-untyped-def]
    make_relay, sink: Upstream, faulty
) -> None:
    """The first upstream answers 421 once; after upstream_down_seconds it is tried again,
    delivers, and shows up again; the second then gets nothing more."""
    first = await faulty("greeting_421", faulty=1)
    harness = make_relay(
        sink.port,
        upstream=[upstream_entry(first.port), upstream_entry(sink.port)],
        delivery={**SLOW_RETRY, "upstream_down_seconds": 0.5, "workers": 1},
    )
    await harness.start()
    await add_account(harness)
    await send(harness.port, ["a@dest.test"])
    await until(lambda: sink.handler.delivered_to() == ["a@dest.test"])
    assert metric(harness, "mailmeter_upstream_up", first.port) == 0.0
    await asyncio.sleep(0.6)
    assert metric(harness, "mailmeter_upstream_up", first.port) == 1.0  # its backoff is over: next in line
    await send(harness.port, ["b@dest.test"])
    await until(lambda: [r for m in first.messages for r in m[1]] == ["b@dest.test"])
    assert sink.handler.delivered_to() == ["a@dest.test"]
    assert first.connections == 2
    assert metric(harness, "mailmeter_upstream_up", first.port) == 1.0
    assert metric(harness, "mailmeter_upstream_failures_total", first.port) == 1.0


async def test_a_reload_changes_the_list_and_keeps_the_health_of_kept_upstreams(  # type: ignore[no-untyped-def]
    make_relay, tmp_path: Path, sink: Upstream
) -> None:
    """SIGHUP's path (Relay.reload): a new list applies from the next message; an upstream
    kept keeps its health, one dropped leaves /metrics."""
    dead = free_port()
    harness = make_relay(
        sink.port,
        upstream=[upstream_entry(dead), upstream_entry(sink.port)],
        delivery={**SLOW_RETRY, "upstream_down_seconds": 60},
    )
    await harness.start()
    await add_account(harness)
    await send(harness.port, ["a@dest.test"])
    await until(lambda: sink.handler.delivered_to() == ["a@dest.test"])
    assert metric(harness, "mailmeter_upstream_up", dead) == 0.0
    other = Upstream(port=free_port(), handler=UpstreamHandler())
    await other.start()
    try:
        path = write_config(
            tmp_path,
            sink.port,
            upstream=[upstream_entry(other.port), upstream_entry(dead)],
            delivery={**SLOW_RETRY, "upstream_down_seconds": 60},
        )
        assert harness.relay is not None
        await harness.relay.reload(load_config(path))
        assert metric(harness, "mailmeter_upstream_up", dead) == 0.0  # kept, still down
        assert metric(harness, "mailmeter_upstream_up", other.port) == 1.0
        assert f'upstream="127.0.0.1:{sink.port}"' not in harness.relay.metrics.render().decode()
        await send(harness.port, ["b@dest.test"])
        await until(lambda: other.handler.delivered_to() == ["b@dest.test"])
        assert sink.handler.delivered_to() == ["a@dest.test"]
    finally:
        await other.stop()


async def test_every_upstream_down_defers_with_the_retry_schedule(make_relay, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Nothing listens on either: the recipient is deferred (retried on the schedule), both
    upstreams show down; while both are down the next message probes the first alone."""
    ports = [free_port(), free_port()]
    harness = make_relay(
        ports[0],
        upstream=[upstream_entry(port) for port in ports],
        delivery={**SLOW_RETRY, "upstream_down_seconds": 60},
    )
    await harness.start()
    await add_account(harness)
    queue_id = await send(harness.port, ["a@dest.test"])
    await until(lambda: results(tmp_path, queue_id).get("a@dest.test", ("", ""))[0] == "deferred")
    assert f"connection to 127.0.0.1:{ports[1]} failed" in results(tmp_path, queue_id)["a@dest.test"][1]
    assert [metric(harness, "mailmeter_upstream_up", port) for port in ports] == [0.0, 0.0]
    assert [metric(harness, "mailmeter_upstream_failures_total", port) for port in ports] == [1.0, 1.0]
    second = await send(harness.port, ["b@dest.test"])
    await until(lambda: results(tmp_path, second).get("b@dest.test", ("", ""))[0] == "deferred")
    assert f"connection to 127.0.0.1:{ports[0]} failed" in results(tmp_path, second)["b@dest.test"][1]
    assert [metric(harness, "mailmeter_upstream_failures_total", port) for port in ports] == [2.0, 1.0]
    assert (await counts(harness))["deferred"] == 2


def test_upstream_is_one_smarthost_or_an_ordered_list(tmp_path: Path) -> None:
    single = load_config(write_config(tmp_path, 2526))
    assert [(u.host, u.port) for u in single.upstream] == [("127.0.0.1", 2526)]
    several = load_config(
        write_config(tmp_path, 2526, upstream=[upstream_entry(2526), {"host": "10.0.0.2", "port": 587}])
    )
    assert [(u.host, u.port, u.tls) for u in several.upstream] == [
        ("127.0.0.1", 2526, "none"),
        ("10.0.0.2", 587, "starttls"),
    ]
    with pytest.raises(ConfigError, match=r"upstream.1: 127.0.0.1:2526 is listed twice"):
        load_config(write_config(tmp_path, 2526, upstream=[upstream_entry(2526), upstream_entry(2526)]))
    with pytest.raises(ConfigError, match=r"upstream: list at least one smarthost"):
        load_config(write_config(tmp_path, 2526, upstream=[]))
    with pytest.raises(ConfigError, match=r"upstream.1.host: is required"):
        load_config(write_config(tmp_path, 2526, upstream=[upstream_entry(2526), {"port": 25}]))


def test_health_order_skips_a_down_upstream_until_its_backoff_ends() -> None:
    """The registry alone, on a clock the test moves."""

    class At:
        def __init__(self, host: str, port: int) -> None:
            self.host, self.port = host, port

    now = [1000.0]
    health = UpstreamHealth(down_seconds=30, clock=lambda: now[0])
    one, two, three = At("a", 25), At("b", 25), At("c", 25)
    health.configure([one, two, three])
    assert health.order([one, two, three]) == [one, two, three]
    health.failed(one, "421 4.3.2 busy")
    assert health.order([one, two, three]) == [two, three]
    health.failed(two, "timeout")
    health.failed(three, "timeout")
    assert health.order([one, two, three]) == [one]  # all down: probe the first
    now[0] += 30
    assert health.order([one, two, three]) == [one, two, three]
    health.worked(one)
    snapshot = health.snapshot()
    assert [(s.upstream, s.up, s.failures, s.consecutive_failures) for s in snapshot] == [
        ("a:25", True, 1, 0),
        ("b:25", True, 1, 1),
        ("c:25", True, 1, 1),
    ]
    assert snapshot[0].last_change == 1030.0 and snapshot[0].last_error == "421 4.3.2 busy"
    health.configure([three, one])  # a reload: kept upstreams keep their health, in the new order
    assert [(s.upstream, s.position, s.failures) for s in health.snapshot()] == [("c:25", 1, 1), ("a:25", 2, 1)]
