"""The five worked examples of BILLING_MODELS.md through the real meter, on both stores.

Every test runs three times: on the SQLite store, on the PostgreSQL store (a fresh
schema of the real server; see tests/pgserver.py), and on PostgreSQL with allowance
leasing (metering/leases.py), so both stores and both reserve paths are held to the
same results. Emails are reserved and committed in batches (the meter's
reserve takes a count), so millions of emails cost a few transactions. Time is
the meter's injected clock.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml

from mailmeter.metering.billing import Billing
from mailmeter.metering.gateway import ChargeOutcome, ChargeRequest, GatewayResult, NoGateway
from mailmeter.metering.leases import LeaseSettings
from mailmeter.metering.meter import Meter
from mailmeter.metering.postgres import PgStore
from mailmeter.metering.sqlite import SqliteStore
from mailmeter.metering.store import Store
from mailmeter.policies import parse_plans
from mailmeter.service import AdminService
from tests.metering.test_export import reconcile
from tests.pgserver import PG_URL, isolated_schema

REPO = Path(__file__).resolve().parents[2]
USD = 1_000_000


@dataclass
class Clock:
    now: datetime

    def __call__(self) -> datetime:
        return self.now

    def set(self, text: str) -> None:
        self.now = datetime.fromisoformat(text).astimezone(timezone.utc)


@dataclass
class World:
    meter: Meter
    billing: Billing
    clock: Clock
    sent: int = 0

    async def send(self, name: str, emails: int, campaign: str = "") -> int:
        """Reserve and commit up to `emails` in one message; returns how many were granted."""
        grant = await self.meter.reserve(name, None, emails)
        if grant.granted == 0:
            await self.meter.release(grant.hold_id)
            return 0
        self.sent += 1
        await self.meter.commit(grant.hold_id, f"Q{self.sent:08d}", grant.granted, campaign)
        return grant.granted

    async def charges(self, name: str) -> list[dict[str, object]]:
        account = await self.meter.account(name)
        return [dict(row) for row in await self.meter.store.charges_of(account.id)]


@pytest.fixture(params=["sqlite", "postgres", "postgres-leases"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """An open, empty store of each kind: a SQLite file, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        sqlite = SqliteStore(tmp_path / "meter.db")
        await sqlite.open()
        yield sqlite
        await sqlite.close()
        return
    async with isolated_schema() as schema:
        postgres = PgStore(PG_URL, pool_size=4, server_settings={"search_path": schema})
        await postgres.open()
        try:
            yield postgres
        finally:
            await postgres.close()


@pytest.fixture
async def world(store: Store, request: pytest.FixtureRequest) -> AsyncIterator[World]:
    config = yaml.safe_load((REPO / "config.example.yaml").read_text())
    clock = Clock(datetime(2026, 4, 1, tzinfo=timezone.utc))
    # postgres-leases: every reserve goes through a lease (renewed at each one, seconds=0,
    # so each decision sees the standing the example just set; the block stays held).
    leasing = (
        LeaseSettings(emails=50, seconds=0) if request.node.callspec.params["store"] == "postgres-leases" else None
    )
    meter = Meter(store, parse_plans(config["plans"]), node="n1", clock=clock, region="eu-1", leasing=leasing)
    yield World(meter, Billing(meter, NoGateway()), clock)


async def add(world: World, name: str, plan: str, subscribed_on: date) -> None:
    await world.meter.add_account(
        name, "pw", plan, ["example.com"], [], subscribed_on=subscribed_on, contacts=[f"billing@{name}.test"]
    )


async def test_model_a_830_dollars_in_april(world: World) -> None:
    await add(world, "a", "per-email-threshold", date(2026, 4, 1))
    world.clock.set("2026-04-08T10:00:00+00:00")
    assert await world.send("a", 1_250_000) == 1_250_000  # $250 cumulative
    assert [c["amount"] for c in await world.charges("a")] == [250_000_000]
    world.clock.set("2026-04-19T10:00:00+00:00")
    await world.send("a", 1_250_000)  # $500
    world.clock.set("2026-04-27T10:00:00+00:00")
    await world.send("a", 1_150_000)  # $730: the rule says no third charge yet
    assert len(await world.charges("a")) == 2
    usage = (await world.meter.usage("a")).as_json()
    assert usage["unbilled"] == "230.00"  # live unbilled balance
    await world.send("a", 100_000)  # $750: the third $250
    world.clock.set("2026-04-30T10:00:00+00:00")
    await world.send("a", 400_000)  # $830
    charges = await world.charges("a")
    assert [(c["kind"], c["seq"], c["amount"]) for c in charges] == [("threshold", n, 250_000_000) for n in (1, 2, 3)]
    assert [c["created_at"][:10] for c in charges] == ["2026-04-08", "2026-04-19", "2026-04-27"]
    assert (await world.billing.close_due_periods()) == []  # April is not over
    world.clock.set("2026-05-01T00:00:01+00:00")
    assert await world.billing.close_due_periods() == ["INV-a-20260401"]
    assert await world.billing.close_due_periods() == []  # idempotent
    [invoice] = await world.meter.store.invoices()
    assert (invoice.total, invoice.invoice_date) == (80_000_000, "2026-05-01")
    assert invoice.total + sum(c["amount"] for c in charges) == 830_000_000  # $830 in all


