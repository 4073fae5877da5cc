"""SMTP in, over real sockets: AUTH, no open relay, sender domains, the metering hook."""

from __future__ import annotations

import asyncio
import base64
import re

import aiosmtplib
import pytest
from aiosmtpd.smtp import SMTP
from hypothesis import given, settings
from hypothesis import strategies as st

from mailmeter.relay.data import DataScan, crlf_line_ends, has_bare_newline, has_long_line
from mailmeter.relay.smtpd import CAMPAIGN_HEADER, RelaySMTP, campaign_tag
from tests.conftest import PASSWORD, RawSmtp, RelayHarness, Upstream, add_account, settled_usage

MESSAGE = b"From: app@example.com\r\nTo: someone@dest.test\r\nSubject: hi\r\n\r\nhello\r\n"


async def connect(port: int) -> aiosmtplib.SMTP:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=10)
    await client.connect()
    await client.ehlo()
    return client


async def test_delivery_end_to_end(relay: RelayHarness, upstream: Upstream) -> None:
    await add_account(relay)
    client = await connect(relay.port)
    await client.login("app", PASSWORD)
    errors, reply = await client.sendmail("app@example.com", ["a@dest.test", "b@dest.test"], MESSAGE)
    await client.quit()
    assert errors == {}
    assert reply.startswith("2.0.0 Ok: queued as ")
    queue_id = reply.rsplit(" ", 1)[1]
    await upstream.handler.wait_for(lambda: len(upstream.handler.delivered_to()) == 2)
    received = upstream.handler.messages[0]
    assert received.mail_from == "app@example.com"
    assert sorted(received.rcpt_tos) == ["a@dest.test", "b@dest.test"]
    assert f"id {queue_id}".encode() in received.content  # our Received: trace header
    assert received.content.endswith(b"hello\r\n")
    assert relay.relay is not None
    meter = relay.relay.meter

    async def delivered() -> int:
        return (await meter.usage("app")).usage.delivered

    for _ in range(100):
        if await delivered() == 2:
            break
        await asyncio.sleep(0.05)
    report = (await meter.usage("app")).as_json()
    assert report["accepted"] == 2 and report["delivered"] == 2 and report["reserved"] == 0
    assert report["remaining"] == 998


async def test_auth_right_and_wrong_plain_and_login(relay: RelayHarness) -> None:
    await add_account(relay)
    client = await connect(relay.port)
    with pytest.raises(aiosmtplib.SMTPAuthenticationError) as wrong:
        await client.auth_plain("app", "wrong password")
    assert wrong.value.code == 535
    with pytest.raises(aiosmtplib.SMTPAuthenticationError):
        await client.auth_login("nobody", PASSWORD)
    reply = await client.auth_login("app", PASSWORD)
    assert reply.code == 235
    await client.quit()
    client = await connect(relay.port)
    assert (await client.auth_plain("app", PASSWORD)).code == 235
    await client.quit()


async def test_auth_garbage_gets_501(relay: RelayHarness) -> None:
    client = await connect(relay.port)
    code, _ = await client.execute_command(b"AUTH", b"PLAIN", b"!!!notbase64")
    assert code == 501
    await client.quit()


async def command(client: aiosmtplib.SMTP, line: str) -> tuple[int, str]:
    response = await client.execute_command(*[part.encode() for part in line.split(" ")])
    return response.code, response.message


async def test_open_relay_refused(relay: RelayHarness, upstream: Upstream) -> None:
    await add_account(relay)
    client = await connect(relay.port)
    assert await command(client, "MAIL FROM:<app@example.com>") == (
        530,
        "5.7.0 Authentication required: AUTH with your account's credentials",
    )
    code, text = await command(client, "RCPT TO:<victim@elsewhere.test>")
    assert code == 530 and text.startswith("5.7.0")
    code, _ = await command(client, "DATA")
    assert code == 530
    await client.quit()
    await asyncio.sleep(0.2)
    assert upstream.handler.messages == []


