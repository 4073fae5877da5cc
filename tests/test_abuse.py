"""Abuse: AUTH brute force, connection floods, idle and slow-drip sessions, open relay, STARTTLS.

Other client addresses are real: Linux routes all of 127.0.0.0/8 to loopback, so a
test connects from 127.0.0.2, 127.0.0.3 ... to be a different client.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.conftest import PASSWORD, RawSmtp, RelayHarness, Reply, Upstream, add_account

FAST_LOCKOUT = {
    "auth_max_failures": 3,
    "auth_failure_window": 60,
    "auth_lockout": 1.2,
    "auth_failure_delay": 0,
    "auth_failure_delay_max": 0,
}


def plain(login: str, password: str) -> str:
    return "AUTH PLAIN " + base64.b64encode(f"\0{login}\0{password}".encode()).decode()


async def session(port: int, source: str | None = None) -> RawSmtp:
    """Connected, banner read, EHLO done."""
    client = await RawSmtp.open(port, source)
    assert (await client.reply()).code == 220
    assert (await client.command("EHLO client.test")).code == 250
    return client


async def try_login(port: int, login: str, password: str, source: str | None = None) -> Reply:
    client = await session(port, source)
    try:
        return await client.command(plain(login, password))
    finally:
        client.close()


async def started(make_relay: Callable[..., RelayHarness], upstream: Upstream, **overrides: Any) -> RelayHarness:
    harness = make_relay(upstream.port, **overrides)
    await harness.start()
    await add_account(harness)
    return harness


async def usage(harness: RelayHarness) -> tuple[int, int]:
    """(accepted, reserved) of account app, once the asynchronous hold releases settle."""
    assert harness.relay is not None
    for _ in range(100):
        report = (await harness.relay.meter.usage("app")).usage
        if report.reserved == 0:
            break
        await asyncio.sleep(0.02)
    return report.accepted, report.reserved


# -- AUTH brute force -------------------------------------------------------------------------


async def test_failed_auth_is_answered_ever_more_slowly_up_to_the_cap(make_relay, upstream: Upstream) -> None:  # type: ignore[no-untyped-def]
    """The 535 comes after 0.1, 0.2, then 0.25 s twice (capped; uncapped 0.4 and 0.8); a
    right password still gets in below the lockout threshold."""
    harness = await started(
        make_relay, upstream, abuse={"auth_max_failures": 10, "auth_failure_delay": 0.1, "auth_failure_delay_max": 0.25}
    )
    client = await session(harness.port)
    took = []
    for _ in range(4):
        began = time.monotonic()
        reply = await client.command(plain("app", "wrong"))
        took.append(time.monotonic() - began)
        assert (reply.code, reply.text) == (535, "5.7.8 Authentication credentials invalid")
    for seconds, expected in zip(took, (0.1, 0.2, 0.25, 0.25)):
        assert seconds >= expected
    assert took[3] < 0.65  # capped: uncapped it would be 0.8 s
    assert (await client.command(plain("app", PASSWORD))).code == 235
    client.close()


async def test_lockout_per_client_address(make_relay, upstream: Upstream) -> None:  # type: ignore[no-untyped-def]
    """Three failures from 127.0.0.1 (each for a different login) lock that address out: even
    the right password gets 454 4.7.0 there, while 127.0.0.2 logs in; the lock then expires."""
    harness = await started(make_relay, upstream, abuse=FAST_LOCKOUT)
    for n in range(3):
        assert (await try_login(harness.port, f"guess{n}", "wrong")).code == 535
    locked = await try_login(harness.port, "app", PASSWORD)
    assert locked.code == 454
    assert locked.text.startswith("4.7.0 Too many failed authentication attempts from your address;")
    assert (await try_login(harness.port, "app", PASSWORD, source="127.0.0.2")).code == 235
    await asyncio.sleep(1.3)
    assert (await try_login(harness.port, "app", PASSWORD)).code == 235


async def test_lockout_per_login_across_addresses(make_relay, upstream: Upstream) -> None:  # type: ignore[no-untyped-def]
    """Failures for login `app` from three different addresses lock the login: the right
    password from a fourth address gets 454 4.7.0; another login is not affected; a login
    that does not exist locks the same way (no account enumeration); the lock expires."""
    harness = await started(make_relay, upstream, abuse=FAST_LOCKOUT)
    assert harness.relay is not None
    await harness.relay.meter.add_account("other", PASSWORD, "small", ["example.org"], [])
    for n in (2, 3, 4):
        assert (await try_login(harness.port, "app", "wrong", source=f"127.0.0.{n}")).code == 535
        assert (await try_login(harness.port, "ghost", "wrong", source=f"127.0.1.{n}")).code == 535
    locked = await try_login(harness.port, "app", PASSWORD, source="127.0.0.5")
    assert locked.code == 454
    assert locked.text.startswith("4.7.0 Too many failed authentication attempts for this login;")
    ghost = await try_login(harness.port, "ghost", "anything", source="127.0.0.5")
    assert (ghost.code, ghost.text.split(";")[0]) == (454, locked.text.split(";")[0])
    assert (await try_login(harness.port, "other", PASSWORD, source="127.0.0.5")).code == 235
    await asyncio.sleep(1.3)
    assert (await try_login(harness.port, "app", PASSWORD, source="127.0.0.5")).code == 235


async def test_parallel_guesses_get_at_most_max_failures_passwords_checked(make_relay, upstream: Upstream) -> None:  # type: ignore[no-untyped-def]
    """49 wrong passwords sent at once from one address, then the right one, with the lockout
    at 5 and the concurrency caps out of the way: an attempt counts from its start, so exactly
    5 passwords are checked (535) and everything after them, the right password too, gets 454."""
    harness = await started(
        make_relay,
        upstream,
        abuse={
            "auth_max_failures": 5,
            "auth_failure_window": 600,
            "auth_lockout": 600,
            "auth_failure_delay": 0,
            "auth_checks_per_client": 100,
            "auth_checks_in_flight": 100,
        },
    )
    clients = [await session(harness.port) for _ in range(50)]
    for client in clients[:49]:
        await client.send((plain("app", "wrong-guess") + "\r\n").encode())
    await asyncio.sleep(0.3)  # the guesses are in; the right password comes after them
    await clients[49].send((plain("app", PASSWORD) + "\r\n").encode())
    replies = await asyncio.gather(*(client.reply(timeout=60) for client in clients))
    codes = [reply.code for reply in replies]
    assert codes.count(535) == 5, codes  # checked and wrong
    assert codes.count(454) == 45 and codes[49] == 454, codes  # never checked: locked out
    for client in clients:
        client.close()


async def test_one_clients_auth_burst_does_not_hold_up_another_clients_auth(make_relay, upstream: Upstream) -> None:  # type: ignore[no-untyped-def]
    """30 AUTHs at once from 127.0.0.1 (right password, no lockout in play), then one from
    127.0.0.2: at most 2 of the burst's checks run at a time, so the other client's check
    starts at once and its 235 comes before nearly all of the burst's."""
    harness = await started(
        make_relay,
        upstream,
        abuse={
            "auth_max_failures": 1000,
            "auth_failure_delay": 0,
            "auth_checks_per_client": 2,
            "auth_checks_in_flight": 4,
        },
    )
    burst = [await session(harness.port) for _ in range(30)]
    other = await session(harness.port, source="127.0.0.2")
    finished: list[str] = []

    async def login(client: RawSmtp, who: str) -> int:
        reply = await client.command(plain("app", PASSWORD), timeout=60)
        finished.append(who)
        return reply.code

    tasks = [asyncio.ensure_future(login(client, "burst")) for client in burst]
    await asyncio.sleep(0.05)  # the burst is queued first
    codes = await asyncio.gather(login(other, "other"), *tasks)
    assert set(codes) == {235}
    before = finished.index("other")
    assert before <= 8, f"the other client's AUTH finished after {before} of the burst's 30"
    for client in [*burst, other]:
        client.close()