class DecliningGateway:
    """A payment provider that declines every charge (the card was refused)."""

    async def submit(self, charge: ChargeRequest) -> GatewayResult:
        return GatewayResult(ChargeOutcome.FAILED, "card declined")


async def receipt(world: World, name: str, index: int = -1) -> dict[str, Any]:
    account = await world.meter.account(name)
    record = (await world.meter.store.invoices(account.id))[index]
    return {**json.loads(record.body), "status": record.status}


async def test_model_b_the_monthly_payment_is_credit_and_refuses_email_100001(world: World) -> None:
    world.clock.set("2026-04-10T10:00:00+00:00")
    await add(world, "b", "prepaid-tiered", date(2026, 4, 10))
    # Added: April's $100 monthly payment is charged and credited to the balance at once.
    assert [(c["kind"], c["seq"], c["amount"]) for c in await world.charges("b")] == [("monthly", 1, 100 * USD)]
    assert (await world.meter.account("b")).prepaid_balance == 100 * USD
    assert await world.send("b", 99_999) == 99_999
    assert await world.send("b", 1) == 1  # email 100,000
    grant = await world.meter.reserve("b", None, 1)  # email 100,001
    assert (grant.granted, grant.refusal) == (0, "balance_exhausted")
    await world.meter.release(grant.hold_id)
    assert await world.meter.sending_refusal("b") == "balance_exhausted"
    prepaid = (await world.meter.usage("b")).as_json()["prepaid"]
    assert prepaid == {
        "available": "100.00",
        "spent": "100.00",
        "remaining": "0.00",
        "monthly_payment": "100.00",
        "next_monthly_payment": "100.00",
        "next_credit_at": "2026-04-30T22:00:00+00:00",
    }
    await world.meter.add_balance("b", 1 * USD)  # a top-up resumes sending at once, at the next tier's price
    assert await world.send("b", 2_000) == 1_250  # $1 at $0.80 per 1,000
    # The monthly payment goes to the gateway like any charge (this world's is `none`: recorded
    # for an external system to collect).
    assert await world.billing.collect_charges() == (0, 0, 1)
    # May 1, 00:00:01 in Amsterdam: May's $100 is there before the billing job has run.
    world.clock.set("2026-05-01T00:00:01+02:00")
    assert (await world.meter.usage("b")).as_json()["prepaid"]["available"] == "100.00"
    assert await world.billing.close_due_periods() == ["INV-b-20260401"]
    april = await receipt(world, "b")
    assert [(line["description"], line["amount"]) for line in april["lines"]] == [
        ("Emails: 101,250 (100,000 at $0.001; 1,250 at $0.0008)", "101.00")
    ]
    assert (april["total"], april["prepaid_applied"], april["amount_due"], april["status"]) == (
        "101.00",
        "101.00",
        "0.00",
        "paid",
    )
    assert april["payments"] == [
        {"kind": "prepaid", "description": "Paid from the prepaid balance", "amount": "-101.00"}
    ]
    assert april["prepaid"] == {
        "balance_before_usage": "101.00",
        "monthly_payment": "100.00",
        "applied": "101.00",
        "balance_after": "0.00",
    }
    assert [(c["key"], c["status"]) for c in april["monthly_payments"]] == [
        ("b/2026-03-31T22:00:00Z/monthly/1", "recorded")
    ]
    assert april["in_period_charges"] == []
    # May's credit is recorded once, however often the job runs.
    assert await world.billing.close_due_periods() == []
    monthly = [c for c in await world.charges("b") if c["kind"] == "monthly"]
    assert [(c["period_key"], c["amount"]) for c in monthly] == [
        ("2026-03-31T22:00:00Z", 100 * USD),
        ("2026-04-30T22:00:00Z", 100 * USD),
    ]
    assert (await world.meter.account("b")).prepaid_balance == 100 * USD
    assert await world.send("b", 100_001) == 100_000