async def test_foreign_sender_domain_refused(relay: RelayHarness) -> None:
    await add_account(relay, domains=("example.com", "example.org"))
    client = await connect(relay.port)
    await client.login("app", PASSWORD)
    code, text = await command(client, "MAIL FROM:<ceo@bank.test>")
    assert code == 550 and text.startswith("5.7.1 Sender <ceo@bank.test> is not in the sender domains")
    code, _ = await command(client, "MAIL FROM:<news@sub.example.com>")
    assert code == 550  # a subdomain is another domain
    code, _ = await command(client, "MAIL FROM:<news@EXAMPLE.org>")
    assert code == 250
    await client.quit()


async def test_non_ascii_look_alikes_do_not_pass_as_an_ascii_sender_domain(relay: RelayHarness) -> None:
    """The Kelvin sign lowercases to an ASCII "k" with str.lower(): MAIL FROM a domain spelled with
    it, or with a Cyrillic "р" or fullwidth letters, is not the account's ASCII domain; an IDN
    matches the account's A-label."""
    await add_account(relay, domains=("kelvin.test", "example.com", "xn--bcher-kva.example"))
    client = await RawSmtp.open(relay.port)
    assert (await client.reply()).code == 220
    assert (await client.command("EHLO client.test")).code == 250
    login = base64.b64encode(f"\0app\0{PASSWORD}".encode()).decode()
    assert (await client.command(f"AUTH PLAIN {login}")).code == 235
    for sender in ("a@\u212aelvin.test", "a@exam\u0440le.com", "a@\uff45xample.com"):
        reply = await client.command(f"MAIL FROM:<{sender}> SMTPUTF8".encode())
        assert reply.code == 550 and reply.text.startswith("5.7.1 Sender"), (sender, reply)
    for sender in ("a@KELVIN.test", "a@B\u00fccher.Example", "a@XN--bcher-KVA.example"):
        assert (await client.command(f"MAIL FROM:<{sender}> SMTPUTF8".encode())).code == 250, sender
        assert (await client.command("RSET")).code == 250
    client.close()


async def test_addresses_with_control_characters_are_553_and_never_counted(relay: RelayHarness) -> None:
    """An address delivery could never put on a MAIL or RCPT line (aiosmtplib refuses a command
    argument with any C0 control character or DEL) is refused before anything is reserved:
    before this check, `ctl\x01x@...` got 250, was counted, and deferred until it expired."""
    await add_account(relay)
    client = await RawSmtp.open(relay.port)
    assert (await client.reply()).code == 220
    assert (await client.command("EHLO client.test")).code == 250
    login = base64.b64encode(f"\0app\0{PASSWORD}".encode()).decode()
    assert (await client.command(f"AUTH PLAIN {login}")).code == 235
    for control in ("\x01", "\x1b", "\x7f"):
        reply = await client.command(f"MAIL FROM:<a{control}b@example.com>".encode())
        assert (reply.code, reply.text[:5]) == (553, "5.1.3"), (control, reply)
    assert (await client.command("MAIL FROM:<a@example.com>")).code == 250
    for control in ("\x01", "\x1b", "\x7f"):
        reply = await client.command(f"RCPT TO:<ctl{control}x@example.net>".encode())
        assert (reply.code, reply.text[:5]) == (553, "5.1.3"), (control, reply)
    assert (await client.command("RSET")).code == 250
    client.close()
    usage = await settled_usage(relay.relay.meter, "app")
    assert (usage.accepted, usage.reserved) == (0, 0)


async def test_auth_login_continuation_over_the_line_limit_is_500_and_the_session_goes_on(
    relay: RelayHarness,
) -> None:
    """RFC 4954 section 4: an AUTH line the server cannot take is `500 5.5.6`, not `451 4.3.0
    Internal error`; the rest of the long line is not read as commands. An aborted exchange
    (`*`) gets one reply, 501, and no stray 535 after it."""
    await add_account(relay)
    client = await RawSmtp.open(relay.port)
    assert (await client.reply()).code == 220
    assert (await client.command("EHLO client.test")).code == 250
    assert (await client.command("AUTH LOGIN")).code == 334
    reply = await client.command(b"A" * 70_000 + b"NOOP")
    assert (reply.code, reply.text) == (500, "5.5.6 Authentication Exchange line is too long")
    assert (await client.command("AUTH LOGIN")).code == 334
    assert (await client.command(base64.b64encode(b"app"))).code == 334
    assert (await client.command(b"Q" * 200_000)).code == 500
    assert (await client.command("AUTH LOGIN")).code == 334
    assert (await client.command("*")).code == 501
    assert (await client.command("NOOP")).code == 250  # the next reply is NOOP's own
    assert (await client.command("AUTH LOGIN " + base64.b64encode(b"app").decode())).code == 334
    assert (await client.command(base64.b64encode(PASSWORD.encode()))).code == 235
    client.close()


