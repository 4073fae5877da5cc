"""Delivery out, retries, bounces, restarts and the last-emails race, over real sockets."""

from __future__ import annotations

import asyncio
import email
import multiprocessing
import time
from email.message import Message

import aiosmtplib
import pytest
from aiosmtplib.email import parse_address
from hypothesis import given, settings
from hypothesis import strategies as st

from mailmeter.relay.delivery import (
    _PLAIN_ADDRESS,
    UpstreamConfig,
    connect,
    new_queue_id,
    sendable_address,
    transaction,
)
from mailmeter.relay.pipelining import PipeliningSMTP
from mailmeter.relay.spool import Envelope
from tests.conftest import PASSWORD, RelayHarness, Upstream, UpstreamHandler, add_account, eventually, free_port


@pytest.fixture
def make_relay(make_relay):  # type: ignore[no-untyped-def]
    """The file spool (spool.inline off): these tests look at spool/active (the inline
    spool's are in tests/test_inline_spool.py)."""

    def factory(upstream_port: int, **overrides):  # type: ignore[no-untyped-def]
        overrides["spool"] = {"inline": False, **overrides.get("spool", {})}
        return make_relay(upstream_port, **overrides)

    return factory


MESSAGE = (
    b"From: app@example.com\r\nTo: someone@dest.test\r\nSubject: hi\r\nMessage-ID: <m1@example.com>\r\n\r\nhello\r\n"
)


async def send(port: int, recipients: list[str], user: str = "app", sender: str = "app@example.com") -> str:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=10)
    await client.connect()
    try:
        await client.login(user, PASSWORD)
        errors, reply = await client.sendmail(sender, recipients, MESSAGE)
        assert errors == {}
        return reply.rsplit(" ", 1)[1]
    finally:
        client.close()


def spool_files(harness: RelayHarness) -> list[str]:
    assert harness.relay is not None
    return harness.relay.spool.active_ids()


async def test_upstream_down_then_up_is_retried_and_delivered(make_relay) -> None:  # type: ignore[no-untyped-def]
    port = free_port()  # nothing listens here yet
    harness = make_relay(port)
    await harness.start()
    await add_account(harness)
    queue_id = await send(harness.port, ["a@dest.test"])
    assert harness.relay is not None
    meter = harness.relay.meter
    await eventually(lambda: _deferred(meter))
    assert spool_files(harness) == [queue_id]
    upstream = Upstream(port=port, handler=UpstreamHandler())
    await upstream.start()
    try:
        await upstream.handler.wait_for(lambda: upstream.handler.delivered_to() == ["a@dest.test"])
        await eventually(lambda: not spool_files(harness))
        usage = await meter.usage("app")
        assert (usage.usage.accepted, usage.usage.delivered, usage.deferred) == (1, 1, 0)
    finally:
        await upstream.stop()


async def _deferred(meter) -> bool:  # type: ignore[no-untyped-def]
    return (await meter.usage("app")).deferred == 1


def _parse(content: bytes) -> Message:
    return email.message_from_bytes(content)


async def test_upstream_5xx_sends_rfc3464_bounce(relay: RelayHarness, upstream: Upstream) -> None:
    await add_account(relay)
    upstream.handler.rcpt_replies["nobody@dest.test"] = "550 5.1.1 No such user here"
    queue_id = await send(relay.port, ["ok@dest.test", "nobody@dest.test"])
    # The good recipient is delivered, then the DSN goes back to the sender the same way.
    await upstream.handler.wait_for(lambda: len(upstream.handler.messages) == 2)
    original, bounce = upstream.handler.messages
    assert original.rcpt_tos == ["ok@dest.test"]
    assert bounce.mail_from in ("", "<>") and bounce.rcpt_tos == ["app@example.com"]
    report = _parse(bounce.content)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    parts = report.get_payload()
    assert isinstance(parts, list)
    assert [p.get_content_type() for p in parts] == ["text/plain", "message/delivery-status", "text/rfc822-headers"]
    status = bounce.content.decode()
    assert "Final-Recipient: rfc822; nobody@dest.test" in status
    assert "Action: failed" in status and "Status: 5.1.1" in status
    assert "Diagnostic-Code: smtp; 550 5.1.1 No such user here" in status
    assert queue_id in status
    assert "Message-ID: <m1@example.com>" in status
    assert relay.relay is not None
    meter = relay.relay.meter
    await eventually(lambda: _counts(meter, (1, 1)))