async def test_model_b_unspent_credit_carries_over_exact_at_the_period_boundary(world: World) -> None:
    """The billing job closes April and credits May a moment after midnight; the balance is
    exact from the first instant of May: carried over (April's credit less April's usage,
    held emails included) plus May's credit, not April's undeducted balance."""
    world.clock.set("2026-04-01T08:00:00+00:00")
    await add(world, "b", "prepaid-tiered", date(2026, 4, 1))
    assert await world.send("b", 60_000) == 60_000  # $60 of April's $100
    straddling = await world.meter.reserve("b", None, 10_000)  # a transaction open across midnight
    assert straddling.granted == 10_000
    await world.meter.tend_leases(force=True)
    world.clock.set("2026-05-01T00:00:00+02:00")
    # April holds 70,000 ($70): May may spend $30 + $100 = 100,000 at $1.00 and 37,500 at $0.80 per 1,000.
    assert (await world.meter.usage("b")).as_json()["prepaid"]["available"] == "130.00"
    await world.meter.commit(straddling.hold_id, "Q-straddle", 5_000)  # counted in April: 65,000 ($65)
    await world.meter.tend_leases(force=True)  # (a lease gives back the other 5,000 when tended)
    assert (await world.meter.usage("b")).as_json()["prepaid"]["available"] == "135.00"
    assert await world.send("b", 143_751) == 143_750  # $135 = 100,000 x $0.001 + 43,750 x $0.0008
    await world.billing.close_due_periods()
    april = await receipt(world, "b")
    assert april["prepaid"] == {
        "balance_before_usage": "100.00",
        "monthly_payment": "100.00",
        "applied": "65.00",
        "balance_after": "35.00",
    }
    account = await world.meter.account("b")
    assert account.prepaid_balance == 135 * USD  # $35 carried over + May's $100
    usage = (await world.meter.usage("b")).as_json()
    assert usage["prepaid"]["remaining"] == "0.00" and usage["remaining"] == 0


async def test_model_b_credits_once_per_period_through_catch_up_concurrent_jobs_and_restarts(world: World) -> None:
    world.clock.set("2026-04-01T08:00:00+00:00")
    await add(world, "b", "prepaid-tiered", date(2026, 4, 1))
    await world.send("b", 30_000)  # $30 in April, nothing after: the relay was down from May to mid-July
    await world.meter.tend_leases(force=True)  # (what a lease still held would count as April's, until given back)
    world.clock.set("2026-07-15T12:00:00+00:00")
    # Before the job catches up, July may spend what the ledger will say: $70 + May, June, July's $100.
    assert (await world.meter.usage("b")).as_json()["prepaid"]["available"] == "370.00"
    runs = await asyncio.gather(*(world.billing.close_due_periods() for _ in range(3)))
    assert sorted(set().union(*runs)) == ["INV-b-20260401", "INV-b-20260501", "INV-b-20260601"]
    monthly = [c for c in await world.charges("b") if c["kind"] == "monthly"]
    assert [c["period_key"][:10] for c in monthly] == ["2026-03-31", "2026-04-30", "2026-05-31", "2026-06-30"]
    befores = [(await receipt(world, "b", n))["prepaid"]["balance_before_usage"] for n in range(3)]
    assert befores == ["100.00", "170.00", "270.00"]  # each receipt sees its own month's balance, in order
    assert (await world.meter.account("b")).prepaid_balance == 370 * USD
    await world.meter.store.close()
    await world.meter.store.open()  # a restart: the ledger is in the database
    assert await world.billing.close_due_periods() == []
    assert len([c for c in await world.charges("b") if c["kind"] == "monthly"]) == 4
    assert (await world.meter.account("b")).prepaid_balance == 370 * USD


async def test_model_b_a_new_monthly_payment_applies_from_the_next_period(world: World) -> None:
    world.clock.set("2026-04-10T08:00:00+00:00")
    await add(world, "b", "prepaid-tiered", date(2026, 4, 1))
    change = await world.meter.set_monthly_payment("b", 150 * USD)  # "increase your payment"
    assert change.starts == datetime(2026, 4, 30, 22, 0, tzinfo=timezone.utc)
    prepaid = (await world.meter.usage("b")).as_json()["prepaid"]
    assert (prepaid["monthly_payment"], prepaid["next_monthly_payment"]) == ("100.00", "150.00")
    assert await world.send("b", 100_001) == 100_000  # April's credit was fixed when April started
    world.clock.set("2026-05-02T08:00:00+00:00")
    await world.billing.close_due_periods()
    assert [c["amount"] for c in await world.charges("b") if c["kind"] == "monthly"] == [100 * USD, 150 * USD]
    assert await world.send("b", 200_000) == 162_500  # $150 = 100,000 x $0.001 + 62,500 x $0.0008
    with pytest.raises(ValueError, match="in steps of 0.01"):
        await world.meter.set_monthly_payment("b", 150_005_000)
    await add(world, "e", "limit-overage", date(2026, 5, 1))
    with pytest.raises(ValueError, match="postpaid"):
        await world.meter.set_monthly_payment("e", 10 * USD)
    # An account added with its own amount is credited that amount from its first period.
    await world.meter.add_account("b2", "pw", "prepaid-tiered", ["example.com"], [], monthly_payment=250 * USD)
    assert [c["amount"] for c in await world.charges("b2")] == [250 * USD]