async def test_mail_from_auth_parameter_accepted(relay: RelayHarness, upstream: Upstream) -> None:
    await add_account(relay)
    client = await connect(relay.port)
    await client.login("app", PASSWORD)
    assert (await command(client, "MAIL FROM:<app@example.com> AUTH=<>"))[0] == 250
    assert (await command(client, "RCPT TO:<x@dest.test>"))[0] == 250
    code, _ = await client.data(MESSAGE)
    assert code == 250
    await client.quit()
    await upstream.handler.wait_for(lambda: upstream.handler.delivered_to() == ["x@dest.test"])


async def test_auth_only_after_starttls_unless_allowed(make_relay, upstream: Upstream) -> None:
    harness = make_relay(upstream.port, auth={"allow_plaintext_on_loopback": False})
    await harness.start()
    await add_account(harness)
    client = await connect(harness.port)
    assert "auth" not in client.esmtp_extensions
    token = base64.b64encode(f"\0app\0{PASSWORD}".encode()).decode()
    code, text = await command(client, f"AUTH PLAIN {token}")
    assert code == 538 and "Encryption required" in text
    await client.quit()


async def test_network_bound_account_needs_no_auth(make_relay, upstream: Upstream) -> None:
    harness = make_relay(upstream.port)
    await harness.start()
    await add_account(harness, name="office", networks=("127.0.0.0/8",), password=None)
    client = await connect(harness.port)
    errors, _ = await client.sendmail("printer@example.com", ["boss@dest.test"], MESSAGE)
    await client.quit()
    assert errors == {}
    await upstream.handler.wait_for(lambda: upstream.handler.delivered_to() == ["boss@dest.test"])
    assert harness.relay is not None
    assert (await harness.relay.meter.usage("office")).usage.accepted == 1


async def test_quota_runs_out_mid_message_partial_452(relay: RelayHarness, upstream: Upstream) -> None:
    await add_account(relay, plan="tiny")  # 3 emails a month
    client = await connect(relay.port)
    await client.login("app", PASSWORD)
    assert (await command(client, "MAIL FROM:<app@example.com>"))[0] == 250
    replies = [await command(client, f"RCPT TO:<r{n}@dest.test>") for n in range(5)]
    assert [code for code, _ in replies] == [250, 250, 250, 452, 452]
    assert replies[3][1] == (
        "4.7.1 Email quota for this billing period is used up; retry after the period renews"
        " or ask your provider to raise the plan's quota"
    )
    code, text = await client.data(MESSAGE)
    assert code == 250
    # The quota is now used up: the next transaction is deferred at MAIL.
    code, text = await command(client, "MAIL FROM:<app@example.com>")
    assert code == 451 and text.startswith("4.7.1 Email quota")
    await client.quit()
    await upstream.handler.wait_for(lambda: len(upstream.handler.delivered_to()) == 3)
    assert sorted(upstream.handler.delivered_to()) == ["r0@dest.test", "r1@dest.test", "r2@dest.test"]
    assert relay.relay is not None
    usage = (await relay.relay.meter.usage("app")).usage
    assert (usage.accepted, usage.reserved) == (3, 0)


async def test_rset_quit_and_disconnect_release_holds(relay: RelayHarness) -> None:
    await add_account(relay, plan="tiny")
    assert relay.relay is not None
    meter = relay.relay.meter
    client = await connect(relay.port)
    await client.login("app", PASSWORD)
    await command(client, "MAIL FROM:<app@example.com>")
    await command(client, "RCPT TO:<a@dest.test>")
    await command(client, "RCPT TO:<b@dest.test>")
    assert (await meter.usage("app")).usage.reserved == 2
    assert (await command(client, "RSET"))[0] == 250
    assert (await settled_usage(meter)).reserved == 0
    await command(client, "MAIL FROM:<app@example.com>")
    await command(client, "RCPT TO:<a@dest.test>")
    client.close()  # drop the connection without QUIT
    usage = await settled_usage(meter)
    assert (usage.accepted, usage.reserved) == (0, 0)