# -- connections and session time --------------------------------------------------------------


async def test_connection_cap_per_client_address(make_relay, upstream: Upstream) -> None:  # type: ignore[no-untyped-def]
    """Two connections from 127.0.0.1 are served; the third gets 421 4.7.0 and is closed
    before any banner; another address is not affected; a closed slot is free again."""
    harness = await started(make_relay, upstream, abuse={"max_connections_per_client": 2})
    first, second = await session(harness.port), await session(harness.port)
    third = await RawSmtp.open(harness.port)
    refused = await third.reply()
    assert (refused.code, refused.text) == (421, "4.7.0 Too many connections from your address; retry later")
    assert await third.closed_by_server()
    elsewhere = await session(harness.port, source="127.0.0.2")
    first.close()
    await asyncio.sleep(0.1)
    again = await session(harness.port)
    for client in (second, elsewhere, again):
        assert (await client.command("NOOP")).code == 250
        client.close()


async def test_idle_session_gets_421_and_its_hold_back(make_relay, upstream: Upstream) -> None:  # type: ignore[no-untyped-def]
    """A client that stops talking mid-transaction is told 421 4.4.2 and closed at the idle
    timeout, and the email its RCPT reserved goes back to the account."""
    harness = await started(make_relay, upstream, limits={"session_timeout": 0.4})
    client = await session(harness.port)
    assert (await client.command(plain("app", PASSWORD))).code == 235
    assert (await client.command("MAIL FROM:<app@example.com>")).code == 250
    assert (await client.command("RCPT TO:<a@dest.test>")).code == 250
    began = time.monotonic()
    assert harness.relay is not None
    assert (await harness.relay.meter.usage("app")).usage.reserved == 1
    idle = await client.reply(timeout=3)
    assert (idle.code, idle.text) == (421, "4.4.2 relay.test Idle timeout exceeded; closing connection")
    assert 0.35 <= time.monotonic() - began < 2
    assert await client.closed_by_server()
    assert await usage(harness) == (0, 0)