async def test_model_b_a_declined_monthly_payment_blocks_sending_until_paid(world: World) -> None:
    world.clock.set("2026-04-01T08:00:00+00:00")
    await add(world, "b", "prepaid-tiered", date(2026, 4, 1))
    assert await world.send("b", 10) == 10  # the credit is there as soon as it is charged
    declining = Billing(world.meter, DecliningGateway())
    assert await declining.collect_charges() == (0, 1, 0)
    account = await world.meter.account("b")
    assert not account.payment_ok and "monthly/1 failed: card declined" in account.payment_detail
    grant = await world.meter.reserve("b", None, 1)
    assert (grant.granted, grant.refusal) == (0, "payment_failed")
    await world.meter.release(grant.hold_id)
    await world.meter.set_payment("b", True)  # the payment method is fixed: the charge is sent again
    assert await world.send("b", 1) == 1
    assert await world.billing.collect_charges() == (0, 0, 1)  # sent again (gateway `none`: recorded)
    [monthly] = await world.charges("b")
    assert (monthly["status"], monthly["attempts"]) == ("recorded", 2)


async def test_model_b_postpay_is_invoiced_for_what_was_sent_due_in_14_days(world: World) -> None:
    world.clock.set("2026-04-01T08:00:00+00:00")
    await add(world, "p", "postpay-tiered", date(2026, 4, 1))
    assert await world.charges("p") == []  # no monthly payment, no balance check
    assert await world.send("p", 150_000) == 150_000
    world.clock.set("2026-05-01T00:00:00+02:00")
    assert await world.billing.close_due_periods() == ["INV-p-20260401"]
    invoice = await receipt(world, "p")
    assert [(line["description"], line["amount"]) for line in invoice["lines"]] == [
        ("Emails: 150,000 (100,000 at $0.001; 50,000 at $0.0008)", "140.00")
    ]
    assert (invoice["total"], invoice["amount_due"], invoice["status"]) == ("140.00", "140.00", "open")
    assert (invoice["invoice_date"], invoice["due_date"]) == ("2026-05-01", "2026-05-15")
    assert invoice["prepaid"] is None and invoice["payments"] == []
    assert [(c["kind"], c["amount"]) for c in await world.charges("p")] == [("invoice", 140 * USD)]


async def test_model_c_results_split_at_utc8_midnight(world: World) -> None:
    await add(world, "c", "delivery-results", date(2026, 4, 1))
    world.clock.set("2026-04-20T00:00:00+00:00")
    assert await world.send("c", 4) == 4
    meter = world.meter
    world.clock.set("2026-04-30T15:59:59+00:00")  # 23:59:59 on April 30 in UTC+8
    assert await meter.record_result("Q00000001", "r1", "delivered")
    assert await meter.record_result("Q00000001", "r2", "hard_bounced")
    assert not await meter.record_result("Q00000001", "r2", "hard_bounced")  # counted once
    world.clock.set("2026-04-30T16:00:00+00:00")  # midnight May 1 in UTC+8: May's usage
    assert await meter.record_result("Q00000001", "r3", "delivered")
    assert await meter.record_result("Q00000001", "r4", "soft_bounced")
    may = (await meter.usage("c")).usage
    assert (may.delivered, may.soft_bounced, may.hard_bounced) == (1, 1, 0)
    april = (await meter.usage("c", at=datetime(2026, 4, 15, tzinfo=timezone.utc))).usage
    assert (april.delivered, april.soft_bounced, april.hard_bounced) == (1, 0, 1)
    # The bill exists from 15:00 UTC+8 on the 1st (07:00 UTC), not before.
    world.clock.set("2026-05-01T06:59:59+00:00")
    assert await world.billing.close_due_periods() == []
    world.clock.set("2026-05-01T07:00:00+00:00")
    assert await world.billing.close_due_periods() == ["INV-c-20260401"]
    invoice = json.loads((await meter.store.invoices())[0].body)
    assert invoice["regions"] == [
        {"region": "eu-1", "result": "delivered", "emails": 1},
        {"region": "eu-1", "result": "hard_bounced", "emails": 1},
    ]
    # The billing email goes out on the 5th, UTC+8.
    world.clock.set("2026-05-04T15:59:59+00:00")
    assert await world.billing.queue_statements() == 0
    world.clock.set("2026-05-04T16:00:00+00:00")
    assert await world.billing.queue_statements() == 1
    assert await world.billing.queue_statements() == 0
    account = await meter.account("c")
    keys = [row["key"] for row in await meter.store.notices_of(account.id)]
    assert keys == ["invoice", "statement"]


async def test_model_c_overdraft_and_repay(world: World) -> None:
    await add(world, "c", "delivery-results", date(2026, 3, 1))
    world.clock.set("2026-03-10T00:00:00+00:00")
    await world.send("c", 1000)
    for n in range(1000):
        await world.meter.record_result("Q00000001", f"r{n}", "delivered")
    world.clock.set("2026-04-02T00:00:00+00:00")
    await world.billing.close_due_periods()
    account = await world.meter.account("c")
    [invoice] = await world.meter.store.invoices(account.id)
    assert invoice.status == "overdrawn" and account.outstanding_debt == invoice.amount_due == 300_000
    assert await world.meter.repay("c") == 300_000
    assert (await world.meter.account("c")).outstanding_debt == 0
    assert (await world.meter.store.invoices(account.id))[0].status == "paid"