async def test_too_many_recipients_452(make_relay, upstream: Upstream) -> None:
    harness = make_relay(upstream.port, limits={"recipients_per_message": 2})
    await harness.start()
    await add_account(harness)
    client = await connect(harness.port)
    await client.login("app", PASSWORD)
    await command(client, "MAIL FROM:<app@example.com>")
    codes = [(await command(client, f"RCPT TO:<r{n}@dest.test>"))[0] for n in range(3)]
    assert codes == [250, 250, 452]
    await client.quit()


async def drained(harness: RelayHarness) -> None:
    """Every accepted message (and any bounce it caused) delivered or bounced, its results in the meter."""
    assert harness.relay is not None
    delivery = harness.relay.delivery
    for _ in range(500):
        if delivery.queue_depth == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"the spool did not drain: {delivery.queue_depth} messages")


async def test_auth_inside_a_transaction_is_503_and_the_transaction_keeps_its_account(
    make_relay,
    upstream: Upstream,  # type: ignore[no-untyped-def]
) -> None:
    """Issue 14's case: a session bound to `office` by its network sends MAIL and RCPT, then
    AUTH as another account, more RCPTs and DATA. AUTH gets 503 5.5.1 (RFC 4954 4); every
    recipient is held and billed under office; the other account is untouched. Outside a
    transaction the same AUTH works. (Before: AUTH succeeded, the later holds were taken
    from `other` and the commit billed `office`: reserved -3 and +3 per message.)"""
    harness = make_relay(upstream.port)
    await harness.start()
    await add_account(harness, name="office", networks=("127.0.0.2/32",), password=None)
    await add_account(harness, name="other", domains=("example.org",))
    token = base64.b64encode(f"\0other\0{PASSWORD}".encode()).decode()
    client = await RawSmtp.open(harness.port, "127.0.0.2")
    assert (await client.reply()).code == 220
    assert (await client.command("EHLO client.test")).code == 250
    for round_ in range(2):
        assert (await client.command("MAIL FROM:<printer@example.com>")).code == 250
        assert (await client.command(f"RCPT TO:<a{round_}@dest.test>")).code == 250
        reply = await client.command(f"AUTH PLAIN {token}")
        assert (reply.code, reply.text) == (
            503,
            "5.5.1 AUTH not permitted during a mail transaction; send AUTH before MAIL, or RSET first",
        )
        assert [(await client.command(f"RCPT TO:<b{round_}{n}@dest.test>")).code for n in range(3)] == [250] * 3
        assert (await client.command("DATA")).code == 354
        assert (await client.command(b"Subject: hi\r\n\r\nhello\r\n.")).code == 250
    assert (await client.command("RSET")).code == 250
    assert (await client.command(f"AUTH PLAIN {token}")).code == 235  # no transaction: fine
    assert (await client.command("MAIL FROM:<app@example.org>")).code == 250
    assert (await client.command("QUIT")).code == 221
    assert harness.relay is not None
    office = await settled_usage(harness.relay.meter, "office")
    other = await settled_usage(harness.relay.meter, "other")
    assert (office.accepted, office.reserved) == (8, 0)
    assert (other.accepted, other.reserved) == (0, 0)
    await drained(harness)
    assert len(upstream.handler.delivered_to()) == 8


