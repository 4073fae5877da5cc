"""Upstream faults, each ending in the right per-recipient result, retry schedule and meter state.

The upstreams are real servers on loopback: the aiosmtpd one from conftest, and, for
faults aiosmtpd cannot produce (a 421 banner, a connection dropped in the middle of
DATA, a server that never answers), small raw asyncio servers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiosmtplib
import pytest
from aiosmtpd.smtp import SMTP, AuthResult

from mailmeter.metering.meter import Meter
from mailmeter.relay.delivery import RetryPolicy
from mailmeter.relay.dsn import FailedRecipient, status_of
from mailmeter.relay.spool import QueueState
from tests.conftest import (
    PASSWORD,
    RelayHarness,
    Upstream,
    UpstreamHandler,
    add_account,
    free_port,
)


@pytest.fixture
def make_relay(make_relay):  # type: ignore[no-untyped-def]
    """The file spool (spool.inline off): these tests watch a message's delivery state in spool/active."""

    def factory(upstream_port: int, **overrides):  # type: ignore[no-untyped-def]
        overrides["spool"] = {"inline": False, **overrides.get("spool", {})}
        return make_relay(upstream_port, **overrides)

    return factory


MESSAGE = (
    b"From: app@example.com\r\nTo: someone@dest.test\r\nSubject: faults\r\nMessage-ID: <f1@example.com>\r\n"
    b"\r\nhello\r\n"
)
FAST_RETRY = {"retry_first_delay": 0.1, "retry_factor": 2, "retry_max_delay": 0.3, "max_age": 3600}


async def send(port: int, recipients: list[str], message: bytes = MESSAGE, options: tuple[str, ...] = ()) -> str:
    """Submit one message as account `app`; returns the queue id from the 250."""
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=10)
    await client.connect()
    try:
        await client.login("app", PASSWORD)
        errors, reply = await client.sendmail("app@example.com", recipients, message, mail_options=list(options))
        assert errors == {}
        return reply.rsplit(" ", 1)[1]
    finally:
        client.close()


def retry_policy(delivery: dict[str, float]) -> RetryPolicy:
    return RetryPolicy(
        first_delay=delivery["retry_first_delay"],
        factor=delivery["retry_factor"],
        max_delay=delivery["retry_max_delay"],
        max_age=delivery["max_age"],
    )


def meter_of(harness: RelayHarness) -> Meter:
    assert harness.relay is not None
    return harness.relay.meter


async def counts(harness: RelayHarness) -> dict[str, int]:
    report = (await meter_of(harness).usage("app")).as_json()
    return {
        key: int(report[key])
        for key in ("accepted", "delivered", "soft_bounced", "hard_bounced", "deferred", "reserved")
    }


def read_state(harness: RelayHarness, queue_id: str) -> QueueState | None:
    assert harness.relay is not None
    spool = harness.relay.spool
    try:
        return spool.load_state(spool.read_envelope(queue_id))
    except FileNotFoundError:
        return None


async def watch(
    harness: RelayHarness, queue_id: str, done: Callable[[], Awaitable[bool]], timeout: float = 15.0
) -> dict[int, QueueState]:
    """Poll the spool state every few ms until `done`; the first state seen after each attempt.

    Attempts are at least first_delay (0.1 s) apart, so no attempt goes unseen except
    the last one, after which the message may leave the spool at once.
    """
    seen: dict[int, QueueState] = {}
    deadline = time.monotonic() + timeout
    while not await done():
        state = read_state(harness, queue_id)
        if state is not None and state.attempts and state.attempts not in seen:
            seen[state.attempts] = state
        if time.monotonic() > deadline:
            raise AssertionError(f"not done in {timeout} s; attempts seen: {sorted(seen)}")
        await asyncio.sleep(0.005)
    return seen


def with_status(seen: dict[int, QueueState], status: str) -> dict[int, QueueState]:
    """The observed states after which the (single) recipient had this status."""
    return {n: state for n, state in seen.items() if state.recipients[0].status == status}