async def test_model_d_pro_100k_worked_example(world: World) -> None:
    await add(world, "d", "included-capped", date(2025, 12, 6))
    world.clock.set("2025-12-20T00:00:00+00:00")
    assert await world.send("d", 135_640) == 135_640
    usage = (await world.meter.usage("d")).as_json()
    assert usage["dashboard"] == [
        "Pro 100k",
        "Dec 6 - Jan 5",
        "35,738 extra emails",
        "135,640 emails sent",
        "135,738 total allowed",
        "$214 spent",
        "$599 spending limit",
        "98 emails remaining",
    ]
    assert len(await world.charges("d")) == 214
    await world.send("d", 98)  # email 135,738: still within charge 214
    assert len(await world.charges("d")) == 214
    await world.send("d", 1)  # email 135,739 triggers charge 215
    charges = await world.charges("d")
    assert len(charges) == 215 and charges[-1]["seq"] == 215 and charges[-1]["emails_unlocked"] == 167
    # The $599 spending limit allows 100,000 + 599 x 167 = 200,033 emails, then pauses sending.
    assert await world.send("d", 100_000) == 200_033 - 135_739
    grant = await world.meter.reserve("d", None, 1)
    assert (grant.granted, grant.refusal) == (0, "spending_limit")
    await world.meter.release(grant.hold_id)
    assert len(await world.charges("d")) == 599
    await world.meter.set_spending_limit("d", 700_000_000)  # raising the limit resumes sending
    assert await world.send("d", 1) == 1
    assert len(await world.charges("d")) == 600


async def test_model_e_overage_alerts_payment_and_limits(world: World) -> None:
    await add(world, "e", "limit-overage", date(2026, 4, 1))
    world.clock.set("2026-04-05T00:00:00+00:00")
    await world.send("e", 37_500, campaign="spring")  # 75%
    await world.send("e", 13_700, campaign="launch")  # 51,200 sent: 1,200 over
    charges = await world.charges("e")
    assert [(c["kind"], c["amount"], c["emails_unlocked"]) for c in charges] == [("block", 1_000_000, 5000)]
    account = await world.meter.account("e")
    alerts = {row["key"] for row in await world.meter.store.notices_of(account.id)}
    assert alerts == {"alert/75", "alert/90", "alert/100"}
    await world.send("e", 10)
    assert len(await world.meter.store.notices_of(account.id)) == 3  # each once per period
    usage = (await world.meter.usage("e")).as_json()
    assert usage["by_campaign"] == {"spring": 37_500, "launch": 13_700, "(untagged)": 10}
    assert usage["by_region"] == {"eu-1": 51_210}
    # A failed payment blocks sending at once; a fixed one releases it at once.
    await world.meter.set_payment("e", False, "card declined")
    grant = await world.meter.reserve("e", None, 1)
    assert (grant.granted, grant.refusal) == (0, "payment_failed")
    await world.meter.release(grant.hold_id)
    await world.meter.set_payment("e", True)
    assert await world.send("e", 1) == 1
    world.clock.set("2026-05-01T00:00:00+00:00")
    await world.billing.close_due_periods()
    invoice = json.loads((await world.meter.store.invoices(account.id))[0].body)
    assert invoice["lines"][0]["description"] == "Email overage: 1,211 emails. Cost: $1"


async def test_model_e_invoice_line_exactly_as_documented(world: World) -> None:
    await add(world, "e", "limit-overage", date(2026, 4, 1))
    world.clock.set("2026-04-05T00:00:00+00:00")
    await world.send("e", 51_200)
    world.clock.set("2026-05-01T00:00:00+00:00")
    await world.billing.close_due_periods()
    invoice = json.loads((await world.meter.store.invoices())[0].body)
    assert invoice["lines"][0]["description"] == "Email overage: 1,200 emails. Cost: $1"
    assert invoice["lines"][0]["amount"] == "1.00"
    assert invoice["total"] == "0.00"  # the $1 was charged during the month


async def test_model_e_limit_increase_now_decrease_at_period_end(world: World) -> None:
    await add(world, "e", "limit-overage", date(2026, 4, 1))
    world.clock.set("2026-04-05T00:00:00+00:00")
    await world.meter.set_email_limit("e", "included", 60_000)  # increase: at once
    await world.send("e", 55_000)
    assert await world.charges("e") == []  # 55,000 is within the raised limit
    await world.meter.set_email_limit("e", "included", 40_000)  # decrease: at period end
    assert (await world.meter.usage("e")).as_json()["total_allowed"] == 60_000
    world.clock.set("2026-05-02T00:00:00+00:00")
    assert (await world.meter.usage("e")).as_json()["total_allowed"] == 40_000


async def test_mid_period_charges_survive_restart_and_are_never_doubled(world: World, tmp_path: Path) -> None:
    await add(world, "d", "included-capped", date(2026, 4, 1))
    world.clock.set("2026-04-02T00:00:00+00:00")
    await world.send("d", 100_500)
    first = await world.charges("d")
    await world.meter.store.close()
    await world.meter.store.open()  # a restart: the ledger is in the file
    await world.send("d", 1)
    again = await world.charges("d")
    assert [c["idempotency_key"] for c in again[: len(first)]] == [c["idempotency_key"] for c in first]
    assert len({c["idempotency_key"] for c in again}) == len(again)