async def test_repeated_recipients_are_accepted_and_sent_and_counted_once(make_relay, upstream: Upstream) -> None:  # type: ignore[no-untyped-def]
    """RCPT TO the same address four times and in other letter cases: each RCPT gets 250,
    the message goes to the address once (as first spelled), the meter counts it once and
    it gets one result; a repeat does not count against the recipient limit. Every
    counted recipient ends in exactly one result (delivered, or a 550 from the upstream
    hard-bounced with its report to the sender), and nothing waits for a result.
    (Before: accepted 6, delivered 3, 3 waiting for a result forever.)"""
    upstream.handler.rcpt_replies["gone@dest.test"] = "550 5.1.1 No such user"
    harness = make_relay(upstream.port, limits={"recipients_per_message": 2})
    await harness.start()
    await add_account(harness)
    client = await connect(harness.port)
    await client.login("app", PASSWORD)
    assert (await command(client, "MAIL FROM:<app@example.com>"))[0] == 250
    repeats = ["x@dest.test"] * 4 + ["x@DEST.test", "X@Dest.Test", "gone@dest.test", "GONE@dest.test"]
    assert [(await command(client, f"RCPT TO:<{address}>"))[0] for address in repeats] == [250] * len(repeats)
    assert (await command(client, "RCPT TO:<y@dest.test>"))[0] == 452  # the third distinct one: over 2
    code, _ = await client.data(MESSAGE)
    assert code == 250
    await client.quit()
    await drained(harness)
    assert upstream.handler.delivered_to() == ["x@dest.test", "app@example.com"]  # x, then the bounce report
    assert harness.relay is not None
    usage = (await harness.relay.meter.usage("app")).usage
    assert (usage.accepted, usage.delivered, usage.hard_bounced, usage.reserved, usage.awaiting_results) == (
        2,
        1,
        1,
        0,
        0,
    )


async def test_the_null_sender_is_counted_delivered_and_never_bounced(make_relay, upstream: Upstream) -> None:  # type: ignore[no-untyped-def]
    """MAIL FROM:<> (a bounce, a DSN, an auto-reply: what a Postfix in front of the relay
    sends) from an authenticated and from a network-bound account: taken, counted and
    relayed with the null reverse-path like any email; a recipient the upstream refuses
    hard-bounces without a report (RFC 5321 4.5.5: never bounce a bounce).
    (Before: 550 5.7.1 Sender <<>> is not in the sender domains.)"""
    upstream.handler.rcpt_replies["gone@dest.test"] = "550 5.1.1 No such user"
    harness = make_relay(upstream.port)
    await harness.start()
    await add_account(harness)
    await add_account(harness, name="office", networks=("127.0.0.2/32",), password=None)
    token = base64.b64encode(f"\0app\0{PASSWORD}".encode()).decode()
    for source, login in (("127.0.0.1", [f"AUTH PLAIN {token}"]), ("127.0.0.2", [])):
        client = await RawSmtp.open(harness.port, source)
        assert (await client.reply()).code == 220
        for line in ["EHLO client.test", *login]:
            assert (await client.command(line)).code in (235, 250)
        assert (await client.command("MAIL FROM:<>")).code == 250
        assert (await client.command("RCPT TO:<ok@dest.test>")).code == 250
        assert (await client.command("RCPT TO:<gone@dest.test>")).code == 250
        assert (await client.command("DATA")).code == 354
        assert (await client.command(b"Subject: Out of office\r\n\r\nback soon\r\n.")).code == 250
        assert (await client.command("QUIT")).code == 221
    await drained(harness)
    assert [(m.mail_from, m.rcpt_tos) for m in upstream.handler.messages] == [("<>", ["ok@dest.test"])] * 2
    assert harness.relay is not None
    for name in ("app", "office"):
        usage = (await harness.relay.meter.usage(name)).usage
        assert (usage.accepted, usage.delivered, usage.hard_bounced, usage.reserved, usage.awaiting_results) == (
            2,
            1,
            1,
            0,
            0,
        ), name


async def test_oversize_message_552_and_hold_released(make_relay, upstream: Upstream) -> None:
    harness = make_relay(upstream.port, limits={"message_size": 2048})
    await harness.start()
    await add_account(harness)
    client = await connect(harness.port)
    await client.login("app", PASSWORD)
    code, _ = await command(client, "MAIL FROM:<app@example.com> SIZE=999999")
    assert code == 552  # the declared size is refused up front
    await command(client, "MAIL FROM:<app@example.com>")
    await command(client, "RCPT TO:<a@dest.test>")
    assert harness.relay is not None
    assert (await harness.relay.meter.usage("app")).usage.reserved == 1
    big = MESSAGE + (b"x" * 70 + b"\r\n") * 100
    with pytest.raises(aiosmtplib.SMTPDataError) as error:
        await client.data(big)
    assert error.value.code == 552
    await client.quit()
    assert harness.relay is not None
    usage = await settled_usage(harness.relay.meter)
    assert (usage.accepted, usage.reserved) == (0, 0)


