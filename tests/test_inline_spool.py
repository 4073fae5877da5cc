"""The inline spool (spool.inline, issue 19 item 3): small messages kept in the SQLite
transaction that commits their usage, delivered from there; larger ones in spool files.

Over real sockets and a real SQLite file: accept -> in the store, no spool file ->
delivered -> gone from the store; a message committed whose 250 and hand-off to
delivery never happened (a crash just after the commit) is delivered after a restart,
once; a message over spool.inline_max_bytes takes the file spool; the books balance.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator

import aiosmtplib
import pytest

from mailmeter.relay.spool import Envelope, pack
from tests.conftest import PASSWORD, RelayHarness, Upstream, UpstreamHandler, add_account, eventually, free_port
from tests.pgserver import isolated_schema, scalar, schema_url

INLINE = {"inline": True}


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    async with isolated_schema() as name:
        yield name


def message(size: int = 0, tag: str = "m1") -> bytes:
    """A message with an X-Tag header, padded with lines of 78 octets to about `size`."""
    head = f"From: app@example.com\r\nTo: someone@dest.test\r\nSubject: hi\r\nX-Tag: {tag}\r\n\r\nhello\r\n"
    return head.encode() + (b"z" * 76 + b"\r\n") * (size // 78)


async def send(port: int, recipients: list[str], body: bytes) -> str:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=10)
    await client.connect()
    try:
        await client.login("app", PASSWORD)
        errors, reply = await client.sendmail("app@example.com", recipients, body)
        assert errors == {}
        return reply.rsplit(" ", 1)[1]
    finally:
        client.close()


def stored(harness: RelayHarness) -> dict[str, bytes]:
    """The inline spool's rows, read from the database file as another process would."""
    with sqlite3.connect(harness.directory / "meter.db") as db:
        return {row[0]: bytes(row[1]) for row in db.execute("SELECT queue_id, data FROM spooled_messages")}


def spool_files(harness: RelayHarness) -> list[str]:
    root = harness.directory / "spool"
    return sorted(p.name for sub in ("incoming", "active") for p in (root / sub).iterdir())


async def books(harness: RelayHarness) -> tuple[int, int, int, int]:
    """(accepted, delivered, awaiting results, reserved) of the account's current period."""
    assert harness.relay is not None
    report = await harness.relay.meter.usage("app")
    usage = report.usage
    awaiting = usage.accepted - usage.delivered - usage.soft_bounced - usage.hard_bounced
    return usage.accepted, usage.delivered, awaiting, usage.reserved


async def test_small_message_is_committed_with_its_usage_and_delivered_from_the_store(make_relay) -> None:  # type: ignore[no-untyped-def]
    port = free_port()  # the upstream is down: the message waits in the queue
    harness = make_relay(port)  # spool.inline is on by default
    await harness.start()
    await add_account(harness)
    queue_id = await send(harness.port, ["a@dest.test", "b@dest.test"], message(tag="small"))
    # Accepted: in the store with its usage, no spool file of any kind.
    rows = stored(harness)
    assert list(rows) == [queue_id]
    assert b"X-Tag: small" in rows[queue_id] and b'"recipients":["a@dest.test","b@dest.test"]' in rows[queue_id]
    assert spool_files(harness) == []
    assert await books(harness) == (2, 0, 2, 0)
    upstream = Upstream(port=port, handler=UpstreamHandler())
    await upstream.start()
    try:
        await upstream.handler.wait_for(lambda: len(upstream.handler.messages) == 1, timeout=15)
        delivered = upstream.handler.messages[0]
        assert sorted(delivered.rcpt_tos) == ["a@dest.test", "b@dest.test"]
        assert b"X-Tag: small" in delivered.content and f"id {queue_id}".encode() in delivered.content
        await eventually(lambda: stored(harness) == {})
        assert spool_files(harness) == []  # the deferral's state file is gone too
        assert await books(harness) == (2, 2, 0, 0)
    finally:
        await upstream.stop()


async def test_message_over_the_threshold_uses_the_file_spool(make_relay) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    harness = make_relay(port, spool={"inline": True, "inline_max_bytes": 4096})
    await harness.start()
    await add_account(harness)
    small = await send(harness.port, ["s@dest.test"], message(tag="small"))
    large = await send(harness.port, ["l@dest.test"], message(8000, tag="large"))
    assert list(stored(harness)) == [small]
    # The large one as a message file; the small one has at most its delivery state there.
    assert [name for name in spool_files(harness) if "." not in name] == [large]
    upstream = Upstream(port=port, handler=UpstreamHandler())
    await upstream.start()
    try:
        await upstream.handler.wait_for(lambda: len(upstream.handler.messages) == 2, timeout=15)
        assert sorted(upstream.handler.delivered_to()) == ["l@dest.test", "s@dest.test"]
        big = next(m for m in upstream.handler.messages if m.rcpt_tos == ["l@dest.test"])
        assert len(big.content) > 8000
        await eventually(lambda: stored(harness) == {} and spool_files(harness) == [])
        assert await books(harness) == (2, 2, 0, 0)
    finally:
        await upstream.stop()


async def test_switch_off_keeps_the_file_spool(make_relay) -> None:  # type: ignore[no-untyped-def]
    harness = make_relay(free_port(), spool={"inline": False})
    await harness.start()
    await add_account(harness)
    queue_id = await send(harness.port, ["a@dest.test"], message())
    assert stored(harness) == {}
    assert queue_id in spool_files(harness)