async def test_billing_pass_over_many_accounts_closes_only_ended_periods_and_shares_the_loop(world: World) -> None:
    """The pass runs on the relay's loop every minute: it reads every account's last invoiced
    period in one query and hands the loop back to SMTP sessions while it walks the accounts."""
    for number in range(3):
        await add(world, f"old{number}", "per-email-threshold", date(2026, 3, 1))
    for number in range(520):  # no password: hashing one takes tens of milliseconds by design
        await world.meter.add_account(
            f"new{number:03d}", None, "per-email-threshold", ["example.com"], [], subscribed_on=date(2026, 4, 1)
        )
    world.clock.set("2026-04-02T00:00:00+00:00")
    assert sorted(await world.billing.close_due_periods()) == [f"INV-old{n}-20260301" for n in range(3)]

    accounts = await world.meter.store.list_accounts()
    assert len(accounts) == 523 and all(a.domains == ("example.com",) for a in accounts)

    class CountingPlans(dict):  # type: ignore[type-arg]
        """The plans, counting the pass's look-ups: one per account walked."""

        looked_up = 0

        def get(self, key: object, default: object = None) -> object:
            CountingPlans.looked_up += 1
            return super().get(key, default)

    world.meter.plans = CountingPlans(world.meter.plans)
    seen_mid_walk: list[int] = []

    async def ticker() -> None:
        while True:
            await asyncio.sleep(0)
            if 0 < CountingPlans.looked_up < len(accounts):
                seen_mid_walk.append(CountingPlans.looked_up)

    task = asyncio.create_task(ticker())
    assert await world.billing.close_due_periods(accounts) == []  # March is invoiced, April not over
    task.cancel()
    assert CountingPlans.looked_up == len(accounts)
    assert seen_mid_walk  # another task ran while the pass was between accounts


async def test_periods_are_per_anchor_and_move_on_at_the_boundary(world: World) -> None:
    """The meter remembers each plan's current period; it must not hand one account's
    anniversary period to another, nor keep a period past its end."""
    await add(world, "d6", "included-capped", date(2025, 12, 6))
    await add(world, "d20", "included-capped", date(2025, 12, 20))
    d6, d20 = await world.meter.account("d6"), await world.meter.account("d20")
    at = datetime(2026, 4, 10, 12, tzinfo=timezone.utc)
    assert world.meter.period_of(d6, at).start.day == 6 and world.meter.period_of(d20, at).start.day == 20
    assert world.meter.period_of(d6, at) != world.meter.period_of(d20, at)
    end = world.meter.period_of(d6, at).end
    assert world.meter.period_of(d6, end).start == end  # the next period, not the remembered one


async def close_one(world: World, name: str, at: str) -> dict[str, Any]:
    """Close the account's ended periods at `at` and return its last invoice's body."""
    world.clock.set(at)
    await world.billing.close_due_periods()
    account = await world.meter.account(name)
    record = (await world.meter.store.invoices(account.id))[-1]
    body: dict[str, Any] = json.loads(record.body)
    body["status"] = record.status
    return body


def invoice_lines(body: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(line["kind"], line["description"], line["amount"]) for line in body["lines"]]


async def test_model_e_limit_raised_after_the_overage_was_charged_keeps_the_charge(world: World) -> None:
    """Issue 15, item 1: 50,000 limit, 52,000 sent ($1 charged at once), limit raised to
    60,000. The invoice shows the overage that was charged; total 0.00, not -1.00."""
    await add(world, "e", "limit-overage", date(2026, 4, 1))
    world.clock.set("2026-04-10T00:00:00+00:00")
    assert await world.send("e", 52_000) == 52_000
    world.clock.set("2026-04-12T00:00:00+00:00")
    await world.meter.set_email_limit("e", "included", 60_000)
    usage = (await world.meter.usage("e")).as_json()
    assert (usage["total_allowed"], usage["emails_remaining_before_next_charge"]) == (63_000, 11_000)
    await world.meter.store.close()
    await world.meter.store.open()  # the period's history is in the database, not in memory
    body = await close_one(world, "e", "2026-05-01T00:00:00+00:00")
    assert invoice_lines(body) == [
        ("usage", "Email overage: 2,000 emails. Cost: $1", "1.00"),
        ("in_period_charges", "Charged during the period: 1 usage charge", "-1.00"),
    ]
    assert (body["total"], body["amount_due"], body["status"]) == ("0.00", "0.00", "paid")


