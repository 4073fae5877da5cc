"""Several listeners in one node (relay/smtpd.py Listener, mailmeter/node.py): plain SMTP,
submission with STARTTLS required before AUTH (RFC 6409, 8314), implicit TLS (RFC 8314),
each with its own AUTH policy. Real TLS (a trustme CA) over loopback sockets, with the
standard library's smtplib (run in a thread: the relay shares the test's event loop)."""

from __future__ import annotations

import asyncio
import smtplib
import ssl
from pathlib import Path
from typing import Any

import pytest
import trustme

from mailmeter.config import ConfigError, load_config
from tests.conftest import PASSWORD, RawSmtp, RelayHarness, Upstream, add_account, write_config

MESSAGE = b"From: app@example.com\r\nTo: x@dest.test\r\nSubject: listeners\r\n\r\nhello\r\n"


@pytest.fixture
def authority(tmp_path: Path) -> trustme.CA:
    ca = trustme.CA()
    cert = ca.issue_cert("relay.test", "127.0.0.1")
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    return ca


def client_context(authority: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    authority.configure_trust(context)
    return context


def tls_files(tmp_path: Path) -> dict[str, str]:
    return {"certificate": str(tmp_path / "cert.pem"), "key": str(tmp_path / "key.pem")}


async def three_listeners(make_relay: Any, upstream: Upstream, tmp_path: Path, **extra: Any) -> RelayHarness:
    """smtp (plaintext AUTH on loopback allowed, as the test config says), submission and smtps."""
    harness: RelayHarness = make_relay(
        upstream.port,
        tls=tls_files(tmp_path),
        listen=[
            {"address": "127.0.0.1", "port": 0},
            {"address": "127.0.0.1", "port": 0, "mode": "submission", "auth": "required"},
            {"address": "127.0.0.1", "port": 0, "mode": "smtps", "auth": "required"},
        ],
        **extra,
    )
    await harness.start()
    await add_account(harness, networks=("127.0.0.0/8",))
    return harness


def ports(harness: RelayHarness) -> list[int]:
    assert harness.relay is not None
    return harness.relay.ports


async def test_submission_requires_starttls_before_auth_and_mail(  # type: ignore[no-untyped-def]
    make_relay, upstream: Upstream, tmp_path: Path, authority: trustme.CA
) -> None:
    """Port 587's rules on loopback, where the plain listener would take plaintext AUTH:
    before STARTTLS only STARTTLS is offered, and AUTH, MAIL and RCPT get 530; a client
    from a bound network must still AUTH (auth: required). After STARTTLS: AUTH, then mail."""
    harness = await three_listeners(make_relay, upstream, tmp_path)
    submission = ports(harness)[1]

    def session() -> tuple[list[Any], dict[str, str], tuple[int, bytes]]:
        seen: list[Any] = []
        with smtplib.SMTP("127.0.0.1", submission, timeout=10) as client:
            client.ehlo("client.test")
            seen.append(sorted(client.esmtp_features))
            seen.append(client.docmd("AUTH", "PLAIN AGFwcABjb3JyZWN0IGhvcnNlIGJhdHRlcnkgc3RhcGxl"))
            seen.append(client.docmd("MAIL", "FROM:<app@example.com>"))
            client.starttls(context=client_context(authority))
            client.ehlo("client.test")
            seen.append(sorted(client.esmtp_features))
            seen.append(client.docmd("MAIL", "FROM:<app@example.com>"))  # bound network: not enough here
            client.docmd("RSET")
            client.login("app", PASSWORD)
            refused = client.sendmail("app@example.com", ["sub@dest.test"], MESSAGE)
            return seen, refused, client.noop()

    seen, refused, noop = await asyncio.to_thread(session)
    before, auth_plain, mail_plain, after, mail_unauthenticated = seen
    assert "starttls" in before and "auth" not in before
    assert auth_plain[0] == 530 and mail_plain[0] == 530
    assert b"STARTTLS" in mail_plain[1]
    assert "auth" in after and "starttls" not in after
    assert mail_unauthenticated[0] == 530
    assert refused == {} and noop[0] == 250
    await upstream.handler.wait_for(lambda: upstream.handler.delivered_to() == ["sub@dest.test"])
    assert b"with ESMTPSA id" in upstream.handler.messages[0].content


async def test_smtps_is_tls_from_the_first_byte(  # type: ignore[no-untyped-def]
    make_relay, upstream: Upstream, tmp_path: Path, authority: trustme.CA
) -> None:
    """Port 465 (RFC 8314): SMTP_SSL gets the banner inside TLS, EHLO offers AUTH and no
    STARTTLS, the message goes through with ESMTPSA; a plaintext client gets no banner."""
    harness = await three_listeners(make_relay, upstream, tmp_path)
    smtps = ports(harness)[2]

    def session() -> tuple[list[str], str, dict[str, str]]:
        with smtplib.SMTP_SSL("127.0.0.1", smtps, timeout=10, context=client_context(authority)) as client:
            client.ehlo("client.test")
            features = sorted(client.esmtp_features)
            version = client.sock.version() if isinstance(client.sock, ssl.SSLSocket) else ""
            client.login("app", PASSWORD)
            return features, version or "", client.sendmail("app@example.com", ["tls@dest.test"], MESSAGE)

    features, version, refused = await asyncio.to_thread(session)
    assert "auth" in features and "starttls" not in features
    assert version.startswith("TLSv1.")
    assert refused == {}
    await upstream.handler.wait_for(lambda: upstream.handler.delivered_to() == ["tls@dest.test"])
    assert b"with ESMTPSA id" in upstream.handler.messages[0].content
    raw = await RawSmtp.open(smtps)
    try:
        with pytest.raises((TimeoutError, asyncio.IncompleteReadError, ConnectionError)):
            await raw.reply(timeout=0.5)  # the server waits for a ClientHello, never says 220
    finally:
        raw.close()


async def test_the_plain_listener_keeps_todays_rules(  # type: ignore[no-untyped-def]
    make_relay, upstream: Upstream, tmp_path: Path, authority: trustme.CA
) -> None:
    """The first listener (mode smtp, auth optional) beside the others: a bound network
    sends without AUTH, plaintext AUTH works on loopback, STARTTLS is offered."""
    harness = await three_listeners(make_relay, upstream, tmp_path)
    plain = ports(harness)[0]
    assert plain == harness.port

    def session() -> tuple[list[str], dict[str, str], dict[str, str]]:
        with smtplib.SMTP("127.0.0.1", plain, timeout=10) as client:
            client.ehlo("client.test")
            features = sorted(client.esmtp_features)
            by_network = client.sendmail("app@example.com", ["net@dest.test"], MESSAGE)
            client.login("app", PASSWORD)
            by_auth = client.sendmail("app@example.com", ["auth@dest.test"], MESSAGE)
            return features, by_network, by_auth

    features, by_network, by_auth = await asyncio.to_thread(session)
    assert "starttls" in features and "auth" in features
    assert by_network == {} and by_auth == {}
    await upstream.handler.wait_for(
        lambda: sorted(upstream.handler.delivered_to()) == ["auth@dest.test", "net@dest.test"]
    )


async def test_auth_none_takes_bound_networks_only(make_relay, upstream: Upstream) -> None:  # type: ignore[no-untyped-def]
    """A listener with auth: none offers no AUTH (502 if tried); a client from a bound
    network sends; any other client gets 550 5.7.1 at MAIL: no open relay."""
    harness = make_relay(upstream.port, listen={"address": "127.0.0.1", "port": 0, "auth": "none"})
    await harness.start()
    await add_account(harness, name="office", networks=("127.0.0.2/32",), password=None)
    await add_account(harness)
    bound = await RawSmtp.open(harness.port, source="127.0.0.2")
    other = await RawSmtp.open(harness.port, source="127.0.0.3")
    try:
        for raw in (bound, other):
            assert (await raw.reply()).code == 220
            ehlo = await raw.command("EHLO client.test")
            assert ehlo.code == 250 and "AUTH" not in ehlo.text.upper()
        auth = await other.command("AUTH PLAIN AGFwcABjb3JyZWN0IGhvcnNlIGJhdHRlcnkgc3RhcGxl")
        assert (auth.code, auth.text[:5]) == (502, "5.5.1")
        refused = await other.command("MAIL FROM:<app@example.com>")
        assert refused.code == 550 and refused.text.startswith("5.7.1 Relay access denied")
        assert (await bound.command("MAIL FROM:<app@example.com>")).code == 250
        assert (await bound.command("RCPT TO:<office@dest.test>")).code == 250
        assert (await bound.command("DATA")).code == 354
        accepted = await bound.command(MESSAGE + b".")
        assert accepted.code == 250
    finally:
        bound.close()
        other.close()
    await upstream.handler.wait_for(lambda: upstream.handler.delivered_to() == ["office@dest.test"])


def test_listen_is_one_mapping_or_a_list(tmp_path: Path) -> None:
    """The old single-listener form and config.example.yaml still load; the list form's
    mistakes are named by their key."""
    (tmp_path / "cert.pem").write_text("x")
    (tmp_path / "key.pem").write_text("x")
    single = load_config(write_config(tmp_path, 2526, listen={"address": "127.0.0.1", "port": 2525}))
    assert [(listen.address, listen.port, listen.mode, listen.auth) for listen in single.listen] == [
        ("127.0.0.1", 2525, "smtp", "optional")
    ]
    example = load_config(Path(__file__).resolve().parents[2] / "config.example.yaml")
    assert [(listen.mode, listen.port) for listen in example.listen] == [("smtp", 2525)]
    several = load_config(
        write_config(
            tmp_path,
            2526,
            tls=tls_files(tmp_path),
            listen=[
                {"address": "127.0.0.1", "port": 2525, "processes": 2},
                {"address": "127.0.0.1", "port": 2587, "mode": "submission", "auth": "required"},
                {"address": "127.0.0.1", "port": 2465, "mode": "smtps"},
            ],
        )
    )
    assert several.processes == 2
    assert [listen.label() for listen in several.listen] == [
        "smtp 127.0.0.1:2525",
        "submission 127.0.0.1:2587",
        "smtps 127.0.0.1:2465",
    ]
    cases = [
        ([{"port": 2525}, {"port": 2587, "mode": "submission"}], {}, "listen.1.mode: submission needs TLS"),
        ({"port": 2465, "mode": "smtps"}, {}, "listen.mode: smtps needs TLS"),
        ([{"port": 2525}, {"port": 2525}], {}, "listen.1: 127.0.0.1:2525 is listed twice"),
        ([{"port": 2525}, {"port": 2526, "processes": 3}], {}, "listen.1.processes: .* first listener only"),
        ([{"port": 2525, "processes": 2}, {"port": 0}], {}, "listen.1.processes: several processes share one port"),
        ({"port": 2525, "mode": "lmtp"}, {}, "listen.mode: Input should be"),
        ([{"port": 2525}, {"port": 2526, "auth": "sometimes"}], {}, "listen.1.auth: Input should be"),
        ([], {}, "listen: list at least one listener"),
        (
            [{"port": 2525}, {"address": "0.0.0.0", "port": 2587, "auth": "required"}],
            {},
            "listen.1.auth: required, but AUTH is offered only inside TLS",
        ),
        (
            [{"address": "0.0.0.0", "port": 25}, {"address": "::", "port": 25}],
            {},
            "auth.allow_plaintext_on_loopback: the relay listens on 0.0.0.0, ::",
        ),
    ]
    for listen, extra, message in cases:
        with pytest.raises(ConfigError, match=message):
            load_config(write_config(tmp_path, 2526, listen=listen, **extra))