def assert_schedule(seen: dict[int, QueueState], retry: RetryPolicy) -> None:
    """Each attempt n waits RetryPolicy.delay(n) for the next, and the next is not early."""
    for attempts, state in seen.items():
        assert state.next_attempt_at - state.last_attempt_at == pytest.approx(retry.delay(attempts), abs=1e-6)
        later = seen.get(attempts + 1)
        if later is not None:
            assert later.last_attempt_at >= state.next_attempt_at - 0.005


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


@dataclass
class RawUpstream:
    """A hand-written SMTP server whose first `faulty` connections misbehave in one way.

    fault: greeting_421 (banner 421, close), mail_421 (421 to MAIL, close),
    drop_in_data (read 100 bytes of the message, close), silent (accept, never answer).
    """

    port: int
    fault: str
    faulty: int = 1
    connections: int = 0
    messages: list[tuple[str, list[str], bytes]] = field(default_factory=list)
    server: asyncio.Server | None = None
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, limit=1 << 20)

    async def stop(self) -> None:
        for writer in self._writers:
            writer.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        fault = self.fault if self.connections <= self.faulty else ""
        try:
            await self._session(reader, writer, fault)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, fault: str) -> None:
        if fault == "silent":
            await reader.read()  # until the client gives up
            return
        if fault == "greeting_421":
            writer.write(b"421 4.3.2 upstream.test Service not available, closing\r\n")
            return
        writer.write(b"220 upstream.test ESMTP\r\n")
        sender, recipients = "", list[str]()
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                writer.write(b"250 upstream.test\r\n")
            elif verb == b"MAIL":
                if fault == "mail_421":
                    writer.write(b"421 4.3.2 Shutting down, try later\r\n")
                    return
                sender, recipients = line.decode().split(":", 1)[1].strip().strip("<>"), []
                writer.write(b"250 2.1.0 Ok\r\n")
            elif verb == b"RCPT":
                recipients.append(line.decode().split(":", 1)[1].strip().strip("<>"))
                writer.write(b"250 2.1.5 Ok\r\n")
            elif verb == b"DATA":
                writer.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                if fault == "drop_in_data":
                    await reader.readexactly(100)
                    return
                content = await reader.readuntil(b"\r\n.\r\n")
                self.messages.append((sender, recipients, content[: -len(b".\r\n")]))
                writer.write(b"250 2.0.0 Ok: queued\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 2.0.0 Bye\r\n")
                return
            else:  # RSET, NOOP
                writer.write(b"250 2.0.0 Ok\r\n")


@pytest.fixture
async def raw_upstreams() -> Any:
    started: list[RawUpstream] = []

    async def start(fault: str, faulty: int = 1, port: int | None = None) -> RawUpstream:
        upstream = RawUpstream(port or free_port(), fault, faulty)
        await upstream.start()
        started.append(upstream)
        return upstream

    yield start
    for upstream in started:
        await upstream.stop()


def received_at(harness: RelayHarness, queue_id: str) -> float:
    assert harness.relay is not None
    return harness.relay.spool.read_envelope(queue_id).received_at


async def spool_empty(harness: RelayHarness) -> bool:
    assert harness.relay is not None
    return not harness.relay.spool.active_ids()


