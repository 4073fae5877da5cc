"""Prometheus metrics move with real traffic through a real relay."""

from __future__ import annotations

import asyncio
import re

import aiosmtplib

from tests.conftest import PASSWORD, RelayHarness, Upstream, add_account


def value(text: str, name: str, labels: str = "") -> float:
    match = re.search(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match, f"{name}{labels} not in metrics"
    return float(match.group(1))


async def test_metrics_count_sessions_transactions_results_and_meter_latency(make_relay, upstream: Upstream) -> None:  # type: ignore[no-untyped-def]
    harness: RelayHarness = make_relay(upstream.port, plans={"tiny": {"email_quota": 3}})
    await harness.start()
    await add_account(harness, plan="tiny")
    upstream.handler.rcpt_replies["gone@dest.test"] = "550 5.1.1 No such user"
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=harness.port, start_tls=False, timeout=10)
    await client.connect()
    await client.login("app", PASSWORD)
    await client.sendmail("app@example.com", ["a@dest.test", "gone@dest.test"], b"Subject: x\r\n\r\nx\r\n")
    await client.sendmail("app@example.com", ["b@dest.test"], b"Subject: y\r\n\r\ny\r\n")
    try:
        await client.sendmail("app@example.com", ["c@dest.test"], b"Subject: z\r\n\r\nz\r\n")
    except aiosmtplib.SMTPSenderRefused:
        pass  # the quota of 3 is used up: 451 at MAIL
    await client.quit()
    await upstream.handler.wait_for(lambda: len(upstream.handler.messages) >= 3)  # 2 messages and the DSN
    assert harness.relay is not None
    metrics = harness.relay.metrics
    for _ in range(100):
        text = metrics.render().decode()
        if value(text, "mailmeter_queue_depth") == 0:
            break
        await asyncio.sleep(0.05)
    assert value(text, "mailmeter_smtp_sessions_total") == 1
    assert value(text, "mailmeter_smtp_sessions_open") == 0
    assert value(text, "mailmeter_smtp_transactions_total", '{reason="accepted",reply_class="2xx"}') == 2
    assert value(text, "mailmeter_smtp_transactions_total", '{reason="quota_exhausted",reply_class="4xx"}') == 1
    assert value(text, "mailmeter_emails_accepted_total") == 3
    assert value(text, "mailmeter_delivery_results_total", '{result="delivered"}') == 3  # 2 + the bounce
    assert value(text, "mailmeter_delivery_results_total", '{result="hard_bounced"}') == 1
    assert value(text, "mailmeter_meter_seconds_count", '{operation="reserve"}') == 3
    assert value(text, "mailmeter_meter_seconds_count", '{operation="commit"}') == 2
    assert value(text, "mailmeter_queue_depth") == 0
    assert value(text, "mailmeter_queue_oldest_seconds") == 0