async def test_slow_drip_commands_are_cut_at_the_session_deadline(make_relay, upstream: Upstream) -> None:  # type: ignore[no-untyped-def]
    """One byte every 50 ms completes a NOOP every 300 ms, so the idle timeout never fires;
    the total deadline still ends the session with 421 4.4.2."""
    harness = await started(make_relay, upstream, limits={"session_timeout": 5, "session_max_duration": 0.8})
    began = time.monotonic()
    client = await session(harness.port)
    replies: list[Reply] = []

    async def drip() -> None:
        while True:
            for byte in b"NOOP\r\n":
                await client.send(bytes([byte]))
                await asyncio.sleep(0.05)

    async def read() -> None:
        while True:
            replies.append(await client.reply(timeout=5))

    dripping = asyncio.ensure_future(drip())
    try:
        with pytest.raises((EOFError, asyncio.IncompleteReadError, ConnectionError)):
            await read()
    finally:
        dripping.cancel()
        await asyncio.gather(dripping, return_exceptions=True)
    assert 0.75 <= time.monotonic() - began < 3
    assert replies[-1].code == 421
    assert replies[-1].text == "4.4.2 relay.test Session time limit exceeded; closing connection"
    assert all(reply.code == 250 for reply in replies[:-1]) and len(replies) >= 2
    client.close()


async def test_slow_drip_in_data_is_cut_and_nothing_is_accepted(make_relay, upstream: Upstream) -> None:  # type: ignore[no-untyped-def]
    """A message dripped one byte at a time never completes: at the session deadline the
    client gets 421 4.4.2, the hold is released, nothing is spooled or sent upstream."""
    harness = await started(make_relay, upstream, limits={"session_timeout": 5, "session_max_duration": 1.0})
    client = await session(harness.port)
    assert (await client.command(plain("app", PASSWORD))).code == 235
    assert (await client.command("MAIL FROM:<app@example.com>")).code == 250
    assert (await client.command("RCPT TO:<a@dest.test>")).code == 250
    assert (await client.command("DATA")).code == 354

    async def drip() -> None:
        for byte in b"Subject: slow\r\n\r\n" + b"x" * 1000:
            await client.send(bytes([byte]))
            await asyncio.sleep(0.02)

    dripping = asyncio.ensure_future(drip())
    try:
        cut = await client.reply(timeout=5)
    finally:
        dripping.cancel()
        await asyncio.gather(dripping, return_exceptions=True)
    assert (cut.code, cut.text) == (421, "4.4.2 relay.test Session time limit exceeded; closing connection")
    assert await client.closed_by_server()
    assert await usage(harness) == (0, 0)
    assert harness.relay is not None
    assert harness.relay.spool.incoming_ids() == [] and harness.relay.spool.active_ids() == []
    assert upstream.handler.messages == []