async def test_connection_refused_backs_off_exponentially_then_expires_with_a_dsn(make_relay) -> None:  # type: ignore[no-untyped-def]
    """Nothing listens upstream: deferred on RetryPolicy's schedule (0.1, 0.2, 0.3, 0.3 ... s),
    soft-bounced once the next retry would pass max_age, and the DSN goes out when the
    upstream comes back."""
    port = free_port()
    delivery = {**FAST_RETRY, "max_age": 1.5}
    harness = make_relay(port, delivery=delivery)
    await harness.start()
    await add_account(harness)
    queue_id = await send(harness.port, ["a@dest.test"])
    arrived = received_at(harness, queue_id)
    retry = retry_policy(delivery)

    meter_states: list[dict[str, int]] = []

    async def expired() -> bool:
        meter_states.append(await counts(harness))
        return meter_states[-1]["soft_bounced"] == 1

    seen = await watch(harness, queue_id, expired)
    waiting = {"accepted": 1, "delivered": 0, "soft_bounced": 0, "hard_bounced": 0, "deferred": 1, "reserved": 0}
    assert waiting in meter_states  # while retrying, the meter shows the recipient as deferred
    deferred = with_status(seen, "deferred")
    assert sorted(deferred) == list(range(1, len(deferred) + 1)) and len(deferred) >= 4
    assert [retry.delay(n) for n in (1, 2, 3, 4)] == [0.1, 0.2, 0.3, 0.3]  # exponential, then capped
    assert_schedule(seen, retry)
    for attempts, state in seen.items():
        assert f"connection to 127.0.0.1:{port} failed" in state.recipients[0].reply
        next_retry_age = state.last_attempt_at - arrived + retry.delay(attempts)
        # Deferred while the next retry falls within max_age; soft-bounced at the first that would not.
        assert (next_retry_age <= retry.max_age) == (attempts in deferred)
    assert time.time() - arrived <= retry.max_age + 0.5
    assert await counts(harness) == {
        "accepted": 1,
        "delivered": 0,
        "soft_bounced": 1,
        "hard_bounced": 0,
        "deferred": 0,
        "reserved": 0,
    }
    upstream = Upstream(port=port, handler=UpstreamHandler())
    await upstream.start()
    try:
        await upstream.handler.wait_for(lambda: len(upstream.handler.messages) == 1)
        dsn = upstream.handler.messages[0]
        assert dsn.mail_from in ("", "<>") and dsn.rcpt_tos == ["app@example.com"]
        text = dsn.content.decode()
        assert "Final-Recipient: rfc822; a@dest.test" in text
        assert "Action: failed" in text and "Status: 4.4.7" in text and queue_id in text
        await eventually(lambda: spool_empty(harness))
        assert upstream.handler.delivered_to() == ["app@example.com"]  # the DSN only, never the message
    finally:
        await upstream.stop()


def test_dsn_status_comes_from_the_reply_code_never_from_an_ip_address() -> None:
    """A connection error naming 10.2.5.1 once produced `Status: 2.5.1` (a success code) in a bounce."""
    assert status_of(FailedRecipient("a@x.test", "connection to 10.2.5.1:25 failed: refused", False)) == "4.4.7"
    assert status_of(FailedRecipient("a@x.test", "452 4.2.2 Mailbox full", False)) == "4.2.2"
    assert status_of(FailedRecipient("a@x.test", "550 5.1.1 No such user", True)) == "5.1.1"
    assert status_of(FailedRecipient("a@x.test", "550 4.2.2 contradictory", True)) == "5.0.0"


async def test_upstream_that_never_answers_times_out_and_is_retried(make_relay, raw_upstreams) -> None:  # type: ignore[no-untyped-def]
    """TCP accepted, no banner ever: each attempt ends after upstream.timeout, deferred on
    schedule; when the upstream answers again the message is delivered once."""
    silent = await raw_upstreams("silent", faulty=2)
    delivery = {**FAST_RETRY}
    harness = make_relay(silent.port, delivery=delivery, upstream={"timeout": 0.3})
    await harness.start()
    await add_account(harness)
    started = time.monotonic()
    queue_id = await send(harness.port, ["slow@dest.test"])

    async def delivered() -> bool:
        return (await counts(harness))["delivered"] == 1

    seen = await watch(harness, queue_id, delivered)
    deferred = with_status(seen, "deferred")
    assert sorted(deferred) == [1, 2] and set(seen) - set(deferred) <= {3}
    assert_schedule(seen, retry_policy(delivery))
    for state in deferred.values():
        assert "Timed out" in state.recipients[0].reply
    assert time.monotonic() - started >= 2 * 0.3  # two attempts each waited out the timeout
    assert silent.connections == 3
    assert [m[1] for m in silent.messages] == [["slow@dest.test"]]
    assert await counts(harness) == {
        "accepted": 1,
        "delivered": 1,
        "soft_bounced": 0,
        "hard_bounced": 0,
        "deferred": 0,
        "reserved": 0,
    }
    await eventually(lambda: spool_empty(harness))


