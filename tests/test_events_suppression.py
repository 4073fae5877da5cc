"""Suppression and events end to end: real SMTP in and out, a real upstream that answers
`550 5.1.1`, a real aiohttp receiver for the webhooks, the real SQLite meter.

- a recipient that hard-bounced as "does not exist" is refused at the next RCPT with
  550 5.1.1, nothing held or counted; removed, it is accepted again (in the same open
  session); a plan with `suppression: false` does not suppress;
- an account's webhook gets signed delivered and bounced events; a failing receiver gets
  retries with a growing delay, and the delivery log shows every attempt.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from typing import Any

import aiosmtplib
import pytest
from aiohttp import web

from mailmeter.events import SIGNATURE_HEADER, EventSender, EventSettings, verify_event_signature
from mailmeter.metering.billing import Billing
from mailmeter.metering.gateway import NoGateway
from mailmeter.metering.meter import Meter
from mailmeter.metering.store import Store
from mailmeter.policies import parse_plans
from mailmeter.service import AdminService
from tests.conftest import PASSWORD, RelayHarness, Upstream, add_account, free_port, settled_usage
from tests.metering.test_billing_meter import Clock, store  # noqa: F401 (the fixture: SQLite, PostgreSQL)
from tests.pgserver import isolated_schema, schema_url

BOUNCING = "nobody@dest.test"
GOOD = "someone@dest.test"
NOT_EXIST = "550 5.1.1 <nobody@dest.test>: Recipient address rejected: User unknown"
MESSAGE = b"From: app@example.com\r\nTo: someone@dest.test\r\nSubject: hi\r\n\r\nhello\r\n"
PLANS = {
    "small": {"email_quota": 1000},
    "bulk": {"email_quota": 1000, "suppression": False},
    "alerting": {"email_quota": 4, "usage_alerts": [50]},
}
LATER = "later@dest.test"  # the upstream answers 450: deferred, retried
EVENTS_FAST = {"interval": 0.05, "first_delay": 0.3, "max_delay": 0.6, "max_attempts": 3, "timeout": 10}


async def client_for(harness: RelayHarness, name: str = "app") -> aiosmtplib.SMTP:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=harness.port, start_tls=False, timeout=10)
    await client.connect()
    await client.login(name, PASSWORD)
    return client


async def send(harness: RelayHarness, recipients: list[str], name: str = "app") -> None:
    client = await client_for(harness, name)
    await client.sendmail("app@example.com", recipients, MESSAGE)
    await client.quit()


def service(harness: RelayHarness) -> AdminService:
    assert harness.relay is not None
    return AdminService(harness.relay.meter, harness.relay.billing, actor="cli:test")


async def until(predicate: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.05)


async def final_results(harness: RelayHarness, name: str, count: int) -> None:
    assert harness.relay is not None
    meter = harness.relay.meter

    async def done() -> bool:
        usage = (await meter.usage(name)).usage
        return usage.delivered + usage.soft_bounced + usage.hard_bounced >= count

    await until(done)


@pytest.fixture(params=["sqlite", "postgres", "postgres-leases"])
async def bouncing(make_relay: Any, upstream: Upstream, request: pytest.FixtureRequest) -> AsyncIterator[RelayHarness]:
    """A relay whose upstream answers NOT_EXIST for BOUNCING, on SQLite, then on PostgreSQL (its
    results recorded in batches), without and with allowance leases (reserves answered from memory,
    the suppression list looked up apart)."""
    upstream.handler.rcpt_replies[BOUNCING] = NOT_EXIST
    upstream.handler.rcpt_replies[LATER] = "450 4.2.1 <later@dest.test>: try again later"
    async with AsyncExitStack() as stack:
        extra: dict[str, Any] = {}
        if request.param.startswith("postgres"):
            schema = await stack.enter_async_context(isolated_schema())
            leases = 10 if request.param == "postgres-leases" else 0
            extra["database"] = {"url": schema_url(schema), "pool_size": 4, "lease_emails": leases}
        harness = make_relay(upstream.port, plans=PLANS, events=EVENTS_FAST, **extra)
        await harness.start()
        await add_account(harness, "app", "small")
        await add_account(harness, "bulk", "bulk")
        await add_account(harness, "alert", "alerting")
        yield harness
        await harness.stop()


async def test_a_hard_bounce_suppresses_the_recipient_until_it_is_removed(bouncing: RelayHarness) -> None:
    assert bouncing.relay is not None
    meter = bouncing.relay.meter
    await send(bouncing, [BOUNCING, GOOD])
    await final_results(bouncing, "app", 2)
    listed = await service(bouncing).suppressions("app")
    assert [(e["address"], e["reason"]) for e in listed] == [(BOUNCING, "not_exist")]
    assert listed[0]["detail"].startswith("550 5.1.1")
    before = await settled_usage(meter)

    client = await client_for(bouncing)
    await client.mail("app@example.com")
    with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
        await client.rcpt("NoBody@dest.test")  # any case: the same address
    assert refused.value.code == 550
    today = datetime.now().astimezone().date().isoformat()[:7]
    assert refused.value.message.startswith(
        "5.1.1 <NoBody@dest.test> is suppressed for this account: it hard-bounced on"
    )
    assert today in refused.value.message and "(the address does not exist)" in refused.value.message
    assert "mailmeter suppression remove app NoBody@dest.test" in refused.value.message
    after = await meter.usage("app")
    assert (after.usage.accepted, after.usage.reserved) == (before.accepted, before.reserved)  # nothing held
    assert (await client.rcpt(GOOD))[0] == 250  # the other recipients go on

    # Removed by the operator: the same open session's next RCPT is accepted (and held).
    removed = await service(bouncing).remove_suppression("app", "<NoBody@dest.test>")
    assert removed == {"account": "app", "address": BOUNCING, "suppressed": False}
    assert (await client.rcpt(BOUNCING))[0] == 250
    assert (await client.data(MESSAGE))[0] == 250
    await client.quit()
    assert (await meter.usage("app")).usage.accepted == before.accepted + 2  # both billed again
    audit = await service(bouncing).audit("app")
    assert audit[0]["action"] == "suppression.remove" and audit[0]["detail"] == {"address": BOUNCING}
    # It bounced the same way again: suppressed again, by the new message.
    await final_results(bouncing, "app", 4)
    (again,) = await service(bouncing).suppressions("app")
    assert again["address"] == BOUNCING and again["queue_id"] != listed[0]["queue_id"]


async def test_suppression_is_per_account_and_a_plan_can_turn_it_off(bouncing: RelayHarness) -> None:
    await send(bouncing, [BOUNCING], name="bulk")
    await final_results(bouncing, "bulk", 1)
    assert await service(bouncing).suppressions("bulk") == []  # suppression: false
    client = await client_for(bouncing, "bulk")
    await client.mail("app@example.com")
    assert (await client.rcpt(BOUNCING))[0] == 250
    await client.quit()

    await send(bouncing, [BOUNCING], name="app")
    await final_results(bouncing, "app", 1)
    assert len(await service(bouncing).suppressions("app")) == 1
    client = await client_for(bouncing, "bulk")  # another account may still send to it
    await client.mail("app@example.com")
    assert (await client.rcpt(BOUNCING))[0] == 250
    await client.quit()


# -- webhooks ----------------------------------------------------------------------------


@dataclass
class Receiver:
    """An aiohttp server that records what it is POSTed; `fail` answers 500 that many times."""

    secret: str = ""
    fail: int = 0
    always_fail: bool = False
    got: list[tuple[float, dict[str, str], bytes]] = field(default_factory=list)
    answered: list[int] = field(default_factory=list)
    runner: web.AppRunner | None = None
    port: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.got.append((time.monotonic(), dict(request.headers), body))
        status = 500 if self.always_fail or len(self.got) <= self.fail else 200
        self.answered.append(status)
        return web.Response(status=status, text="ok" if status == 200 else "broken")

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        self.port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return f"http://127.0.0.1:{self.port}/hook"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def events(self) -> list[dict[str, Any]]:
        """The events received, each checked: its signature verifies with the secret."""
        found = []
        for _, headers, body in self.got:
            assert verify_event_signature(self.secret, headers[SIGNATURE_HEADER], body, time.time())
            assert not verify_event_signature("another-secret-0123456789", headers[SIGNATURE_HEADER], body, time.time())
            assert not verify_event_signature(self.secret, headers[SIGNATURE_HEADER], body + b" ", time.time())
            event = json.loads(body)
            assert headers["Mailmeter-Event-Id"] == event["id"]
            found.append(event)
        return found


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    found = Receiver()
    yield found
    await found.stop()


async def test_the_webhook_gets_signed_delivered_and_bounced_events(bouncing: RelayHarness, receiver: Receiver) -> None:
    url = await receiver.start()
    hook = await service(bouncing).set_webhook("app", url, ["delivered", "bounced"])
    receiver.secret = hook["secret"]
    assert hook["events"] == ["delivered", "bounced"] and hook["secret"].startswith("whsec_")
    await send(bouncing, [BOUNCING, GOOD])

    async def both() -> bool:
        return len(receiver.got) >= 2

    await until(both)
    events = sorted(receiver.events(), key=lambda e: e["type"])
    assert [e["type"] for e in events] == ["bounced", "delivered"]
    bounced, delivered = events
    assert bounced["account"] == "app" and bounced["data"]["recipient"] == BOUNCING
    assert bounced["data"]["bounce"] == "hard" and bounced["data"]["reason"] == "not_exist"
    assert bounced["data"]["detail"].startswith("550 5.1.1")
    assert delivered["data"]["recipient"] == GOOD and delivered["data"]["result"] == "delivered"
    assert bounced["data"]["queue_id"] == delivered["data"]["queue_id"]

    async def logged() -> bool:
        return all(e["status"] == "delivered" for e in await service(bouncing).events("app"))

    await until(logged)
    log = await service(bouncing).events("app")
    assert len(log) == 2 and all(len(e["attempts"]) == 1 and e["attempts"][0]["status_code"] == 200 for e in log), log
    # A payment change is not a kind this webhook takes: not recorded, not sent.
    await service(bouncing).payment("app", "failed", "card declined")
    await asyncio.sleep(0.3)
    assert len(receiver.got) == 2 and len(await service(bouncing).events("app")) == 2
    audit = await service(bouncing).audit("app")
    assert any(a["action"] == "webhook.set" and "secret" not in json.dumps(a) for a in audit)
    # Delivered events are kept events.keep_days, then forgotten with their log.
    assert bouncing.relay is not None
    store = bouncing.relay.store
    assert await EventSender(store, EventSettings(keep_days=30)).prune() == 0
    later = datetime.now(timezone.utc) + timedelta(days=31)
    assert await EventSender(store, EventSettings(keep_days=30), clock=lambda: later).prune() == 2
    assert await service(bouncing).events("app") == []


async def test_a_failing_receiver_gets_retries_with_backoff_and_the_log_shows_them(
    bouncing: RelayHarness, receiver: Receiver
) -> None:
    url = await receiver.start()
    receiver.fail = 2  # 500, 500, then 200
    hook = await service(bouncing).set_webhook("app", url, ["payment"])
    receiver.secret = hook["secret"]
    await service(bouncing).payment("app", "failed", "card declined")

    async def delivered() -> bool:
        return any(e["status"] == "delivered" for e in await service(bouncing).events("app"))

    await until(delivered)
    assert receiver.answered == [500, 500, 200]
    times = [at for at, _, _ in receiver.got]
    assert times[1] - times[0] >= 0.3 - 0.05  # first_delay
    assert times[2] - times[1] >= 0.6 - 0.05  # doubled (max_delay)
    bodies = receiver.events()
    assert {e["id"] for e in bodies} == {bodies[0]["id"]}  # one event, sent three times
    assert bodies[0]["data"] == {"detail": "card declined", "payment_state": "failed"}
    (event,) = await service(bouncing).events("app")
    assert [(a["attempt"], a["status_code"]) for a in event["attempts"]] == [(1, 500), (2, 500), (3, 200)]
    assert event["attempts"][0]["error"].startswith("HTTP 500") and event["attempts"][2]["error"] == ""

    # A receiver that never answers 2xx: max_attempts (3), then the event fails.
    receiver.always_fail = True
    await service(bouncing).payment("app", "ok")

    async def failed() -> bool:
        return any(e["status"] == "failed" for e in await service(bouncing).events("app"))

    await until(failed)
    newest = (await service(bouncing).events("app"))[0]
    assert newest["data"]["payment_state"] == "ok" and newest["next_attempt_at"] is None
    assert [a["status_code"] for a in newest["attempts"]] == [500, 500, 500]
    await asyncio.sleep(1.0)
    assert len(receiver.got) == 6  # no fourth attempt


async def test_a_receiver_that_is_down_is_logged_without_a_status(bouncing: RelayHarness) -> None:
    await service(bouncing).set_webhook("app", f"http://127.0.0.1:{free_port()}/nothing-listens", ["payment"])
    await service(bouncing).payment("app", "failed")

    async def tried() -> bool:
        events = await service(bouncing).events("app")
        return bool(events and events[0]["attempts"])

    await until(tried)
    attempt = (await service(bouncing).events("app"))[0]["attempts"][0]
    assert attempt["status_code"] is None and "Connect" in attempt["error"]


async def test_deferred_and_usage_alert_events(bouncing: RelayHarness, receiver: Receiver) -> None:
    url = await receiver.start()
    receiver.secret = (await service(bouncing).set_webhook("alert", url, ["deferred", "usage_alert"]))["secret"]
    await send(bouncing, [LATER, GOOD], name="alert")  # 2 of the quota's 4: the 50% alert

    async def arrived() -> bool:
        kinds = {e["type"] for e in receiver.events()}
        return kinds == {"deferred", "usage_alert"}

    await until(arrived)
    events = receiver.events()
    assert {e["account"] for e in events} == {"alert"}
    alert = next(e for e in events if e["type"] == "usage_alert")
    assert alert["data"] == {"kind": "usage_alert", "percent": 50, "limit": 4, "sent": 2}
    deferred = next(e for e in events if e["type"] == "deferred")
    assert deferred["data"]["recipient"] == LATER and deferred["data"]["result"] == "deferred"
    assert deferred["data"]["detail"].startswith("450 4.2.1")
    assert all(e["type"] != "delivered" for e in events)  # not a kind this webhook takes


async def test_a_charge_the_gateway_declines_or_collects_is_a_payment_event(store: Store) -> None:  # noqa: F811
    """On SQLite and PostgreSQL: the charge's verdict and its event in one transaction."""
    plans = parse_plans({"fee": {"plan_fee": "9.99", "funding": {"kind": "postpaid", "net_days": 14}}})
    clock = Clock(datetime(2026, 4, 10, tzinfo=timezone.utc))
    meter = Meter(store, plans, node="n1", clock=clock)
    admin = AdminService(meter, Billing(meter, NoGateway()), actor="cli:test")
    for name in ("shop", "quiet"):
        await meter.add_account(name, "pw", "fee", [f"{name}.test"], [], subscribed_on=date(2026, 4, 1))
    await admin.set_webhook("shop", "https://hooks.test/in", ["payment"])
    clock.set("2026-05-01T00:00:01+00:00")
    await admin.run_billing()
    keys = {}
    for name in ("shop", "quiet"):
        [charge] = await admin.charges(name, "recorded")
        keys[name] = charge["key"]
        await admin.settle_charge(charge["key"], "failed", "card declined")
    (event,) = await admin.events("shop")
    assert event["type"] == "payment" and event["status"] == "pending"
    assert event["data"] == {
        "charge": keys["shop"],
        "charge_status": "failed",
        "detail": "card declined",
        "payment_state": "failed",
    }
    assert await admin.events("quiet") == []  # no webhook: nothing recorded
    await admin.payment("shop", "ok")
    newest = (await admin.events("shop"))[0]
    assert newest["data"]["payment_state"] == "ok" and "charge" not in newest["data"]