async def test_model_e_overage_adds_up_across_a_raise_and_alerts_measure_the_new_limit(world: World) -> None:
    await add(world, "e", "limit-overage", date(2026, 4, 1))
    world.clock.set("2026-04-10T00:00:00+00:00")
    await world.send("e", 52_000)
    await world.meter.set_email_limit("e", "included", 60_000)
    await world.send("e", 11_000)  # 63,000: the $1 block covers overage emails 2,001-5,000
    assert len(await world.charges("e")) == 1
    await world.send("e", 1)  # 63,001: overage email 5,001 opens the second block
    charges = await world.charges("e")
    assert [(c["seq"], c["description"]) for c in charges][-1] == (
        2,
        "Usage charge 2: $1 for 5,000 more emails (emails 63,001 to 68,000 of the period)",
    )
    account = await world.meter.account("e")
    keys = sorted(row["key"] for row in await world.meter.store.notices_of(account.id))
    assert keys == ["alert/100", "alert/100@60000", "alert/75", "alert/90", "alert/90@60000"]
    body = await close_one(world, "e", "2026-05-01T00:00:00+00:00")
    assert invoice_lines(body)[0] == ("usage", "Email overage: 5,001 emails. Cost: $2", "2.00")
    assert body["total"] == "0.00"


async def test_model_d_worked_example_across_a_mid_period_upgrade(world: World) -> None:
    """Pro 100k at the document's 135,640 emails, upgraded to Pro 200k on Dec 20."""
    await add(world, "d", "included-capped", date(2025, 12, 6))
    world.clock.set("2025-12-20T00:00:00+00:00")
    assert await world.send("d", 135_640) == 135_640
    world.clock.set("2025-12-20T12:00:00+00:00")
    switch = await world.meter.set_plan("d", "included-capped-200k")
    assert (switch.kind, switch.at_once) == ("upgrade", True)
    account = await world.meter.account("d")
    assert (account.plan, account.plan_change) == ("included-capped-200k", None)
    usage = (await world.meter.usage("d")).as_json()
    assert usage["dashboard"] == [
        "Pro 200k",
        "Dec 6 - Jan 5",
        "0 extra emails",
        "135,640 emails sent",
        "200,000 total allowed",
        "$214 spent",
        "$999 spending limit",
        "64,360 emails remaining",
    ]
    assert await world.send("d", 64_360) == 64_360  # emails 135,641-200,000: within the new allowance
    assert len(await world.charges("d")) == 214
    assert await world.send("d", 250) == 250  # email 200,001 opens a $1 block of 250
    charges = await world.charges("d")
    assert (len(charges), charges[-1]["seq"], charges[-1]["emails_unlocked"]) == (215, 215, 250)
    # The $999 limit counts the $214 spent under Pro 100k: 784 more blocks, then it pauses.
    assert await world.send("d", 1_000_000) == 784 * 250
    body = await close_one(world, "d", "2026-01-06T00:00:00+00:00")
    assert invoice_lines(body) == [
        ("fee", "Plan fee: Pro 200k", "199.00"),
        ("plan_part", "Pro 100k, Dec 6 - Dec 20: emails 1 to 135,640", "0.00"),
        ("usage", "Email overage: 35,640 emails. Cost: $214", "214.00"),
        ("in_period_charges", "Charged during the period: 214 usage charges", "-214.00"),
        ("plan_part", "Pro 200k, Dec 20 - Jan 5: emails 135,641 to 396,250", "0.00"),
        ("usage", "Email overage: 196,250 emails. Cost: $785", "785.00"),
        ("in_period_charges", "Charged during the period: 785 usage charges", "-785.00"),
    ]
    assert (body["plan"], body["total"]) == ("included-capped-200k", "199.00")


async def test_a_downgrade_takes_effect_at_the_period_end_and_drops_the_accounts_limits(world: World) -> None:
    await add(world, "e", "limit-overage-100k", date(2026, 4, 1))
    world.clock.set("2026-04-10T00:00:00+00:00")
    await world.meter.set_email_limit("e", "included", 120_000)
    await world.send("e", 80_000)
    switch = await world.meter.set_plan("e", "limit-overage")
    assert (switch.kind, switch.at_once, switch.effective.isoformat()) == (
        "downgrade",
        False,
        "2026-05-01T00:00:00+00:00",
    )
    account = await world.meter.account("e")
    assert account.plan == "limit-overage-100k" and account.plan_change is not None
    assert await world.send("e", 30_000) == 30_000
    assert await world.charges("e") == []  # April stays on 100,000 a month (raised to 120,000)
    world.clock.set("2026-05-02T00:00:00+00:00")  # in force from May 1, before any billing pass
    assert (await world.meter.usage("e")).as_json()["plan"] == "limit-overage"
    assert await world.send("e", 50_001) == 50_001
    assert [c["period_key"] for c in await world.charges("e")] == ["2026-05-01T00:00:00Z"]
    april = await close_one(world, "e", "2026-05-02T00:00:00+00:00")
    assert (april["plan"], april["period"], april["total"]) == ("limit-overage-100k", "Apr 1 - Apr 30", "0.00")
    await world.meter.set_email_limit("e", "quota", 900_000)  # the next admin change makes it stick
    account = await world.meter.account("e")
    assert (account.plan, account.plan_change, account.included_change) == ("limit-overage", None, None)
    assert account.quota_change is not None and account.quota_change.new == 900_000