@pytest.mark.parametrize("fault", ["greeting_421", "mail_421"])
async def test_421_defers_then_a_new_connection_delivers(make_relay, raw_upstreams, fault: str) -> None:  # type: ignore[no-untyped-def]
    """421 at the banner or at MAIL: deferred with the upstream's reply, the connection is
    not reused, and the retry on a new connection delivers."""
    upstream = await raw_upstreams(fault, faulty=2)
    delivery = {**FAST_RETRY}
    harness = make_relay(upstream.port, delivery={**delivery, "workers": 1})
    await harness.start()
    await add_account(harness)
    queue_id = await send(harness.port, ["x@dest.test"])

    async def delivered() -> bool:
        return (await counts(harness))["delivered"] == 1

    seen = await watch(harness, queue_id, delivered)
    deferred = with_status(seen, "deferred")
    assert sorted(deferred) == [1, 2] and set(seen) - set(deferred) <= {3}
    assert_schedule(seen, retry_policy(delivery))
    for state in deferred.values():
        assert state.recipients[0].reply.startswith("421 4.3.2")
    assert upstream.connections == 3
    assert [(m[0], m[1]) for m in upstream.messages] == [("app@example.com", ["x@dest.test"])]
    assert await counts(harness) == {
        "accepted": 1,
        "delivered": 1,
        "soft_bounced": 0,
        "hard_bounced": 0,
        "deferred": 0,
        "reserved": 0,
    }


async def test_per_recipient_4xx_is_retried_and_5xx_bounced(make_relay, upstream: Upstream) -> None:  # type: ignore[no-untyped-def]
    """One message, three recipients: 250, 450 and 550 at RCPT. The 550 is a hard bounce with
    a DSN at once; the 450 alone is retried after the backoff and then delivered."""
    delivery = {**FAST_RETRY, "retry_first_delay": 0.3}
    harness = make_relay(upstream.port, delivery=delivery)
    await harness.start()
    await add_account(harness)
    upstream.handler.rcpt_replies["later@dest.test"] = "450 4.2.1 Try again later"
    upstream.handler.rcpt_replies["gone@dest.test"] = "550 5.1.1 No such user here"
    queue_id = await send(harness.port, ["ok@dest.test", "later@dest.test", "gone@dest.test"])

    first_pass = {"accepted": 3, "delivered": 1, "soft_bounced": 0, "hard_bounced": 1, "deferred": 1, "reserved": 0}

    async def first_pass_reported() -> bool:
        return await counts(harness) == first_pass and len(upstream.handler.messages) == 2

    seen = await watch(harness, queue_id, first_pass_reported)
    state = seen[1]
    assert {r.address: r.status for r in state.recipients} == {
        "ok@dest.test": "delivered",
        "later@dest.test": "deferred",
        "gone@dest.test": "hard_bounced",
    }
    assert state.next_attempt_at - state.last_attempt_at == pytest.approx(0.3)
    assert read_state(harness, queue_id) is not None  # the deferred recipient keeps the message queued
    original, dsn = upstream.handler.messages
    assert original.rcpt_tos == ["ok@dest.test"]
    assert dsn.rcpt_tos == ["app@example.com"] and b"Status: 5.1.1" in dsn.content
    assert b"later@dest.test" not in dsn.content  # a deferred recipient is not bounced
    first_try_ended = state.last_attempt_at
    del upstream.handler.rcpt_replies["later@dest.test"]

    async def all_final() -> bool:
        return (await counts(harness))["delivered"] == 2

    await eventually(all_final)
    assert [m.rcpt_tos for m in upstream.handler.messages] == [
        ["ok@dest.test"],
        ["app@example.com"],
        ["later@dest.test"],
    ]
    assert time.time() >= first_try_ended + 0.3  # the retry waited for the backoff
    assert await counts(harness) == {
        "accepted": 3,
        "delivered": 2,
        "soft_bounced": 0,
        "hard_bounced": 1,
        "deferred": 0,
        "reserved": 0,
    }
    await eventually(lambda: spool_empty(harness))


