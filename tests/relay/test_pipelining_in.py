"""PIPELINING in (RFC 2920) and ENHANCEDSTATUSCODES (RFC 2034), advertised in EHLO.

aiosmtpd reads commands one line at a time from its stream and answers each before it
reads the next, so a client that writes MAIL, RCPT x N and DATA in one packet gets one
reply per command, in order, with the refusals (a bad address, a sender outside the
account's domains, quota, the recipient limit) in the middle of the group where they
belong. These tests write whole groups in one write on a raw socket and check every
reply, its order and its enhanced status code.
"""

from __future__ import annotations

import re

from tests.conftest import RawSmtp, Reply, Upstream, add_account, settled_usage
from tests.test_pipelining import WireTap

BODY = b"From: app@example.com\r\nTo: a@dest.test\r\nSubject: pipelined\r\n\r\nhello\r\n.\r\n"
ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3} ")


async def group(raw: RawSmtp, *commands: str) -> list[Reply]:
    """Write every command in one write (one packet on loopback), then read one reply each."""
    await raw.send("".join(f"{command}\r\n" for command in commands).encode())
    return [await raw.reply() for _ in commands]


def codes(replies: list[Reply]) -> list[tuple[int, str]]:
    """(reply code, enhanced status code) of each reply ('' for the 354 prompt)."""
    found = []
    for reply in replies:
        match = ENHANCED.match(reply.text + " ")
        found.append((reply.code, match.group(0).strip() if match else ""))
    return found


async def test_a_pipelined_group_gets_every_reply_in_order_with_refusals_in_the_middle(  # type: ignore[no-untyped-def]
    make_relay, upstream: Upstream
) -> None:
    """Plan `tiny` (3 emails), a bound network (no AUTH):

    1. MAIL, two malformed RCPTs, DATA: 250, 553, 553, then 554 5.5.1 (no valid recipients).
    2. MAIL, RCPT a, a malformed one, b, c, d (over quota), e (over quota), DATA in one write:
       250, 250, 553, 250, 250, 452 4.7.1, 452 4.7.1, 354; the message goes to a, b and c.
    3. MAIL from a domain the account does not have, RCPT, DATA: 550 5.7.1, 503, 503.
    4. RSET, NOOP, QUIT: 250, 250, 221, each with its enhanced code.
    """
    harness = make_relay(upstream.port)
    await harness.start()
    await add_account(harness, plan="tiny", networks=("127.0.0.0/8",))
    raw = await RawSmtp.open(harness.port)
    try:
        assert (await raw.reply()).code == 220
        ehlo = await raw.command("EHLO client.test")
        keywords = [line[4:].decode().split()[0] for line in ehlo.lines[1:]]
        assert "PIPELINING" in keywords and "ENHANCEDSTATUSCODES" in keywords

        no_recipients = await group(
            raw, "MAIL FROM:<app@example.com>", "RCPT TO:<x@@dest.test>", "RCPT TO:<y@@dest.test>", "DATA"
        )
        assert codes(no_recipients) == [(250, "2.1.0"), (553, "5.1.3"), (553, "5.1.3"), (554, "5.5.1")]
        assert "no valid recipients" in no_recipients[-1].text
        assert (await raw.command("RSET")).code == 250

        replies = await group(
            raw,
            "MAIL FROM:<app@example.com>",
            "RCPT TO:<a@dest.test>",
            "RCPT TO:<x@@dest.test>",
            "RCPT TO:<b@dest.test>",
            "RCPT TO:<c@dest.test>",
            "RCPT TO:<d@dest.test>",
            "RCPT TO:<e@dest.test>",
            "DATA",
        )
        assert codes(replies) == [
            (250, "2.1.0"),
            (250, "2.1.5"),
            (553, "5.1.3"),
            (250, "2.1.5"),
            (250, "2.1.5"),
            (452, "4.7.1"),
            (452, "4.7.1"),
            (354, ""),
        ]
        assert "quota" in replies[5].text and "quota" in replies[6].text
        await raw.send(BODY)
        queued = await raw.reply()
        assert queued.code == 250 and queued.text.startswith("2.0.0 Ok: queued as ")

        wrong_sender = await group(raw, "MAIL FROM:<app@unknown.test>", "RCPT TO:<f@dest.test>", "DATA")
        assert codes(wrong_sender) == [(550, "5.7.1"), (503, "5.5.1"), (503, "5.5.1")]

        last = await group(raw, "RSET", "NOOP", "QUIT")
        assert codes(last) == [(250, "2.0.0"), (250, "2.0.0"), (221, "2.0.0")]
        assert await raw.closed_by_server()
    finally:
        raw.close()
    await upstream.handler.wait_for(lambda: len(upstream.handler.messages) == 1)
    assert upstream.handler.messages[0].rcpt_tos == ["a@dest.test", "b@dest.test", "c@dest.test"]
    assert harness.relay is not None
    usage = await settled_usage(harness.relay.meter)
    assert (usage.accepted, usage.reserved) == (3, 0)