async def test_plans_that_cannot_follow_each_other_are_refused_and_nothing_changes(world: World) -> None:
    from mailmeter.policies import PlanChangeRefused

    await add(world, "e", "limit-overage", date(2026, 4, 1))
    world.clock.set("2026-04-10T00:00:00+00:00")
    with pytest.raises(PlanChangeRefused):
        await world.meter.set_plan("e", "included-capped")
    account = await world.meter.account("e")
    assert (account.plan, account.plan_change) == ("limit-overage", None)


async def test_the_export_of_a_month_reconciles_alone_across_the_plans(world: World) -> None:
    """Accounts on every ready plan send, bounce, top up and are charged in April; the CSV
    export of April adds up to each invoice's total and amount due (tests/metering/test_export.py)."""
    world.clock.set("2026-04-02T08:00:00+00:00")
    for name, plan in (
        ("a", "per-email-threshold"),
        ("b", "prepaid-tiered"),
        ("c", "delivery-results"),
        ("d", "included-capped"),
        ("e", "limit-overage"),
        ("p", "postpay-tiered"),
    ):
        await add(world, name, plan, date(2026, 4, 1))
    await world.meter.add_balance("b", 12_340_000)
    for name, emails in (("a", 1_300_000), ("b", 105_000), ("c", 30), ("d", 100_400), ("e", 56_000), ("p", 7)):
        assert await world.send(name, emails) == emails
    for n in range(30):
        await world.meter.record_result("Q00000003", f"r{n}", "delivered" if n % 3 else "hard_bounced")
    world.clock.set("2026-05-01T12:00:00+00:00")
    await world.billing.close_due_periods()
    await world.billing.collect_charges()
    service = AdminService(world.meter, world.billing, actor="test")
    records = await world.meter.store.invoices()
    assert len(records) == 6
    text = await service.export_csv("2026-04")
    reconcile(text, records)
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [(r["amount"], r["charge_status"]) for r in rows if r["account"] == "b" and r["record"] == "payment"] == [
        ("-104.00", "")
    ]  # 100,000 x $0.001 + 5,000 x $0.0008, paid from $112.34: $8.34 carries over
    assert {r["item"] for r in rows if r["account"] == "b" and r["record"] == "charge"} == {"monthly"}


async def test_an_existing_database_upgrades_with_its_invoiced_periods_settled(tmp_path: Path) -> None:
    """Migration 4 on a database of schema 3: each account's last invoiced period is its
    settled and credited one, so only periods after it are credited from then on."""
    import sqlite3

    from mailmeter.metering.sqlite.schema import MIGRATIONS

    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        db.execute("INSERT INTO schema_version VALUES (3)")
        for script in MIGRATIONS[:3]:
            db.executescript(script)
        db.execute(
            "INSERT INTO accounts (id, name, plan, subscribed_on, created_at, prepaid_balance)"
            " VALUES (1, 'b', 'prepaid-tiered', '2026-01-01', '2026-01-01T00:00:00+00:00', 7000000)"
        )
        for key in ("2026-01-31T23:00:00Z", "2026-02-28T23:00:00Z"):
            db.execute(
                "INSERT INTO invoices (id, account_id, period_key, period_end, issued_at, invoice_date,"
                " due_date, statement_date, total, amount_due, prepaid_applied, status, body)"
                " VALUES (?, 1, ?, '', '', '', '', '', 0, 0, 0, 'paid', '{}')",
                (f"INV-{key}", key),
            )
    store = SqliteStore(path)
    await store.open()
    try:
        assert await store.schema_version() == len(MIGRATIONS)
        account = await store.get_account("b")
        assert account is not None
        assert (account.settled_through, account.credited_through) == ("2026-02-28T23:00:00Z",) * 2
        assert account.monthly_payments == () and account.prepaid_balance == 7_000_000
    finally:
        await store.close()


async def test_a_deleted_account_is_invoiced_for_the_period_it_was_deleted_in_and_no_later(world: World) -> None:
    """`account delete` (issue 17): the period of the deletion is invoiced when it ends (its
    usage stays billed), no period after it is, and the account no longer logs in."""
    await add(world, "gone", "per-email-threshold", date(2026, 4, 1))
    world.clock.set("2026-04-10T10:00:00+00:00")
    assert await world.send("gone", 1000) == 1000
    world.clock.set("2026-04-20T10:00:00+00:00")
    deleted = await world.meter.delete_account("gone")
    assert deleted.deleted_at == world.clock.now and deleted.suspended
    assert await world.meter.authenticate("gone", b"pw") is None
    assert (await world.meter.reserve("gone", None, 1)).refusal == "suspended"
    world.clock.set("2026-07-02T12:00:00+00:00")
    assert await world.billing.close_due_periods() == ["INV-gone-20260401"]
    assert await world.billing.close_due_periods() == []
    [invoice] = await world.meter.store.invoices((await world.meter.account("gone")).id)
    assert json.loads(invoice.body)["period_start"].startswith("2026-04-01")