async def test_connection_dropped_in_the_middle_of_data_is_deferred_then_sent_whole(  # type: ignore[no-untyped-def]
    make_relay, raw_upstreams
) -> None:
    """The upstream reads 100 bytes of the message and hangs up: no 250, so the message is
    deferred (not delivered, not bounced) and the retry sends it whole, once."""
    upstream = await raw_upstreams("drop_in_data", faulty=1)
    delivery = {**FAST_RETRY, "workers": 1}
    harness = make_relay(upstream.port, delivery=delivery)
    await harness.start()
    await add_account(harness)
    body = MESSAGE + b"".join(b"line %04d of a message long enough to be cut\r\n" % n for n in range(100))
    queue_id = await send(harness.port, ["cut@dest.test"], body)

    async def delivered() -> bool:
        return (await counts(harness))["delivered"] == 1

    seen = await watch(harness, queue_id, delivered)
    assert sorted(with_status(seen, "deferred")) == [1] and set(seen) <= {1, 2}
    assert "failed" in seen[1].recipients[0].reply
    assert upstream.connections == 2
    assert len(upstream.messages) == 1
    sender, recipients, content = upstream.messages[0]
    assert (sender, recipients) == ("app@example.com", ["cut@dest.test"])
    assert content.endswith(body) and f"id {queue_id}".encode() in content
    assert await counts(harness) == {
        "accepted": 1,
        "delivered": 1,
        "soft_bounced": 0,
        "hard_bounced": 0,
        "deferred": 0,
        "reserved": 0,
    }


async def test_utf8_recipient_bounces_alone_when_the_upstream_lacks_smtputf8(
    relay: RelayHarness, upstream: Upstream
) -> None:
    """The conftest upstream does not offer SMTPUTF8. The ASCII recipient is delivered; the
    UTF-8 one is a hard bounce with 5.6.7 and a DSN, at once. (Both steps used to raise
    UnicodeEncodeError: the attempt, then the DSN; the message was retried forever, never
    expiring, its results never reaching the meter.)"""
    await add_account(relay)
    queue_id = await send(relay.port, ["ok@dest.test", "ü@dest.test"], options=("SMTPUTF8",))

    async def final() -> bool:
        return (await counts(relay))["hard_bounced"] == 1 and len(upstream.handler.messages) == 2

    seen = await watch(relay, queue_id, final)
    # One attempt settles both (it may leave the spool before the watcher sees its state).
    assert set(seen) <= {1}
    original, dsn = upstream.handler.messages
    assert original.rcpt_tos == ["ok@dest.test"]
    assert dsn.rcpt_tos == ["app@example.com"] and b"Status: 5.6.7" in dsn.content
    assert b"Final-Recipient: utf-8; \\x{FC}@dest.test" in dsn.content  # RFC 6533, the field stays ASCII
    assert await counts(relay) == {
        "accepted": 2,
        "delivered": 1,
        "soft_bounced": 0,
        "hard_bounced": 1,
        "deferred": 0,
        "reserved": 0,
    }
    await eventually(lambda: spool_empty(relay))


class AuthUpstream(Upstream):
    """An upstream that offers AUTH in plaintext and refuses every login with 535."""

    def _session(self) -> SMTP:
        self.connections += 1
        return SMTP(
            self.handler,
            hostname="upstream.test",
            ident="upstream",
            auth_require_tls=False,
            authenticator=lambda *_: AuthResult(success=False, handled=False),
        )


async def test_upstream_refusing_our_auth_defers_instead_of_bouncing(make_relay, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Wrong smarthost credentials (535 to our AUTH) are our configuration problem: the mail
    is deferred and kept, never hard-bounced back to the customer (it was hard-bounced:
    SMTPAuthenticationError is a 5xx SMTPResponseException)."""
    upstream = AuthUpstream(port=free_port(), handler=UpstreamHandler())
    await upstream.start()
    (tmp_path / "upstream.password").write_text("wrong\n")
    harness = make_relay(
        upstream.port, upstream={"username": "relay", "password_file": "upstream.password"}, delivery=FAST_RETRY
    )
    await harness.start()
    await add_account(harness)
    queue_id = await send(harness.port, ["a@dest.test"])

    async def tried_twice() -> bool:
        state = read_state(harness, queue_id)
        return state is not None and state.attempts >= 2

    seen = await watch(harness, queue_id, tried_twice)
    await upstream.stop()
    for state in seen.values():
        assert state.recipients[0].status == "deferred"
        assert state.recipients[0].reply.startswith("upstream refused our AUTH: 535")
    assert (await counts(harness))["hard_bounced"] == 0 and upstream.handler.messages == []