async def test_sixty_pipelined_recipients_over_the_limit_each_get_their_own_reply(  # type: ignore[no-untyped-def]
    make_relay, upstream: Upstream
) -> None:
    """MAIL, 60 RCPTs (every seventh malformed, a repeated one, and past the 50-recipient
    limit) and DATA in one write: 62 replies, each the one its command should get, in order."""
    harness = make_relay(upstream.port)  # limits.recipients_per_message: 50
    await harness.start()
    await add_account(harness, networks=("127.0.0.0/8",))
    addresses = [f"<r{n}@dest.test>" if n % 7 else f"<r{n}@@dest.test>" for n in range(60)]
    addresses[30] = "<R1@dest.test>"  # the same recipient as r1 (case ignored): 250, dropped
    expected: list[tuple[int, str]] = [(250, "2.1.0")]
    taken: list[str] = []
    for address in addresses:
        if "@@" in address:
            expected.append((553, "5.1.3"))
        elif address == "<R1@dest.test>":
            expected.append((250, "2.1.5"))
        elif len(taken) >= 50:
            expected.append((452, "4.5.3"))
        else:
            taken.append(address.strip("<>"))
            expected.append((250, "2.1.5"))
    expected.append((354, ""))
    raw = await RawSmtp.open(harness.port)
    try:
        assert (await raw.reply()).code == 220
        assert (await raw.command("EHLO client.test")).code == 250
        replies = await group(
            raw, "MAIL FROM:<app@example.com>", *(f"RCPT TO:{address}" for address in addresses), "DATA"
        )
        assert codes(replies) == expected
        await raw.send(BODY)
        assert (await raw.reply()).code == 250
    finally:
        raw.close()
    await upstream.handler.wait_for(lambda: len(upstream.handler.messages) == 1)
    assert upstream.handler.messages[0].rcpt_tos == taken
    assert len(taken) == 50


async def test_every_reply_of_aiosmtpd_gets_an_enhanced_code_but_the_banner_ehlo_and_prompts(  # type: ignore[no-untyped-def]
    make_relay, upstream: Upstream
) -> None:
    """aiosmtpd's own replies (syntax, sequence, unknown command, QUIT) carry one too."""
    harness = make_relay(upstream.port)
    await harness.start()
    await add_account(harness, networks=("127.0.0.0/8",))
    raw = await RawSmtp.open(harness.port)
    try:
        banner = await raw.reply()
        assert banner.code == 220 and not ENHANCED.match(banner.text + " ")
        helo = await raw.command("HELO client.test")
        assert helo.code == 250 and not ENHANCED.match(helo.text + " ")
        replies = await group(
            raw,
            "RCPT TO:<a@dest.test>",
            "MAIL TO:<app@example.com>",
            "FROB",
            "MAIL FROM:<app@example.com>",
            "MAIL FROM:<app@example.com>",
            "VRFY",
            "DATA x",
        )
        assert codes(replies) == [
            (503, "5.5.1"),
            (501, "5.5.4"),
            (500, "5.5.2"),
            (250, "2.1.0"),
            (503, "5.5.1"),
            (501, "5.5.4"),
            (554, "5.5.1"),
        ]
    finally:
        raw.close()


async def test_the_replies_of_a_pipelined_group_go_out_together(make_relay, upstream: Upstream) -> None:  # type: ignore[no-untyped-def]
    """RFC 2920 3.2: the replies to a group go back in one write, not one packet per command.
    A WireTap between the client and the relay records each read: the 52 replies to MAIL,
    50 RCPTs and DATA arrive in at most two reads (one per command before batching)."""
    harness = make_relay(upstream.port)
    await harness.start()
    await add_account(harness, networks=("127.0.0.0/8",))
    tap = WireTap(harness.port)
    await tap.start()
    raw = await RawSmtp.open(tap.port)
    try:
        assert (await raw.reply()).code == 220
        assert (await raw.command("EHLO client.test")).code == 250
        tap.forget()
        replies = await group(
            raw, "MAIL FROM:<app@example.com>", *(f"RCPT TO:<r{n}@dest.test>" for n in range(50)), "DATA"
        )
        assert [reply.code for reply in replies] == [250] * 51 + [354]
        server_reads = [data for side, data in tap.connections[-1] if side == "server"]
        assert b"".join(server_reads).count(b"\r\n") == 52
        assert len(server_reads) <= 2, f"{len(server_reads)} reads"
        await raw.send(BODY)
        assert (await raw.reply()).code == 250
    finally:
        raw.close()
        await tap.stop()
