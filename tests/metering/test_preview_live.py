"""`plan preview` held to the live meter: one script, run both ways, the same results.

Each script (a plan, a number of emails spread over one period, a starting balance and
events at email counts: limit changes, plan changes, top-ups, payments failed and fixed)
goes through the admin service's preview, and through the real meter on each store
(SQLite, PostgreSQL, PostgreSQL with allowance leasing): the attempts between events
reserved and committed as the relay does, each event applied through the same admin
service calls the CLI and the API make, at the instant the preview places it, and the
period closed by the billing job. The accepted and refused attempts (with the reason of
each run of refusals), every in-period charge, and the closing invoice must be equal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from typing import Any

import pytest

from mailmeter.policies.money import parse_money
from mailmeter.service import AdminService
from tests.metering.test_billing_meter import World, add, store, world  # noqa: F401  (fixtures: every store)


@dataclass(frozen=True)
class Script:
    plan: str
    emails: int
    start: date
    balance: str | None = None
    events: list[dict[str, Any]] = field(default_factory=list)


SCRIPTS = {
    # Model E: the limit raised after an overage was charged, a failed payment and its fix,
    # an upgrade to 100,000 a month, then a downgrade back that waits for the period's end.
    "e-raise-payment-upgrade": Script(
        "limit-overage",
        110_000,
        date(2026, 4, 1),
        events=[
            {"at": 52_000, "type": "limit", "which": "included", "emails": 60_000},
            {"at": 56_000, "type": "payment", "state": "failed"},
            {"at": 58_000, "type": "payment", "state": "ok"},
            {"at": 66_000, "type": "plan", "plan": "limit-overage-100k"},
            {"at": 100_000, "type": "plan", "plan": "limit-overage"},
        ],
    ),
    # Model B: the month's $100.00 payment (credited as the period starts) is good for
    # 100,000 emails, then refusals, then a top-up.
    "b-balance-top-up": Script(
        "prepaid-tiered",
        150_000,
        date(2026, 4, 1),
        events=[
            {"at": 120_000, "type": "top_up", "amount": "10.00"},
        ],
    ),
    # Model D: a low spending limit pauses sending, an upgrade to Pro 200k (its own $999
    # limit, counting the $50 spent) resumes it.
    "d-spending-upgrade": Script(
        "included-capped",
        250_000,
        date(2025, 12, 6),
        events=[
            {"at": 0, "type": "limit", "which": "spending", "amount": "50.00"},
            {"at": 120_000, "type": "plan", "plan": "included-capped-200k"},
        ],
    ),
    # Model A: $250 thresholds, the included emails raised mid-month, a payment failure.
    "a-threshold-raise": Script(
        "per-email-threshold",
        4_150_000,
        date(2026, 4, 1),
        events=[
            {"at": 2_000_000, "type": "limit", "which": "included", "emails": 2_500_000},
            {"at": 3_000_000, "type": "payment", "state": "failed"},
            {"at": 3_100_000, "type": "payment", "state": "ok"},
        ],
    ),
}


def send_time(begin: datetime, end: datetime, emails: int, attempt: int) -> datetime:
    """When attempt `attempt` of `emails` spread evenly over [begin, end) is made."""
    if attempt <= 0:
        return begin
    span = (end - begin) // timedelta(microseconds=1)
    return begin + timedelta(microseconds=span * (attempt - 1) // emails)


async def apply_event(service: AdminService, name: str, event: dict[str, Any]) -> None:
    """An event as an operator applies it: the admin service the CLI and the API call."""
    if event["type"] == "limit":
        value = event["amount"] if event["which"] == "spending" else event["emails"]
        await service.set_limit(name, event["which"], value)
    elif event["type"] == "plan":
        await service.set_plan(name, event["plan"])
    elif event["type"] == "top_up":
        await service.add_balance(name, event["amount"])
    else:
        await service.payment(name, event["state"])


async def run_live(world: World, service: AdminService, script: Script, name: str) -> dict[str, Any]:
    """The script through the meter; returns what the preview reports, as the meter saw it."""
    meter = world.meter
    plan = meter.plans[script.plan]
    begin = datetime.combine(script.start, time(0), tzinfo=plan.period.zone())
    world.clock.now = begin
    await add(world, name, script.plan, script.start)
    if script.balance is not None:
        await service.add_balance(name, script.balance)
    end = meter.period_of(await meter.account(name), begin).end
    accepted = attempted = 0
    refusals: list[tuple[int, int, str]] = []
    for stop in sorted({event["at"] for event in script.events} | {script.emails}):
        if stop > attempted:
            world.clock.now = send_time(begin, end, script.emails, attempted + 1)
            took, reason = 0, None
            while took < stop - attempted:  # the relay's client retries what it may send now
                grant = await meter.reserve(name, None, stop - attempted - took)
                if grant.granted == 0:
                    await meter.release(grant.hold_id)
                    reason = grant.refusal
                    break
                world.sent += 1
                await meter.commit(grant.hold_id, f"L{world.sent:08d}", grant.granted)
                took += grant.granted
            if took < stop - attempted:
                assert reason is not None
                refusals.append((attempted + took + 1, stop, reason))
            accepted += took
            attempted = stop
        for event in (event for event in script.events if event["at"] == stop):
            world.clock.now = send_time(begin, end, script.emails, stop)
            await apply_event(service, name, event)
    account = await meter.account(name)
    # The preview counts the monthly payment (model B) in the starting balance, not as a charge.
    charges = [row for row in await meter.store.charges_of(account.id) if row["kind"] not in ("invoice", "monthly")]
    world.clock.now = end + timedelta(days=1)
    [invoice_id] = [key for key in await world.billing.close_due_periods() if key.startswith(f"INV-{name}-")]
    invoice = await service.invoice(invoice_id)
    return {
        "accepted": accepted,
        "refused": script.emails - accepted,
        "refusals": refusals,
        "charges": [
            (f"{row['kind']}/{row['seq']}", row["amount"], row["emails_unlocked"], row["description"])
            for row in sorted(charges, key=lambda row: row["seq"])
        ],
        "plan_change": None if account.plan_change is None else account.plan_change.plan,
        "invoice": invoice,
    }


@pytest.mark.parametrize("script_name", sorted(SCRIPTS))
async def test_the_live_meter_bills_a_script_exactly_as_its_preview(world: World, script_name: str) -> None:
    script = SCRIPTS[script_name]
    service = AdminService(world.meter, world.billing, actor="test")
    previewed = service.preview(script.plan, script.emails, script.start, balance=script.balance, events=script.events)
    live = await run_live(world, service, script, "live")
    assert (live["accepted"], live["refused"]) == (previewed["accepted"], previewed["refused"])
    assert live["refusals"] == [(run["first"], run["last"], run["reason"]) for run in previewed["refusals"]]
    assert live["charges"] == [
        (charge["key"], parse_money(charge["amount"]), charge["emails_unlocked"], charge["description"])
        for charge in previewed["charges"]
    ]
    expected = previewed["invoice"]
    invoice = live["invoice"]
    assert invoice["lines"] == expected["lines"]
    assert (invoice["total"], invoice["prepaid_applied"], invoice["amount_due"]) == (
        expected["total"],
        expected["prepaid_applied"],
        expected["amount_due"],
    )
    assert (invoice["invoice_date"], invoice["due_date"]) == (expected["invoice_date"], expected["due_date"])
    assert live["plan_change"] == (previewed["plan_change"] or {}).get("plan")
    assert invoice["plan_display_name"] == previewed["plan_at_end"]
    assert not invoice["total"].startswith("-")


def test_the_scripts_cover_every_kind_of_event_and_the_worked_figures() -> None:
    kinds = {(event["type"], event.get("which")) for script in SCRIPTS.values() for event in script.events}
    assert kinds >= {("limit", "included"), ("limit", "spending"), ("plan", None), ("top_up", None), ("payment", None)}
