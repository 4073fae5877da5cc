"""Per-account sending rates (issue 17 item 5): enforced at RCPT with 451 4.7.1 and when to retry,
exact across the processes sharing an SQLite store and across nodes sharing PostgreSQL.

Real parts only: SMTP over sockets, SQLite files, `mailmeter serve` processes, the PostgreSQL
server of tests/pgserver.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timezone
from pathlib import Path

import aiosmtplib
import pytest

from mailmeter.config import load_config
from mailmeter.node import Relay
from mailmeter.policies.plans import parse_plan
from mailmeter.policies.rate import RateError, SendRate, check_account_rate, parse_rate
from mailmeter.serve import build_relay
from tests.conftest import PASSWORD, RawSmtp, RelayHarness, Upstream, add_account, free_port, write_config
from tests.mailmeter.test_api import NEW_ACCOUNT, Api, start_api  # noqa: F401 (a fixture)
from tests.mailmeter.test_cli_and_service import add, mailmeter
from tests.mailmeter.test_service_signals import launch
from tests.pgserver import isolated_schema, scalar, schema_url


class Clock:
    """The meter's clock, moved by the test (the windows are cut from it)."""

    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at


async def session(port: int) -> RawSmtp:
    smtp = await RawSmtp.open(port)
    assert (await smtp.reply()).code == 220
    assert (await smtp.command("EHLO client.test")).code == 250
    token = base64.b64encode(f"\0app\0{PASSWORD}".encode()).decode()
    assert (await smtp.command(f"AUTH PLAIN {token}")).code == 235
    assert (await smtp.command("MAIL FROM:<app@example.com>")).code == 250
    return smtp


def test_rates_parse_and_windows_are_aligned() -> None:
    assert parse_rate("100/minute") == SendRate(100, "minute")
    assert str(parse_rate(" 10000 / hours ")) == "10000/hour"
    for bad in ("100", "0/minute", "-1/minute", "1.5/hour", "100/week", "many/day", ""):
        with pytest.raises(RateError, match="100/minute"):
            parse_rate(bad)
    assert check_account_rate("NONE") == "none" and check_account_rate("unlimited") == "unlimited"
    minute = SendRate(100, "minute")
    assert minute.window_start(120.5) == 120 and minute.retry_after(168.0) == 12
    assert minute.retry_after(179.9) == 1  # never "retry after 0 s"
    assert SendRate(5, "day").window_start(86400 * 3 + 7) == 86400 * 3
    plan = parse_plan("p", {"email_quota": 10, "sending_rate": "10000/hour"})
    assert plan.sending_rate == SendRate(10000, "hour")
    with pytest.raises(ValueError, match=r"plans\.p\.sending_rate"):
        parse_plan("p", {"sending_rate": "fast"})


async def test_n_recipients_then_451_with_when_to_retry_then_accepted_after_the_window(
    make_relay: object, upstream: Upstream
) -> None:
    harness: RelayHarness = make_relay(
        upstream.port, plans={"small": {"email_quota": 1000, "sending_rate": "5/minute"}}
    )  # type: ignore[operator]
    relay = await harness.start()
    await add_account(harness)
    clock = Clock(datetime(2026, 3, 4, 10, 20, 48, tzinfo=timezone.utc))  # 12 s before the minute ends
    relay.meter.clock = clock
    smtp = await session(harness.port)
    for n in range(5):
        assert (await smtp.command(f"RCPT TO:<r{n}@dest.test>")).code == 250
    refused = await smtp.command("RCPT TO:<r5@dest.test>")
    assert refused.code == 451
    assert refused.text == "4.7.1 Sending rate 5/minute reached for account app; retry after 12 s"
    # The message with the five recipients the rate let through is accepted and counted.
    assert (await smtp.command("DATA")).code == 354
    assert (await smtp.command(b"Subject: rate\r\n\r\nhello\r\n.")).code == 250
    assert (await relay.meter.usage("app")).usage.accepted == 5
    # A released hold does not give its recipients back: the window stays full.
    assert (await smtp.command("MAIL FROM:<app@example.com>")).code == 250
    assert (await smtp.command("RCPT TO:<late@dest.test>")).code == 451
    assert (await smtp.command("RSET")).code == 250
    clock.at = datetime(2026, 3, 4, 10, 21, 0, tzinfo=timezone.utc)  # the next window
    assert (await smtp.command("MAIL FROM:<app@example.com>")).code == 250
    assert (await smtp.command("RCPT TO:<r6@dest.test>")).code == 250
    smtp.close()