async def _counts(meter, expected: tuple[int, int]) -> bool:  # type: ignore[no-untyped-def]
    usage = (await meter.usage("app")).usage
    return (usage.delivered, usage.hard_bounced) == expected


async def test_temporary_failures_expire_into_soft_bounce(make_relay, upstream: Upstream) -> None:  # type: ignore[no-untyped-def]
    harness = make_relay(upstream.port, delivery={"max_age": 0.6, "retry_first_delay": 0.1, "retry_max_delay": 0.2})
    await harness.start()
    await add_account(harness)
    upstream.handler.rcpt_replies["full@dest.test"] = "452 4.2.2 Mailbox full"
    await send(harness.port, ["full@dest.test"])
    await upstream.handler.wait_for(lambda: len(upstream.handler.messages) == 1)
    bounce = upstream.handler.messages[0]
    assert bounce.mail_from in ("", "<>") and b"Status: 4.2.2" in bounce.content
    assert harness.relay is not None
    meter = harness.relay.meter

    async def settled() -> bool:
        report = await meter.usage("app")
        return report.usage.soft_bounced == 1 and report.deferred == 0

    await eventually(settled)
    await eventually(lambda: not spool_files(harness))


async def test_restart_resumes_a_non_empty_spool(make_relay) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    harness = make_relay(port)
    await harness.start()
    await add_account(harness)
    queued = {await send(harness.port, [f"r{n}@dest.test"]) for n in range(5)}
    assert set(spool_files(harness)) == queued
    await harness.stop()
    upstream = Upstream(port=port, handler=UpstreamHandler())
    await upstream.start()
    try:
        await harness.start()
        await upstream.handler.wait_for(lambda: len(upstream.handler.messages) == 5)
        assert sorted(upstream.handler.delivered_to()) == [f"r{n}@dest.test" for n in range(5)]
        await eventually(lambda: not spool_files(harness))
        assert harness.relay is not None
        usage = (await harness.relay.meter.usage("app")).usage
        assert (usage.accepted, usage.delivered) == (5, 5)
    finally:
        await upstream.stop()


async def test_start_settles_incoming_against_the_meter(make_relay, upstream: Upstream) -> None:  # type: ignore[no-untyped-def]
    """A crash between the spool write and the 250: committed mail is kept, the rest dropped."""
    harness = make_relay(upstream.port)
    await harness.start()
    await add_account(harness)
    relay = harness.relay
    assert relay is not None
    committed, uncommitted = new_queue_id(), new_queue_id()
    for queue_id in (committed, uncommitted):
        relay.spool.write_incoming(
            Envelope(queue_id, "app", "app@example.com", [f"{queue_id}@dest.test"], time.time()), MESSAGE
        )
    grant = await relay.meter.reserve("app", None, 1)
    await relay.meter.commit(grant.hold_id, committed, 1)
    await relay.meter.reserve("app", None, 1)  # a hold whose session died with the process
    await harness.stop()
    await harness.start()
    await upstream.handler.wait_for(lambda: len(upstream.handler.messages) == 1)
    assert upstream.handler.delivered_to() == [f"{committed}@dest.test"]
    assert harness.relay is not None
    assert harness.relay.spool.incoming_ids() == []
    usage = (await harness.relay.meter.usage("app")).usage
    assert (usage.accepted, usage.reserved) == (1, 0)