# -- no open relay --------------------------------------------------------------------------------

UNAUTHENTICATED = [
    "MAIL FROM:<app@example.com>",
    "MAIL FROM:<>",
    "MAIL FROM:<app@example.com> AUTH=<>",
    "MAIL FROM:<postmaster@example.com> SIZE=100",
    "RCPT TO:<victim@elsewhere.test>",
    "RCPT TO:<@relay.test:victim@elsewhere.test>",
    "RCPT TO:<@a.test,@b.test:victim@elsewhere.test>",
    "RCPT TO:<victim%elsewhere.test@relay.test>",
    'RCPT TO:<"victim@elsewhere.test"@relay.test>',
    "RCPT TO:<victim@elsewhere.test>",
    "RCPT TO:<postmaster>",
    "DATA",
]


async def assert_no_relay(client: RawSmtp) -> None:
    for line in UNAUTHENTICATED:
        reply = await client.command(line)
        assert (reply.code, reply.text) == (
            530,
            "5.7.0 Authentication required: AUTH with your account's credentials",
        ), line
    reply = await client.command("MAIL FROM:<\xfc@example.com>".encode("latin-1"))  # 8-bit, not UTF-8
    assert reply.code == 530


async def test_no_relaying_without_an_account_from_any_direction(make_relay, upstream: Upstream) -> None:  # type: ignore[no-untyped-def]
    """530 for MAIL, RCPT and DATA: with no AUTH, after a failed AUTH, after RSET, after a new
    EHLO, pipelined in one write, with null senders, source routes, percent hacks and quoted
    local parts. Nothing reaches the meter or the upstream."""
    harness = await started(make_relay, upstream)
    client = await session(harness.port)
    await assert_no_relay(client)
    assert (await client.command(plain("app", "wrong"))).code == 535
    await assert_no_relay(client)
    assert (await client.command("RSET")).code == 250
    await assert_no_relay(client)
    assert (await client.command("EHLO again.test")).code == 250
    await assert_no_relay(client)
    # Everything in one write, the message included: each line is refused on its own.
    await client.send(
        b"MAIL FROM:<app@example.com>\r\nRCPT TO:<v@elsewhere.test>\r\nDATA\r\n"
        b"Subject: spam\r\n\r\nspam\r\n.\r\nQUIT\r\n"
    )
    codes = [(await client.reply()).code for _ in range(8)]
    assert codes == [530, 530, 530, 500, 500, 500, 500, 221]
    client.close()
    await asyncio.sleep(0.2)
    assert upstream.handler.messages == []
    assert await usage(harness) == (0, 0)


async def test_network_bound_account_only_for_its_network(make_relay, upstream: Upstream) -> None:  # type: ignore[no-untyped-def]
    """An account bound to 127.0.0.2/32 sends without AUTH from there and nowhere else."""
    harness = make_relay(upstream.port)
    await harness.start()
    await add_account(harness, name="office", networks=("127.0.0.2/32",), password=None)
    outside = await session(harness.port, source="127.0.0.3")
    await assert_no_relay(outside)
    outside.close()
    inside = await session(harness.port, source="127.0.0.2")
    assert (await inside.command("MAIL FROM:<printer@example.com>")).code == 250
    inside.close()


# -- STARTTLS ---------------------------------------------------------------------------------------


@pytest.fixture
def certificates(tmp_path: Path) -> tuple[trustme.CA, dict[str, str]]:
    authority = trustme.CA()
    server_cert = authority.issue_cert("relay.test", "127.0.0.1")
    server_cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    server_cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    return authority, {"certificate": str(tmp_path / "cert.pem"), "key": str(tmp_path / "key.pem")}


async def start_tls(client: RawSmtp, authority: trustme.CA) -> None:
    context = ssl.create_default_context()
    authority.configure_trust(context)
    await client.writer.start_tls(context, server_hostname="relay.test")


