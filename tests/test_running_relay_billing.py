"""The running relay closes periods by itself and applies a reloaded upstream."""

from __future__ import annotations

import asyncio
import json
from datetime import date, datetime, timezone

import aiosmtplib

from mailmeter.config import load_config
from tests.conftest import PASSWORD, RelayHarness, Upstream, UpstreamHandler, add_account, free_port, write_config


async def test_the_running_relay_closes_ended_periods_and_catches_up(make_relay, upstream: Upstream) -> None:  # type: ignore[no-untyped-def]
    harness: RelayHarness = make_relay(upstream.port, billing={"interval": 0.1})
    await harness.start()
    assert harness.relay is not None
    # An account subscribed months ago: its ended periods were never closed (downtime).
    await harness.relay.meter.add_account(
        "app", PASSWORD, "small", ["example.com"], [], subscribed_on=date(2026, 1, 15)
    )
    account = await harness.relay.meter.account("app")
    # Every ended month up to today's: the catch-up closes them one after another.
    today = datetime.now(timezone.utc)
    ended = (today.year - 2026) * 12 + today.month - 1
    for _ in range(200):
        invoices = await harness.relay.store.invoices(account.id)
        if len(invoices) >= ended:
            break
        await asyncio.sleep(0.05)
    months = [json.loads(i.body)["period_month"] for i in invoices]
    assert months == [f"{2026 + m // 12}-{m % 12 + 1:02d}" for m in range(ended)]  # in order, no CLI involved
    await asyncio.sleep(0.3)  # more passes: nothing is closed twice
    assert len(await harness.relay.store.invoices(account.id)) == len(invoices)


async def test_reload_switches_delivery_to_the_new_upstream(make_relay, upstream: Upstream) -> None:  # type: ignore[no-untyped-def]
    harness: RelayHarness = make_relay(upstream.port)
    relay_ = await harness.start()
    await add_account(harness)
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=harness.port, start_tls=False, timeout=10)
    await client.connect()
    await client.login("app", PASSWORD)
    await client.sendmail("app@example.com", ["old@dest.test"], b"Subject: 1\r\n\r\nx\r\n")
    await upstream.handler.wait_for(lambda: upstream.handler.delivered_to() == ["old@dest.test"])
    second = Upstream(port=free_port(), handler=UpstreamHandler())
    await second.start()
    try:
        await relay_.reload(load_config(write_config(harness.directory, second.port)))
        # The same session goes on; its next message goes to the new upstream.
        await client.sendmail("app@example.com", ["new@dest.test"], b"Subject: 2\r\n\r\nx\r\n")
        await client.quit()
        await second.handler.wait_for(lambda: second.handler.delivered_to() == ["new@dest.test"])
        assert upstream.handler.delivered_to() == ["old@dest.test"]
    finally:
        await second.stop()
