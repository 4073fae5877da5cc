"""A hold belongs to one account and one period: the meter itself refuses anything else.

SMTP in answers AUTH inside a transaction with 503 (tests/test_relay_smtp.py), so a
session cannot move its transaction to another account. These tests hold the meter to
the same rule on its own, on SQLite, PostgreSQL and PostgreSQL with allowance leasing:
adding to a hold, or committing it, under another account than the hold's own is
refused and changes nothing; and a transaction that straddles a period boundary stays
in the period it began in.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from mailmeter.metering.leases import LeaseSettings
from mailmeter.metering.meter import Meter
from mailmeter.metering.postgres import PgStore
from mailmeter.metering.records import Account, HoldAccountMismatch, LeasedCommit, UnknownHold
from mailmeter.metering.store import Store
from mailmeter.policies import parse_plans
from mailmeter.policies.decision import Admission, Usage
from tests.metering.test_billing_meter import Clock, store  # noqa: F401  (store: the three stores, a fixture)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
async def meter(store: Store, request: pytest.FixtureRequest) -> AsyncIterator[Meter]:  # noqa: F811
    config = yaml.safe_load((REPO / "config.example.yaml").read_text())
    leasing = LeaseSettings(emails=50) if request.node.callspec.params["store"] == "postgres-leases" else None
    clock = Clock(datetime(2026, 4, 30, 23, 59, 58, tzinfo=timezone.utc))
    meter = Meter(store, parse_plans(config["plans"]), node="n1", clock=clock, region="eu-1", leasing=leasing)
    for name in ("a", "b"):
        await meter.add_account(name, "pw", "starter", ["example.com"], [])
    yield meter


async def counters(meter: Meter, name: str, at: str | None = None) -> tuple[int, int]:
    """(accepted, reserved) of the account in the period containing `at` (default: now),
    leased emails that no session holds given back first."""
    await meter.tend_leases(force=True)
    when = datetime.fromisoformat(at) if at else None
    usage = (await meter.usage(name, when)).usage
    return usage.accepted, usage.reserved


async def test_a_hold_is_added_to_and_committed_only_under_its_own_account(meter: Meter) -> None:
    assert (await meter.reserve("a", "h1", 2)).granted == 2
    with pytest.raises(HoldAccountMismatch):
        await meter.reserve("b", "h1", 1)  # b's emails into a's hold
    with pytest.raises(HoldAccountMismatch):
        await meter.commit("h1", "Q1", 2, account="b")  # a's hold billed as b's message
    # Nothing moved: a still holds its two, b has nothing.
    assert await counters(meter, "a") == (0, 2)
    assert await counters(meter, "b") == (0, 0)
    assert not await meter.message_committed("Q1")
    await meter.commit("h1", "Q1", 2, account="a")
    assert await counters(meter, "a") == (2, 0)
    assert await counters(meter, "b") == (0, 0)
    assert (await meter.account("a")).awaiting_results == 2
    assert (await meter.account("b")).awaiting_results == 0


async def test_the_store_refuses_another_accounts_hold_on_its_own(meter: Meter) -> None:
    """The same refusals one level down, each in the store's own transaction; on
    PostgreSQL also the batch commit of leased emails (a lease's emails never go to
    another account)."""
    store = meter.store
    a, b = await meter.account("a"), await meter.account("b")
    period, now = meter.period_of(a).key, meter.clock()
    assert (await store.reserve(a.id, period, "h1", "n1", 1, now, grant_all)).granted == 1
    with pytest.raises(HoldAccountMismatch):
        await store.reserve(b.id, period, "h1", "n1", 1, now, grant_all)
    with pytest.raises(HoldAccountMismatch):
        await store.commit("h1", "Q1", 1, "n1", now, account_id=b.id)
    assert await counters(meter, "a") == (0, 1)
    assert await counters(meter, "b") == (0, 0)
    await store.commit("h1", "Q1", 1, "n1", now, account_id=a.id)
    assert await counters(meter, "a") == (1, 0)
    if not isinstance(store, PgStore):
        return
    assert (await store.renew_lease("lease/t", a.id, period, "n1", 0, False, now, grant_all)).granted == 1
    outcomes = await store.commit_leased([LeasedCommit("lease/t", b.id, period, "Q2", 1)], "n1", now, "eu-1", None)
    assert [type(outcome) for outcome in outcomes] == [UnknownHold]  # b has no such lease: nothing counted
    assert await counters(meter, "b") == (0, 0)
    assert await counters(meter, "a") == (1, 1)
    outcomes = await store.commit_leased([LeasedCommit("lease/t", a.id, period, "Q2", 1)], "n1", now, "eu-1", None)
    assert outcomes == [None]
    assert await counters(meter, "a") == (2, 0)


def grant_all(account: Account, usage: Usage) -> Admission:
    return Admission(granted=1, refusal=None, remaining=None)


async def test_a_transaction_straddling_a_period_boundary_stays_in_its_period(meter: Meter) -> None:
    """One RCPT at 23:59:58 on April 30, the next after midnight: both emails are held,
    and committed, in April (where the commit counts them); May holds nothing."""
    assert (await meter.reserve("a", "h1", 1)).granted == 1
    meter.clock.set("2026-05-01T00:00:02+00:00")  # type: ignore[attr-defined]
    assert (await meter.reserve("a", "h1", 1)).granted == 1
    april, may = "2026-04-30T12:00:00+00:00", "2026-05-01T12:00:00+00:00"
    assert await counters(meter, "a", april) == (0, 2)
    assert await counters(meter, "a", may) == (0, 0)
    await meter.commit("h1", "Q1", 2, account="a")
    assert await counters(meter, "a", april) == (2, 0)
    assert await counters(meter, "a", may) == (0, 0)