async def test_starttls_forgets_a_plaintext_login(make_relay, upstream: Upstream, certificates) -> None:  # type: ignore[no-untyped-def]
    """RFC 3207 4.2: after STARTTLS the server forgets what the client said before it. A
    login made in plaintext (allowed on loopback) must be repeated inside TLS: MAIL is 530."""
    authority, tls = certificates
    harness = await started(make_relay, upstream, tls=tls, auth={"allow_plaintext_on_loopback": True})
    client = await session(harness.port)
    assert (await client.command(plain("app", PASSWORD))).code == 235
    assert (await client.command("STARTTLS")).code == 220
    await start_tls(client, authority)
    assert (await client.command("EHLO client.test")).code == 250
    assert (await client.command("MAIL FROM:<app@example.com>")).code == 530
    assert (await client.command(plain("app", PASSWORD))).code == 235
    assert (await client.command("MAIL FROM:<app@example.com>")).code == 250
    client.close()


async def test_auth_before_starttls_is_538_and_relaying_stays_closed(  # type: ignore[no-untyped-def]
    make_relay, upstream: Upstream, certificates
) -> None:
    """Plaintext AUTH not allowed: EHLO offers no AUTH, AUTH PLAIN and LOGIN get 538 5.7.11,
    MAIL stays 530; inside TLS AUTH is offered and works."""
    authority, tls = certificates
    harness = await started(make_relay, upstream, tls=tls, auth={"allow_plaintext_on_loopback": False})
    client = await RawSmtp.open(harness.port)
    assert (await client.reply()).code == 220
    ehlo = await client.command("EHLO client.test")
    assert b"250-STARTTLS" in ehlo.lines and not any(b"AUTH" in line for line in ehlo.lines)
    for line in (plain("app", PASSWORD), "AUTH LOGIN", "AUTH LOGIN " + base64.b64encode(b"app").decode()):
        reply = await client.command(line)
        assert (reply.code, reply.text) == (538, "5.7.11 Encryption required for requested authentication mechanism")
    assert (await client.command("MAIL FROM:<app@example.com>")).code == 530
    assert (await client.command("STARTTLS")).code == 220
    await start_tls(client, authority)
    ehlo = await client.command("EHLO client.test")
    assert any(line.startswith((b"250-AUTH ", b"250 AUTH ")) for line in ehlo.lines)
    assert (await client.command(plain("app", PASSWORD))).code == 235
    client.close()


async def test_commands_sent_with_starttls_in_plaintext_are_discarded(  # type: ignore[no-untyped-def]
    make_relay, upstream: Upstream, certificates
) -> None:
    """Plaintext command injection (CVE-2011-0411 class): bytes after STARTTLS in the same
    write must not be executed inside the TLS session."""
    authority, tls = certificates
    harness = await started(make_relay, upstream, tls=tls, auth={"allow_plaintext_on_loopback": True})
    client = await session(harness.port)
    await client.send(b"STARTTLS\r\n" + plain("app", PASSWORD).encode() + b"\r\n")
    assert (await client.reply()).code == 220
    await start_tls(client, authority)
    ehlo = await client.command("EHLO client.test")
    assert ehlo.code == 250 and ehlo.lines[0] == b"250-relay.test"  # the first reply in TLS is EHLO's
    assert (await client.command("MAIL FROM:<app@example.com>")).code == 530  # the injected AUTH did nothing
    client.close()


async def test_failed_tls_handshakes_and_drops_give_their_connection_slot_back(  # type: ignore[no-untyped-def]
    make_relay, upstream: Upstream, certificates
) -> None:
    """With a cap of 2 per client: garbage instead of a TLS handshake, a reset mid-session and
    a refused third connection, repeated, never eat a slot for good (aiosmtpd reports a
    failed handshake as lost twice)."""
    _, tls = certificates
    harness = await started(make_relay, upstream, tls=tls, abuse={"max_connections_per_client": 2})
    for _ in range(3):
        broken = await session(harness.port)
        assert (await broken.command("STARTTLS")).code == 220
        await broken.send(b"this is not a TLS ClientHello\r\n" * 20)
        assert await broken.closed_by_server()
        dropped = await session(harness.port)
        dropped.writer.transport.abort()
    await asyncio.sleep(0.2)
    assert harness.relay is not None
    assert harness.relay.context.connections.open_from("127.0.0.1") == 0
    first, second = await session(harness.port), await session(harness.port)
    first.close()
    second.close()
