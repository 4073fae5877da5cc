"""`billing.gateway.kind: none`: charges are recorded for an external system to collect, and
the operator reports the outcome from the CLI or the API (a failure blocks sending, live).

A real relay with its admin API, real SMTP sessions, the real `mailmeter` command, and
the meter's own billing job, on real SQLite; the invoice case on both stores.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import date, datetime, timezone

import aiosmtplib
import pytest

from mailmeter.metering.billing import Billing
from mailmeter.metering.gateway import NoGateway
from mailmeter.metering.meter import Meter
from mailmeter.metering.store import Store
from mailmeter.policies import parse_plans
from mailmeter.service import AdminService, Conflict
from tests.conftest import PASSWORD
from tests.mailmeter.test_api import NEW_ACCOUNT, Api, start_api  # noqa: F401 (the fixture)
from tests.mailmeter.test_cli_and_service import mailmeter
from tests.metering.test_billing_meter import Clock, store  # noqa: F401 (the fixture: SQLite, PostgreSQL)


async def commit(api: Api, emails: int) -> None:
    """`emails` accepted for account app (plan e: 10 included, then $1 per 5)."""
    assert api.harness.relay is not None
    meter = api.harness.relay.meter
    grant = await meter.reserve("app", None, emails)
    await meter.commit(grant.hold_id, "Q1", emails)


async def test_charges_are_recorded_once_then_marked_collected_from_the_cli(
    start_api: Callable[..., Awaitable[Api]],
) -> None:
    api = await start_api()
    await api.call("POST", "/v1/accounts", {**NEW_ACCOUNT, "plan": "e"})
    await commit(api, 16)  # emails 11 and 16 open two $1 blocks

    status, run = await api.call("POST", "/v1/billing/run")
    assert status == 200 and (run["charges_recorded"], run["charges_collected"]) == (2, 0)
    status, charges = await api.call("GET", "/v1/accounts/app/charges")
    assert [(c["kind"], c["amount"], c["status"]) for c in charges] == [("block", "1.00", "recorded")] * 2
    assert "external collection" in charges[0]["detail"]
    status, again = await api.call("POST", "/v1/billing/run")
    assert again["charges_recorded"] == 0  # final for the relay: never handed over twice

    config = api.harness.directory / "config.yaml"
    key = charges[0]["key"]
    done = await asyncio.to_thread(mailmeter, config, "charge", "collected", key, "--reason", "SEPA run 42")
    assert done.returncode == 0, done.stderr
    assert f"charge {key} (1.00 USD) marked collected: succeeded" in done.stdout
    twice = await asyncio.to_thread(mailmeter, config, "charge", "collected", key)
    assert twice.returncode == 1 and "is already succeeded" in twice.stderr
    listed = await asyncio.to_thread(mailmeter, config, "charge", "list", "app", "--status", "recorded", "--json")
    assert listed.returncode == 0, listed.stderr
    assert charges[1]["key"] in listed.stdout and key not in listed.stdout
    status, events = await api.call("GET", "/v1/audit?account=app")
    collected = [e for e in events if e["action"] == "charge.collected"]
    assert len(collected) == 1 and collected[0]["actor"].startswith("cli:")
    assert collected[0]["detail"] == {"charge": key, "reason": "SEPA run 42"}


async def test_a_charge_marked_failed_through_the_api_blocks_a_live_session(
    start_api: Callable[..., Awaitable[Api]],
) -> None:
    api = await start_api()
    await api.call("POST", "/v1/accounts", {**NEW_ACCOUNT, "plan": "e"})
    await commit(api, 11)
    await api.call("POST", "/v1/billing/run")
    status, charges = await api.call("GET", "/v1/accounts/app/charges?status=recorded")
    assert status == 200 and len(charges) == 1
    key = charges[0]["key"]

    session = aiosmtplib.SMTP(hostname="127.0.0.1", port=api.harness.port, start_tls=False, timeout=10)
    await session.connect()
    await session.login("app", PASSWORD)
    assert (await session.mail("app@example.com")).code == 250
    await session.rset()

    status, result = await api.call(
        "POST", "/v1/charges/settle", {"charge": key, "state": "failed", "reason": "direct debit returned"}
    )
    assert status == 200 and (result["status"], result["payment_state"]) == ("failed", "failed")
    response = await session.execute_command(b"MAIL", b"FROM:<app@example.com>")
    assert response.code == 451 and response.message.startswith("4.7.1 Sending is paused because a payment failed")

    assert (await api.call("POST", "/v1/charges/settle", {"charge": key, "state": "collected"}))[0] == 409
    assert (await api.call("POST", "/v1/charges/settle", {"charge": "app/nope", "state": "failed"}))[0] == 404
    status, error = await api.call("POST", "/v1/charges/settle", {"charge": key, "state": "paid"})
    assert status == 400 and "collected or failed" in error["error"]
    assert (await api.call("GET", "/v1/accounts/app/charges?status=late"))[0] == 400
    status, events = await api.call("GET", "/v1/audit?account=app")
    failed = [e for e in events if e["action"] == "charge.failed"]
    assert len(failed) == 1 and failed[0]["actor"] == "ops"
    assert failed[0]["changes"]["payment_state"] == ["ok", "failed"]

    # The operator's release works as after any failed payment: the charge is recorded again.
    await api.call("POST", "/v1/accounts/app/payment", {"state": "ok"})
    await session.rset()
    assert (await session.execute_command(b"MAIL", b"FROM:<app@example.com>")).code == 250
    await session.quit()
    await api.call("POST", "/v1/billing/run")
    status, charges = await api.call("GET", "/v1/accounts/app/charges")
    assert [c["status"] for c in charges] == ["recorded"]


async def test_collecting_an_invoice_charge_marks_the_invoice_paid(store: Store) -> None:  # noqa: F811
    plans = parse_plans({"fee": {"plan_fee": "9.99", "funding": {"kind": "postpaid", "net_days": 14}}})
    clock = Clock(datetime(2026, 4, 10, tzinfo=timezone.utc))
    meter = Meter(store, plans, node="n1", clock=clock)
    billing = Billing(meter, NoGateway())
    service = AdminService(meter, billing, actor="cli:test")
    await meter.add_account("shop", "pw", "fee", ["shop.test"], [], subscribed_on=date(2026, 4, 1))
    clock.set("2026-05-01T00:00:01+00:00")
    run = await service.run_billing()
    assert (run["invoices"], run["charges_recorded"]) == (["INV-shop-20260401"], 1)
    assert (await service.invoices("shop"))[0]["status"] == "open"
    [charge] = await service.charges("shop", "recorded")
    assert (charge["kind"], charge["amount"]) == ("invoice", "9.99")
    settled = await service.settle_charge(charge["key"], "collected")
    assert (settled["status"], settled["payment_state"]) == ("succeeded", "ok")
    assert (await service.invoices("shop"))[0]["status"] == "paid"
    with pytest.raises(Conflict):
        await service.settle_charge(charge["key"], "failed")