async def test_starttls_with_a_real_certificate_then_auth(make_relay, upstream: Upstream, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import ssl

    import trustme

    authority = trustme.CA()
    server_cert = authority.issue_cert("relay.test", "127.0.0.1")
    server_cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    server_cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    harness = make_relay(
        upstream.port,
        tls={"certificate": str(tmp_path / "cert.pem"), "key": str(tmp_path / "key.pem")},
        auth={"allow_plaintext_on_loopback": False},
    )
    await harness.start()
    await add_account(harness)
    client_context = ssl.create_default_context()
    authority.configure_trust(client_context)
    client = aiosmtplib.SMTP(
        hostname="127.0.0.1", port=harness.port, start_tls=False, timeout=10, tls_context=client_context
    )
    await client.connect()
    await client.ehlo()
    assert "starttls" in client.esmtp_extensions and "auth" not in client.esmtp_extensions
    await client.starttls()
    await client.ehlo()
    assert "auth" in client.esmtp_extensions  # offered only now, inside TLS
    await client.login("app", PASSWORD)
    errors, _ = await client.sendmail("app@example.com", ["tls@dest.test"], MESSAGE)
    await client.quit()
    assert errors == {}
    await upstream.handler.wait_for(lambda: upstream.handler.delivered_to() == ["tls@dest.test"])
    assert b"with ESMTPSA id" in upstream.handler.messages[0].content


# -- DATA read in chunks (relay/smtpd.py read_data), byte for byte what aiosmtpd did ------


async def open_transaction(port: int, recipient: str = "a@dest.test") -> RawSmtp:
    """A raw session bound by network (no AUTH), up to the 354 of DATA."""
    raw = await RawSmtp.open(port)
    assert (await raw.reply()).code == 220
    assert (await raw.command("EHLO client.test")).code == 250
    assert (await raw.command("MAIL FROM:<app@example.com>")).code == 250
    assert (await raw.command(f"RCPT TO:<{recipient}>")).code == 250
    assert (await raw.command("DATA")).code == 354
    return raw


async def test_data_end_dot_stuffing_and_split_writes(make_relay, upstream: Upstream) -> None:  # type: ignore[no-untyped-def]
    harness = make_relay(upstream.port)
    await harness.start()
    await add_account(harness, networks=("127.0.0.0/8",))
    body = (
        b"Subject: dots\r\n\r\n"
        b"..a line that began with one dot\r\n"
        b"ends with a dot.\r\n"
        b"...\r\n"  # was ".." before stuffing
        b"x.\r\n"
    )
    raw = await open_transaction(harness.port)
    # The end ".\r\n" split over several writes, right after a line that ends with "."
    for piece in (body[:7], body[7:40], body[40:-1], body[-1:], b".", b"\r", b"\nQUIT\r\n"):
        await raw.send(piece)
        await asyncio.sleep(0.02)
    reply = await raw.reply()
    assert reply.code == 250, reply.text
    assert (await raw.reply()).code == 221  # the pipelined QUIT after the end was read as a command
    await upstream.handler.wait_for(lambda: len(upstream.handler.messages) == 1)
    content = upstream.handler.messages[0].content
    assert content.endswith(b"Subject: dots\r\n\r\n.a line that began with one dot\r\nends with a dot.\r\n..\r\nx.\r\n")


async def test_data_first_line_dot_ends_an_empty_message(make_relay, upstream: Upstream) -> None:  # type: ignore[no-untyped-def]
    harness = make_relay(upstream.port)
    await harness.start()
    await add_account(harness, networks=("127.0.0.0/8",))
    raw = await open_transaction(harness.port)
    reply = await raw.command(".")
    assert reply.code == 250  # an empty message is a message (RFC 5321 allows it)
    await upstream.handler.wait_for(lambda: len(upstream.handler.messages) == 1)


async def test_data_line_too_long_500_nothing_spooled_hold_released(make_relay, upstream: Upstream) -> None:  # type: ignore[no-untyped-def]
    harness = make_relay(upstream.port)
    await harness.start()
    await add_account(harness, networks=("127.0.0.0/8",))
    raw = await open_transaction(harness.port)
    await raw.send(b"Subject: long\r\n\r\n" + b"y" * 1000 + b"\r\n")
    reply = await raw.command(".")
    assert reply.code == 500 and "Line too long" in reply.text
    assert (await raw.command("RSET")).code == 250
    assert harness.relay is not None
    usage = await settled_usage(harness.relay.meter)
    assert (usage.accepted, usage.reserved) == (0, 0)
    # 998 octets and CRLF is the longest line allowed
    assert (await raw.command("MAIL FROM:<app@example.com>")).code == 250
    assert (await raw.command("RCPT TO:<a@dest.test>")).code == 250
    assert (await raw.command("DATA")).code == 354
    await raw.send(b"Subject: ok\r\n\r\n" + b"y" * 998 + b"\r\n")
    assert (await raw.command(".")).code == 250
    assert len(upstream.handler.messages) <= 1


async def test_a_large_message_arrives_intact(make_relay, upstream: Upstream) -> None:  # type: ignore[no-untyped-def]
    harness = make_relay(upstream.port, limits={"message_size": 10 * 1024 * 1024})
    await harness.start()
    await add_account(harness, networks=("127.0.0.0/8",))
    lines = [b"Subject: big\r\n", b"\r\n"]
    lines += [b"%07d " % n + (b"." if n % 7 == 0 else b"z") * 70 + b"\r\n" for n in range(60_000)]  # ~4.7 MB
    body = b"".join(lines)
    stuffed = body.replace(b"\r\n.", b"\r\n..")
    raw = await open_transaction(harness.port)
    await raw.send(stuffed)
    reply = await raw.command(".", timeout=60)
    assert reply.code == 250, reply.text
    await upstream.handler.wait_for(lambda: len(upstream.handler.messages) == 1, timeout=60)
    assert upstream.handler.messages[0].content.endswith(body)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([0, 1, 10, 997, 998, 999, 1000, 1500]), max_size=8), st.sampled_from([5, 11, 1001]))
