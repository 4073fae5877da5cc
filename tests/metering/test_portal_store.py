"""The store's part for the portal (metering/store.py PortalStore), on SQLite and PostgreSQL:
tokens kept as digests, the usage chart's hourly sums, and a payment's effect coming with its
success, once (a top-up credits the balance; a repay pays the overdrawn invoices)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import pytest

from mailmeter.metering.billing import Billing
from mailmeter.metering.gateway import NoGateway
from mailmeter.metering.meter import Meter
from mailmeter.metering.postgres import PgStore
from mailmeter.metering.sqlite import SqliteStore
from mailmeter.metering.store import Store
from mailmeter.policies import parse_plans
from tests.pgserver import PG_URL, isolated_schema
from tests.portal.harness import PLANS

T0 = datetime(2025, 12, 10, 9, 30, tzinfo=timezone.utc)


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "sqlite":
        sqlite = SqliteStore(tmp_path / "meter.db")
        await sqlite.open()
        yield sqlite
        await sqlite.close()
        return
    async with isolated_schema() as schema:
        postgres = PgStore(PG_URL, pool_size=2, server_settings={"search_path": schema})
        await postgres.open()
        try:
            yield postgres
        finally:
            await postgres.close()


async def test_tokens_hours_and_payments(store: Store) -> None:
    now = T0
    meter = Meter(store, parse_plans(PLANS), "n1", clock=lambda: now)
    await meter.add_account("b", "pw", "prepaid-tiered", ["b.example"], [], subscribed_on=date(2025, 12, 1))
    account = await meter.account("b")
    assert await store.set_account_token("b", "digest-1", now) and await store.set_account_token("b", "digest-2", now)
    assert await store.account_id_for_token("digest-1") is None
    assert await store.account_id_for_token("digest-2") == account.id
    assert not await store.set_account_token("nobody", "digest-3", now)

    period = meter.period_of(account)
    for emails, at in ((3, T0), (4, T0 + timedelta(minutes=20)), (5, T0 + timedelta(days=1))):
        now = at
        grant = await meter.reserve("b", None, emails)
        await meter.commit(grant.hold_id, f"Q{at:%d%H%M}", grant.granted)
    assert list(await store.usage_by_hour(account.id, period.key)) == [("2025-12-10T09", 7), ("2025-12-11T09", 5)]

    balance = (await meter.account("b")).prepaid_balance
    payment = await store.add_payment("b", period.key, "topup", 5_000_000, "Top-up", now)
    assert payment is not None and payment["idempotency_key"] == f"b/{period.key}/topup/1"
    assert (await meter.account("b")).prepaid_balance == balance  # not before the gateway confirms
    key = payment["idempotency_key"]
    assert await store.set_charge_result(key, "succeeded", "ok", 1, now)
    assert not await store.set_charge_result(key, "succeeded", "again", 2, now)  # a late duplicate
    assert (await meter.account("b")).prepaid_balance == balance + 5_000_000  # once
    second = await store.add_payment("b", period.key, "topup", 1_000_000, "Top-up", now)
    assert second is not None and second["seq"] == 2
    assert await store.set_charge_result(second["idempotency_key"], "failed", "declined", 1, now)
    account = await meter.account("b")
    assert account.prepaid_balance == balance + 5_000_000 and not account.payment_ok
    await meter.set_payment("b", True)  # the payment method updated: usage charges go again, not a payment
    assert (await store.charge(second["idempotency_key"]))["status"] == "failed"  # type: ignore[index]


async def test_repay_pays_the_overdrawn_invoices_once_confirmed(store: Store) -> None:
    now = datetime(2025, 11, 10, tzinfo=timezone.utc)
    meter = Meter(store, parse_plans(PLANS), "n1", clock=lambda: now)
    await meter.add_account("c", "pw", "delivery-results", ["c.example"], [], subscribed_on=date(2025, 11, 1))
    grant = await meter.reserve("c", None, 100)
    await meter.commit(grant.hold_id, "Q1", grant.granted)
    for n in range(100):
        await meter.record_result("Q1", f"r{n}@example.net", "delivered")
    now = datetime(2025, 12, 2, tzinfo=timezone.utc)
    await Billing(meter, NoGateway()).close_due_periods()
    account = await meter.account("c")
    assert account.outstanding_debt == 30_000
    period = meter.period_of(account)
    payment = await store.add_payment("c", period.key, "repay", 30_000, "Repay", now)
    assert payment is not None
    assert await store.add_payment("c", period.key, "repay", 30_000, "Repay", now) is None  # one open at a time
    assert (await meter.account("c")).outstanding_debt == 30_000
    assert await store.set_charge_result(payment["idempotency_key"], "succeeded", "ok", 1, now)
    assert (await meter.account("c")).outstanding_debt == 0
    assert [i.status for i in await store.invoices(account.id)] == ["paid"]