async def test_200_sessions_race_for_the_last_100_emails(relay: RelayHarness, upstream: Upstream) -> None:
    await add_account(relay)  # plan "small": 1,000 emails
    assert relay.relay is not None
    meter = relay.relay.meter
    grant = await meter.reserve("app", None, 900)
    await meter.commit(grant.hold_id, "PRELOAD", 900)

    async def one(n: int) -> str:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.port, start_tls=False, timeout=60)
        await client.connect()
        try:
            await client.login("app", PASSWORD)
            try:
                await client.sendmail("app@example.com", [f"r{n}@dest.test"], MESSAGE)
                return "accepted"
            except aiosmtplib.SMTPRecipientsRefused as refused:  # at RCPT: the hold did not fit
                assert refused.recipients[0].code == 452, refused
                return "refused"
            except aiosmtplib.SMTPSenderRefused as refused:  # at MAIL: the quota was already used up
                assert refused.code == 451 and refused.message.startswith("4.7.1 Email quota"), refused
                return "refused"
        finally:
            client.close()

    outcomes = await asyncio.gather(*(one(n) for n in range(200)))
    assert outcomes.count("accepted") == 100
    assert outcomes.count("refused") == 100
    usage = (await meter.usage("app")).usage
    assert (usage.accepted, usage.reserved) == (1000, 0)
    await upstream.handler.wait_for(lambda: len(upstream.handler.messages) == 100, timeout=60)


async def test_delivery_reuses_upstream_connections(make_relay, upstream: Upstream) -> None:  # type: ignore[no-untyped-def]
    harness = make_relay(upstream.port, delivery={"workers": 2})
    await harness.start()
    await add_account(harness)
    for n in range(12):
        await send(harness.port, [f"r{n}@dest.test"])
    await upstream.handler.wait_for(lambda: len(upstream.handler.messages) == 12)
    assert upstream.connections <= 2  # one per worker, kept open between messages


_ADDRESS_PIECES = [
    "a",
    "B",
    "1",
    ".",
    "@",
    "-",
    "_",
    "+",
    " ",
    "<",
    ">",
    '"',
    "(",
    ")",
    ",",
    ";",
    ":",
    "\\",
    "[",
    "]",
    "ü",
    "\r",
    "\n",
    "\t",
    "=",
    "'",
]


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from(_ADDRESS_PIECES), max_size=14).map("".join))
def test_plain_address_fast_path_answers_as_the_parser(address: str) -> None:
    """sendable_address skips aiosmtplib's parse for plain addresses: only where the parse
    would have given the address back unchanged."""
    if _PLAIN_ADDRESS.fullmatch(address):
        assert parse_address(address) == address
    try:
        by_parser = parse_address(address) == address
    except ValueError:
        by_parser = False
    assert sendable_address(address) is (by_parser and address not in ("", "<>"))


def test_plain_addresses_take_the_fast_path() -> None:
    for address in ("a@b.test", "first.last+tag@mail-1.example.com", "x_y@z"):
        assert _PLAIN_ADDRESS.fullmatch(address) and sendable_address(address)
    for address in ("a..b@c.test", ".a@b.test", "a@b..test", "a b@c.test"):
        assert not _PLAIN_ADDRESS.fullmatch(address)


async def test_large_message_goes_out_from_a_sender_process_per_recipient(make_relay, upstream: Upstream) -> None:  # type: ignore[no-untyped-def]
    """Above delivery.LARGE_MESSAGE the transaction runs in a process of its own: the
    per-recipient outcomes still come back (one delivered, one refused and bounced), and
    stopping the relay leaves no sender process behind."""
    harness = make_relay(upstream.port, limits={"message_size": 10 * 1024 * 1024})
    await harness.start()
    await add_account(harness)
    upstream.handler.rcpt_replies["nobody@dest.test"] = "550 5.1.1 No such user here"
    body = b"Subject: big\r\nMessage-ID: <big@example.com>\r\n\r\n" + (b"." + b"x" * 77 + b"\r\n") * 20_000  # 1.6 MB
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=harness.port, start_tls=False, timeout=30)
    await client.connect()
    await client.login("app", PASSWORD)
    errors, _ = await client.sendmail("app@example.com", ["ok@dest.test", "nobody@dest.test"], body)
    client.close()
    assert errors == {}
    await upstream.handler.wait_for(lambda: len(upstream.handler.messages) == 2, timeout=60)
    original, bounce = upstream.handler.messages
    assert original.rcpt_tos == ["ok@dest.test"] and original.content.endswith(body)  # dots unstuffed again
    assert bounce.rcpt_tos == ["app@example.com"] and b"550 5.1.1 No such user here" in bounce.content
    assert harness.relay is not None
    await eventually(lambda: _counts(harness.relay.meter, (1, 1)))
    senders = multiprocessing.active_children()
    assert senders  # the large message went out from a child process
    await harness.stop()
    for process in senders:
        process.join(timeout=10)
    assert not any(process.is_alive() for process in senders)