def test_long_line_check_agrees_with_splitting(lengths: list[int], limit: int) -> None:
    raw = b"".join(b"a" * n + b"\r\n" for n in lengths)
    expected = any(n + 2 > limit for n in lengths)
    assert has_long_line(raw, limit) is expected
    assert whole_scan(raw, limit)[2] is False
    assert whole_scan(raw + b"\n", limit)[2] and whole_scan(b"\r" + raw, limit)[2]


def whole_scan(raw: bytes, limit: int) -> tuple[bytes, bool, bool]:
    """The reference: de-transparency, long line and bare CR/LF over the whole message at once."""
    lines = raw.split(b"\n")
    long_line = any(len(line) + 1 > limit for line in lines[:-1]) or len(lines[-1]) > limit
    bare = re.search(rb"\r(?!\n)|(?<!\r)\n", raw) is not None
    content = raw.replace(b"\r\n.", b"\r\n")
    return (content[1:] if content.startswith(b".") else content), long_line, bare


_DATA_ALPHABET = [b".", b"\r", b"\n", b"\r\n", b"\r\n.", b"a", b"aaaa", b"a" * 9]


@settings(max_examples=3000, deadline=None)
@given(
    st.lists(st.sampled_from(_DATA_ALPHABET), max_size=40).map(b"".join),
    st.lists(st.integers(min_value=0, max_value=200), max_size=6),
    st.sampled_from([5, 11, 1001]),
)
def test_data_scanned_in_pieces_is_the_whole_message_scanned(raw: bytes, cuts: list[int], limit: int) -> None:
    """However DATA arrives cut into pieces (a CRLF or a "\r\n." split in two, a piece
    of one octet), the pieces give exactly the whole message's content and checks."""
    bounds = sorted({min(c, len(raw)) for c in cuts} | {0, len(raw)})
    scan = DataScan(limit=limit)
    content = b"".join(scan.feed(raw[a:b]) for a, b in zip(bounds, bounds[1:]))
    expected_content, expected_long, expected_bare = whole_scan(raw, limit)
    assert scan.long_line is expected_long
    assert scan.bare_newline() is expected_bare and has_bare_newline(raw) is expected_bare
    assert content == expected_content


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.sampled_from(_DATA_ALPHABET), max_size=40).map(b"".join), st.integers(min_value=1, max_value=9))
def test_line_ends_normalized_in_pieces_as_in_one_pass(raw: bytes, piece: int) -> None:
    """Normalized a piece at a time (a CRLF never cut in two), the message is what one
    regular expression over the whole would make of it."""
    normalized = asyncio.run(crlf_line_ends(raw, piece))
    assert normalized == re.sub(rb"\r\n|\r|\n", b"\r\n", raw)
    assert not has_bare_newline(normalized)