async def test_commit_without_hand_off_is_delivered_once_after_restart(make_relay) -> None:  # type: ignore[no-untyped-def]
    """A crash after the commit, before the 250 and before delivery heard of it: the row in
    the store is all there is, and a restart delivers it, exactly once."""
    port = free_port()
    harness = make_relay(port, spool=INLINE)
    relay = await harness.start()
    await add_account(harness)
    meter = relay.meter
    # What SMTP in does at DATA, stopped right after the commit: no submit, no 250.
    grant = await meter.reserve("app", emails=2)
    envelope = Envelope(
        queue_id="00000000001CRASHED01",
        account="app",
        mail_from="app@example.com",
        recipients=["x@dest.test", "y@dest.test"],
        received_at=time.time(),
        client="127.0.0.1",
    )
    await meter.commit(grant.hold_id, envelope.queue_id, 2, account="app", spooled=pack(envelope, message(tag="c")))
    assert relay.delivery.queue_depth == 0  # delivery never heard of it
    await harness.stop()
    assert list(stored(harness)) == [envelope.queue_id]
    upstream = Upstream(port=port, handler=UpstreamHandler())
    await upstream.start()
    try:
        await harness.start()
        await upstream.handler.wait_for(lambda: len(upstream.handler.messages) == 1, timeout=15)
        await eventually(lambda: stored(harness) == {})
        await asyncio.sleep(0.5)  # a second copy would have gone out by now
        assert len(upstream.handler.messages) == 1
        assert sorted(upstream.handler.messages[0].rcpt_tos) == ["x@dest.test", "y@dest.test"]
        assert await books(harness) == (2, 2, 0, 0)
    finally:
        await upstream.stop()


async def test_partial_failure_keeps_state_and_bounces_once(make_relay, upstream: Upstream) -> None:  # type: ignore[no-untyped-def]
    """An inline message with a deferred and a refused recipient: the DSN (file spool) goes
    once, the deferred one is retried from the store, the books balance at the end."""
    harness = make_relay(upstream.port, spool=INLINE)
    await harness.start()
    await add_account(harness)
    upstream.handler.rcpt_replies["gone@dest.test"] = "550 5.1.1 No such user"
    upstream.handler.rcpt_replies["later@dest.test"] = "451 4.3.0 Try later"
    await send(harness.port, ["ok@dest.test", "gone@dest.test", "later@dest.test"], message(tag="p"))
    await upstream.handler.wait_for(lambda: len(upstream.handler.messages) == 2, timeout=15)  # ok + the DSN
    await eventually(lambda: _delivered_and_bounced(harness, (1, 1)))
    assert len(stored(harness)) == 1  # the deferred recipient's message is still in the store
    del upstream.handler.rcpt_replies["later@dest.test"]
    await upstream.handler.wait_for(lambda: "later@dest.test" in upstream.handler.delivered_to(), timeout=15)
    await eventually(lambda: stored(harness) == {} and spool_files(harness) == [])
    assert harness.relay is not None
    usage = (await harness.relay.meter.usage("app")).usage
    assert (usage.accepted, usage.delivered, usage.hard_bounced, usage.reserved) == (3, 2, 1, 0)
    bounces = [m for m in upstream.handler.messages if m.mail_from in ("", "<>")]
    assert len(bounces) == 1


async def _delivered_and_bounced(harness: RelayHarness, expected: tuple[int, int]) -> bool:
    assert harness.relay is not None
    usage = (await harness.relay.meter.usage("app")).usage
    return (usage.delivered, usage.hard_bounced) == expected


async def test_postgresql_node_keeps_the_file_spool(make_relay, upstream: Upstream, schema: str) -> None:  # type: ignore[no-untyped-def]
    """spool.inline on a PostgreSQL node: every message goes through spool files (the store
    never takes a message), and is delivered and counted as usual."""
    harness = make_relay(
        free_port(), spool=INLINE, database={"url": schema_url(schema), "pool_size": 4, "lease_emails": 0}
    )
    relay = await harness.start()
    await add_account(harness)
    assert not relay.meter.inline_spool
    queue_id = await send(harness.port, ["a@dest.test"], message(tag="pg"))
    assert queue_id in spool_files(harness)
    assert await scalar(schema, "SELECT COUNT(*) FROM spooled_messages") == 0
    grant = await relay.meter.reserve("app", emails=1)
    envelope = Envelope("00000000001PGINLINE01", "app", "app@example.com", ["b@dest.test"], time.time())
    with pytest.raises(ValueError, match="SQLite"):
        await relay.meter.commit(grant.hold_id, envelope.queue_id, 1, account="app", spooled=pack(envelope, b"x"))
    assert await scalar(schema, "SELECT COUNT(*) FROM messages") == 1  # the refused commit counted nothing
    await relay.meter.release(grant.hold_id)
    del upstream


async def test_messages_kept_inline_are_delivered_after_the_switch_is_turned_off(make_relay) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    harness = make_relay(port, spool=INLINE)
    await harness.start()
    await add_account(harness)
    queued = {await send(harness.port, [f"r{n}@dest.test"], message(tag=f"o{n}")) for n in range(3)}
    assert set(stored(harness)) == queued
    await harness.stop()
    harness.overrides["spool"] = {"inline": False}
    upstream = Upstream(port=port, handler=UpstreamHandler())
    await upstream.start()
    try:
        await harness.start()
        await upstream.handler.wait_for(lambda: len(upstream.handler.messages) == 3, timeout=15)
        await eventually(lambda: stored(harness) == {})
        assert sorted(upstream.handler.delivered_to()) == ["r0@dest.test", "r1@dest.test", "r2@dest.test"]
        assert await books(harness) == (3, 3, 0, 0)
        later = await send(harness.port, ["s@dest.test"], message(tag="after"))  # now spooled to a file
        await upstream.handler.wait_for(lambda: len(upstream.handler.messages) == 4, timeout=15)
        assert stored(harness) == {} and later not in stored(harness)
    finally:
        await upstream.stop()