_TRICKY_BODIES = [
    b"Subject: dots\r\n\r\n.first\r\n..second\r\n.\r\nlast\r\n",
    b".starts with a dot\r\nno line end at the end",
    b"Subject: bare\n\nline feeds only\n.dot\n",  # as an old spool file or a generated notice might hold
    b"Subject: cr\r\n\r\na lone\rcarriage return\r\n",
    b"",
]


async def test_transaction_sends_what_sendmail_sends(upstream: Upstream) -> None:
    """delivery.transaction (no regular expressions over the message) and aiosmtplib's
    sendmail put the same message and SIZE on the wire, dots and line ends included:
    one command at a time (aiosmtplib's own client) and pipelined (delivery's)."""
    plain = aiosmtplib.SMTP(hostname="127.0.0.1", port=upstream.port, start_tls=False, timeout=10)
    await plain.connect()
    pipelining = await connect(UpstreamConfig(host="127.0.0.1", port=upstream.port), "relay.test")
    for client in (plain, pipelining):
        for body in _TRICKY_BODIES:
            errors = await transaction(client, "app@example.com", ["a@dest.test"], body, False)
            await client.sendmail("app@example.com", ["a@dest.test"], body)
            assert errors == {}
            ours, theirs = upstream.handler.messages[-2:]
            assert ours.content == theirs.content and ours.content.endswith(b"\r\n"), body
            assert [o.upper() for o in ours.mail_options] == [o.upper() for o in theirs.mail_options], body
        if client is pipelining:
            assert isinstance(client, PipeliningSMTP) and client.pipelining
        client.close()
    assert upstream.handler.messages[0].content == b"Subject: dots\r\n\r\n.first\r\n..second\r\n.\r\nlast\r\n"


async def test_transaction_refusals_come_back_per_recipient(upstream: Upstream) -> None:
    """One command at a time (the upstream offers no PIPELINING): refused recipients come
    back with their own replies; with all refused, DATA is never sent; a refused end of
    data is the result of the recipients the upstream took, and only theirs.
    (tests/test_pipelining.py: the same with PIPELINING.)"""
    upstream.handler.pipelining = False
    upstream.handler.rcpt_replies["nobody@dest.test"] = "550 5.1.1 No such user here"
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=upstream.port, start_tls=False, timeout=10)
    await client.connect()
    errors = await transaction(client, "app@example.com", ["nobody@dest.test", "a@dest.test"], MESSAGE, False)
    assert {r: (e.code, e.message) for r, e in errors.items()} == {"nobody@dest.test": (550, "5.1.1 No such user here")}
    errors = await transaction(client, "app@example.com", ["nobody@dest.test"], MESSAGE, False)
    assert {r: (e.code, e.message) for r, e in errors.items()} == {"nobody@dest.test": (550, "5.1.1 No such user here")}
    assert len(upstream.handler.messages) == 1
    await client.rset()
    upstream.handler.data_reply = "554 5.7.1 Message refused"
    errors = await transaction(client, "app@example.com", ["a@dest.test", "nobody@dest.test"], MESSAGE, False)
    assert {r: (e.code, e.message) for r, e in errors.items()} == {
        "a@dest.test": (554, "5.7.1 Message refused"),
        "nobody@dest.test": (550, "5.1.1 No such user here"),
    }
    client.close()
