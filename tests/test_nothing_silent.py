"""Nothing silent (issue 17 item 7): every refused command is logged with the client and the
account, and counted in the Prometheus metrics with AUTH failures, lockouts, per-account
accepted and refused (with a bound on the accounts that get a series), and leases.

Real parts only: SMTP over sockets to a running relay, its real metrics registry.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from mailmeter.config import load_config
from mailmeter.metrics import ACCOUNT_LABELS, Metrics
from mailmeter.serve import build_relay
from tests.conftest import PASSWORD, RawSmtp, RelayHarness, Upstream, add_account, write_config
from tests.pgserver import isolated_schema, schema_url
from tests.test_abuse import FAST_LOCKOUT, plain, session


def metric(text: str, name: str, **labels: str) -> float:
    """A sample's value; 0 when the series does not exist (yet)."""
    inside = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    pattern = rf"^{re.escape(name)}{re.escape('{' + inside + '}') if labels else ''} ([0-9.e+-]+)$"
    match = re.search(pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def refusals(logs: list[dict[str, Any]]) -> list[tuple[str, str, str | None, str]]:
    return [(e["command"], e["code"], e["account"], e["client"]) for e in logs if e["event"] == "smtp.refused"]


async def test_every_refused_command_is_logged_with_client_and_account_and_counted(
    make_relay: Any, upstream: Upstream
) -> None:
    harness: RelayHarness = make_relay(
        upstream.port,
        abuse=FAST_LOCKOUT,
        plans={"small": {"email_quota": 1000}, "tiny": {"email_quota": 1}},
    )
    relay = await harness.start()
    await add_account(harness, plan="tiny")
    with capture_logs() as logs:
        anonymous = await session(harness.port)
        helped = await anonymous.command("HELP")  # aiosmtpd reads the commands' syntax: still there
        assert helped.code == 250 and "RCPT" in helped.text and "AUTH" in helped.text, helped
        assert (await anonymous.command("HELP RCPT")).text.startswith("2.0.0 Syntax: RCPT TO: <address>")
        assert (await anonymous.command("MAIL FROM:<app@example.com>")).code == 530
        assert (await anonymous.command("BOGUS")).code == 500
        assert (await anonymous.command(plain("ghost", "wrong"))).code == 535
        anonymous.close()

        client = await session(harness.port)
        assert (await client.command(plain("app", PASSWORD))).code == 235
        assert (await client.command("MAIL FROM:<app@elsewhere.test>")).code == 550
        assert (await client.command("MAIL FROM:<app@example.com>")).code == 250
        assert (await client.command("RCPT TO:<bad\x01@dest.test>")).code == 553
        assert (await client.command("RCPT TO:<one@dest.test>")).code == 250
        assert (await client.command("RCPT TO:<two@dest.test>")).code == 452  # quota of 1
        assert (await client.command("DATA")).code == 354
        assert (await client.command(b"Subject: x\r\n\r\nbare\nnewline\r\n.")).code == 500
        assert (await client.command("DATA")).code == 503  # no transaction any more
        client.close()
        for attempt in range(2):  # FAST_LOCKOUT: the third failure locks the login and the client
            assert (await (await session(harness.port)).command(plain("ghost", f"x{attempt}"))).code == 535
        locked = await session(harness.port)
        assert (await locked.command(plain("app", PASSWORD))).code == 454
        locked.close()
        await asyncio.sleep(0.1)

    seen = refusals(logs)
    client_ip = "127.0.0.1"
    assert ("MAIL", "530", None, client_ip) in seen
    assert ("-", "500", None, client_ip) in seen  # an unknown verb: before any command ran
    assert ("AUTH", "535", None, client_ip) in seen
    assert ("MAIL", "550", "app", client_ip) in seen
    assert ("RCPT", "553", "app", client_ip) in seen
    assert ("RCPT", "452", "app", client_ip) in seen
    assert ("DATA", "500", "app", client_ip) in seen
    assert ("DATA", "503", "app", client_ip) in seen
    assert ("AUTH", "454", None, client_ip) in seen
    assert all(e["reply"][:3] == e["code"] for e in logs if e["event"] == "smtp.refused")
    lockouts = [e for e in logs if e["event"] == "smtp.auth_lockout"]
    assert {e["scope"] for e in lockouts} == {"client", "login"} and all(e["client"] == client_ip for e in lockouts)

    text = relay.metrics.render().decode()
    assert metric(text, "mailmeter_smtp_refused_total", command="MAIL", code="530") == 1
    assert metric(text, "mailmeter_smtp_refused_total", command="RCPT", code="452") == 1
    assert metric(text, "mailmeter_smtp_refused_total", command="AUTH", code="535") == 3
    assert metric(text, "mailmeter_smtp_auth_total", result="failed") == 3
    assert metric(text, "mailmeter_smtp_auth_total", result="ok") == 1
    assert metric(text, "mailmeter_smtp_auth_total", result="locked") == 1
    assert metric(text, "mailmeter_smtp_auth_lockouts_total", scope="client") == 1
    assert metric(text, "mailmeter_smtp_auth_lockouts_total", scope="login") == 1
    assert metric(text, "mailmeter_account_refused_total", account="app", command="RCPT") == 2
    assert metric(text, "mailmeter_account_refused_total", account="app", command="DATA") == 2
    assert "mailmeter_leases_open" not in text  # SQLite: no leases


async def test_per_account_series_are_bounded(make_relay: Any, upstream: Upstream) -> None:
    """The first ACCOUNT_LABELS accounts get their own series; the others count as `other`."""
    harness: RelayHarness = make_relay(upstream.port)
    relay = await harness.start()
    await add_account(harness)
    metrics: Metrics = relay.metrics
    for n in range(ACCOUNT_LABELS + 20):  # as many accounts as a large relay may see
        metrics.accepted(1, f"acct{n}")
        metrics.refused("RCPT", "452", f"acct{n}")
    metrics.refused("XYZZY", "5??", None)  # a bogus verb and code cannot make new series either
    client = await session(harness.port)
    assert (await client.command(plain("app", PASSWORD))).code == 235
    assert (await client.command("MAIL FROM:<app@example.com>")).code == 250
    assert (await client.command("RCPT TO:<r@dest.test>")).code == 250
    assert (await client.command("DATA")).code == 354
    assert (await client.command(b"Subject: x\r\n\r\nx\r\n.")).code == 250
    client.close()
    text = metrics.render().decode()
    accepted = re.findall(r'^mailmeter_account_recipients_accepted_total\{account="([^"]+)"\}', text, re.MULTILINE)
    assert len(accepted) == ACCOUNT_LABELS + 1 and "other" in accepted
    assert metric(text, "mailmeter_account_recipients_accepted_total", account="other") == 21  # 20 + app
    assert metric(text, "mailmeter_account_recipients_accepted_total", account="acct7") == 1
    assert metric(text, "mailmeter_account_refused_total", account="other", command="RCPT") == 20
    assert metric(text, "mailmeter_smtp_refused_total", command="other", code="other") == 1


@pytest.fixture
async def pg_schema() -> AsyncIterator[str]:
    async with isolated_schema() as name:
        yield name


async def test_lease_metrics_on_postgresql(tmp_path: Path, upstream: Upstream, pg_schema: str) -> None:
    path = write_config(
        tmp_path,
        upstream.port,
        database={"url": schema_url(pg_schema), "lease_emails": 20, "lease_seconds": 30},
    )
    relay = build_relay(load_config(path))
    await relay.start()
    try:
        await relay.meter.add_account("app", PASSWORD, "small", ["example.com"], [])
        text = relay.metrics.render().decode()
        assert metric(text, "mailmeter_leases_open") == 0 and metric(text, "mailmeter_lease_renewals_total") == 0
        client = await RawSmtp.open(relay.port)
        assert (await client.reply()).code == 220
        assert (await client.command("EHLO client.test")).code == 250
        assert (await client.command(plain("app", PASSWORD))).code == 235
        assert (await client.command("MAIL FROM:<app@example.com>")).code == 250
        for n in range(3):
            assert (await client.command(f"RCPT TO:<r{n}@dest.test>")).code == 250
        text = relay.metrics.render().decode()
        assert metric(text, "mailmeter_leases_open") == 1
        assert metric(text, "mailmeter_lease_emails", state="carved") == 3
        assert metric(text, "mailmeter_lease_emails", state="free") >= 1
        assert metric(text, "mailmeter_lease_renewals_total") >= 1
        client.close()
    finally:
        await relay.stop()