_ADDRESS_PARTS = ["<", ">", "@", ".", " ", "a", "b", "(", ")", '"', "\t", "=", "X", "[", "]", "1", "-", "+", "ü", ":"]


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.sampled_from(_ADDRESS_PARTS), max_size=16).map("".join))
def test_fast_address_parsing_answers_exactly_as_aiosmtpd(arg: str) -> None:
    """RelaySMTP._getaddr's fast path may only ever answer what aiosmtpd's parser answers."""

    class Limits:
        local_part_limit = 0

    def outcome(parse: object) -> object:
        try:
            return parse(Limits(), arg)  # type: ignore[operator]
        except Exception as error:  # the same exception type, if any
            return type(error)

    assert outcome(RelaySMTP._getaddr) == outcome(SMTP._getaddr)


def test_fast_address_parsing_takes_the_plain_forms() -> None:
    class Limits:
        local_part_limit = 0

    for plain, expected in (
        ("<a.b+c@x-y.example>", ("a.b+c@x-y.example", "")),
        (" <A@B.C>  SIZE=10", ("A@B.C", "SIZE=10")),
        ("<a@b>\tBODY=8BITMIME", ("a@b", "BODY=8BITMIME")),
    ):
        assert RelaySMTP._getaddr(Limits(), plain) == expected == SMTP._getaddr(Limits(), plain)  # type: ignore[arg-type]


def _campaign_by_parser(message: bytes) -> str:
    """campaign_tag without its fast path: the email package's header parser on every message."""
    from email.parser import BytesHeaderParser
    from email.policy import compat32

    from mailmeter.relay.smtpd import _CAMPAIGN_TAG

    value = (
        BytesHeaderParser(policy=compat32).parsebytes(message[:65536], headersonly=True).get(CAMPAIGN_HEADER) or ""
    ).strip()
    return value if _CAMPAIGN_TAG.fullmatch(value) else ""


_HEADER_LINES = [
    b"Subject: hi",
    b"X-Mailmeter-Campaign: spring",
    b"x-mailmeter-campaign:  launch-2 ",
    b"X-MAILMETER-CAMPAIGN: bad tag!",
    b"X-Mailmeter-Campaign-Not: other",
    b" folded",
    b"",
    b"From: a@b.test",
    b"X-Mailmeter-Campaign:",
    b"body X-Mailmeter-Campaign: inbody",
]


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.sampled_from(_HEADER_LINES), max_size=7))
def test_campaign_tag_answers_as_the_header_parser(lines: list[bytes]) -> None:
    message = b"\r\n".join(lines) + b"\r\n\r\nX-Mailmeter-Campaign: body\r\n"
    assert campaign_tag(message) == _campaign_by_parser(message)


def test_campaign_tag_reads_the_header_not_the_body() -> None:
    assert campaign_tag(b"Subject: x\r\nX-Mailmeter-Campaign: spring\r\n\r\nhello\r\n") == "spring"
    assert campaign_tag(b"Subject: x\r\n\r\nX-Mailmeter-Campaign: spring\r\n") == ""
    assert campaign_tag(b"Subject: x\r\nX-Mailmeter-Campaign: not a tag\r\n\r\n") == ""