async def test_an_accounts_own_rate_overrides_its_plans_live(make_relay: object, upstream: Upstream) -> None:
    harness: RelayHarness = make_relay(upstream.port, plans={"small": {"email_quota": 1000, "sending_rate": "2/hour"}})  # type: ignore[operator]
    relay = await harness.start()
    await add_account(harness)
    relay.meter.clock = Clock(datetime(2026, 3, 4, 10, 30, 0, tzinfo=timezone.utc))
    await relay.meter.set_sending_rate("app", "3/hour")
    smtp = await session(harness.port)
    for n in range(3):
        assert (await smtp.command(f"RCPT TO:<r{n}@dest.test>")).code == 250
    reply = await smtp.command("RCPT TO:<r3@dest.test>")
    assert (reply.code, reply.text) == (451, "4.7.1 Sending rate 3/hour reached for account app; retry after 1800 s")
    await relay.meter.set_sending_rate("app", "unlimited")  # no rate, though the plan has one
    assert (await smtp.command("RCPT TO:<r3@dest.test>")).code == 250
    await relay.meter.set_sending_rate("app", "none")  # the plan's 2/hour again: 4 taken already
    assert (await smtp.command("RCPT TO:<r4@dest.test>")).code == 451
    smtp.close()


async def test_real_time_window_lets_the_client_in_again(make_relay: object, upstream: Upstream) -> None:
    """No clock of the test's: 3/second, the fourth refused, accepted again a second later."""
    harness: RelayHarness = make_relay(
        upstream.port, plans={"small": {"email_quota": 1000, "sending_rate": "3/second"}}
    )  # type: ignore[operator]
    await harness.start()
    await add_account(harness)
    smtp = await session(harness.port)
    while True:
        await asyncio.sleep(1 - time.time() % 1 + 0.01)  # just after a second starts
        window = int(time.time())
        codes = [(await smtp.command(f"RCPT TO:<r{n}@dest.test>")).code for n in range(4)]
        if int(time.time()) == window:  # the four RCPTs fell in one window (else: again)
            break
        await smtp.command("RSET")
        await smtp.command("MAIL FROM:<app@example.com>")
    assert codes == [250, 250, 250, 451]
    await asyncio.sleep(1.05)
    assert (await smtp.command("RCPT TO:<r9@dest.test>")).code == 250
    smtp.close()


def _avoid_the_hour_boundary() -> None:
    """The rate tests with /hour windows must not straddle one: wait for the next hour if it is close."""
    left = 3600 - time.time() % 3600
    if left < 60:
        time.sleep(left + 0.5)


async def _send_all(port: int, messages: int) -> int:
    async def send(n: int) -> int:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=20)
        try:
            await client.connect()
            await client.login("app", PASSWORD)
            errors, _ = await client.sendmail("app@example.com", [f"r{n}@dest.test"], b"Subject: x\r\n\r\nx\r\n")
            return 0 if errors else 1
        except aiosmtplib.SMTPRecipientsRefused as refused:
            code, text = refused.recipients[0].code, refused.recipients[0].message
            assert code == 451 and "Sending rate 25/hour reached for account app; retry after" in text, (code, text)
            return 0
        finally:
            client.close()

    return sum(await asyncio.gather(*(send(n) for n in range(messages))))


async def test_two_processes_sharing_the_store_never_pass_the_rate(tmp_path: Path, upstream: Upstream) -> None:
    _avoid_the_hour_boundary()
    port = free_port()
    config = write_config(
        tmp_path,
        upstream.port,
        log={"level": "info"},
        plans={"small": {"email_quota": 1000, "sending_rate": "25/hour"}},
        listen={"address": "127.0.0.1", "port": port, "processes": 2},
    )
    assert add(config).returncode == 0
    svc = await launch(config, tmp_path)
    try:
        assert {(await svc.event("relay.started"))["node"] for _ in range(2)} == {"test-node", "test-node.1"}
        assert await _send_all(port, 60) == 25  # 60 sessions over two processes for 25 an hour: exactly 25
        await upstream.handler.wait_for(lambda: len(upstream.handler.delivered_to()) == 25)
        nodes = {e["node"] for e in svc.events if e.get("event") == "relay.started"}
        assert nodes == {"test-node", "test-node.1"}
        usage = mailmeter(config, "usage", "app", "--json")
        assert '"accepted": 25' in usage.stdout
    finally:
        try:
            os.killpg(svc.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        await svc.process.wait()
        svc.notify.close()


@pytest.fixture
async def pg_schema() -> AsyncIterator[str]:
    async with isolated_schema() as name:
        yield name


async def test_two_leasing_nodes_on_postgresql_never_pass_the_rate(
    tmp_path: Path, upstream: Upstream, pg_schema: str
) -> None:
    """Leasing on (50 emails a lease): an account with a rate is decided in the database per
    recipient, under its row lock, so two nodes together take exactly the rate."""
    _avoid_the_hour_boundary()
    relays: list[Relay] = []
    try:
        for node in ("n1", "n2"):
            directory = tmp_path / node
            directory.mkdir()
            path = write_config(
                directory,
                upstream.port,
                node={"name": node, "region": "test"},
                database={"url": schema_url(pg_schema), "lease_emails": 50, "lease_seconds": 1.0},
                plans={"small": {"email_quota": 1000, "sending_rate": "25/hour"}},
            )
            relay = build_relay(load_config(path))
            await relay.start()
            relays.append(relay)
        await relays[0].meter.add_account("app", PASSWORD, "small", ["example.com"], [])
        accepted = await asyncio.gather(*(_send_all(relay.port, 30) for relay in relays))
        assert sum(accepted) == 25 and all(n > 0 for n in accepted), accepted
        assert await scalar(pg_schema, "SELECT SUM(accepted) FROM period_usage") == 25
        assert await scalar(pg_schema, "SELECT SUM(recipients) FROM rate_windows") == 25
        # An account without a rate still leases (one database round trip per block, not per RCPT).
        await relays[0].meter.set_sending_rate("app", "unlimited")
        await asyncio.sleep(2.1)  # RATES_TTL: every node sees it
        renewals = relays[1].meter.leases.renewals if relays[1].meter.leases else 0
        assert await _send_all(relays[1].port, 10) == 10
        assert relays[1].meter.leases is not None and relays[1].meter.leases.renewals > renewals
    finally:
        for relay in relays:
            await relay.stop()


async def test_the_rate_is_set_by_the_api_and_the_cli_and_audited(
    start_api: Callable[..., Awaitable[Api]],  # noqa: F811 (the fixture imported above)
) -> None:
    api: Api = await start_api()
    await api.call("POST", "/v1/accounts", NEW_ACCOUNT)
    status, rate = await api.call("GET", "/v1/accounts/app/rate")
    assert status == 200 and (rate["account_rate"], rate["rate"]) == (None, None)
    status, rate = await api.call("PUT", "/v1/accounts/app/rate", {"rate": "100/Minute"})
    assert status == 200 and rate == {
        "account": "app",
        "account_rate": "100/minute",
        "plan": NEW_ACCOUNT["plan"],
        "plan_rate": None,
        "rate": "100/minute",
    }
    for bad, code in (({"rate": "fast"}, 400), ({"rate": 100}, 400), ({}, 400), ({"rate": "1/day", "x": 1}, 400)):
        status, body = await api.call("PUT", "/v1/accounts/app/rate", bad)
        assert status == code and body["error"].startswith(("rate:", "x:")), (bad, body)
    assert (await api.call("PUT", "/v1/accounts/ghost/rate", {"rate": "1/day"}))[0] == 404
    status, (event,) = await api.call("GET", "/v1/audit?account=app&limit=1")
    assert event["action"] == "account.rate" and event["changes"]["sending_rate"] == [None, "100/minute"]
    assert event["actor"] == "ops"

    config = api.harness.directory / "config.yaml"
    cli = await asyncio.to_thread(mailmeter, config, "account", "rate", "app", "unlimited")
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.strip() == "account app: sending rate unlimited (own setting: unlimited)"
    cli = await asyncio.to_thread(mailmeter, config, "account", "rate", "app", "none")
    assert cli.stdout.strip() == "account app: sending rate unlimited (own setting: none (the plan's: no rate))"
    cli = await asyncio.to_thread(mailmeter, config, "account", "rate", "app", "10/fortnight")
    assert cli.returncode == 2 and "write it like 100/minute" in cli.stderr
    status, events = await api.call("GET", "/v1/audit?account=app&limit=2")
    assert [e["changes"]["sending_rate"] for e in events] == [["unlimited", None], ["100/minute", "unlimited"]]
    status, account = await api.call("GET", "/v1/accounts/app")
    assert account["sending_rate"] is None
    await asyncio.to_thread(mailmeter, config, "account", "rate", "app", "50/day")
    shown = await asyncio.to_thread(mailmeter, config, "account", "rate", "app", "--json")  # no RATE: show it
    assert shown.returncode == 0 and json.loads(shown.stdout)["rate"] == "50/day"
    ghost = await asyncio.to_thread(mailmeter, config, "account", "rate", "ghost", "1/day")
    assert ghost.returncode == 1 and "no account named 'ghost'" in ghost.stderr
