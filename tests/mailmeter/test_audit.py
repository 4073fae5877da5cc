"""The audit trail: every admin change, from the CLI or the API, with who made it."""

from __future__ import annotations

import asyncio
import getpass
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from mailmeter.audit import account_view
from mailmeter.metering.meter import Meter, UnknownAccount
from mailmeter.metering.records import AuditDraft, DuplicateEvent
from mailmeter.metering.sqlite import SqliteStore
from mailmeter.policies.currency import USD
from mailmeter.policies.plans import parse_plans
from tests.conftest import PASSWORD, write_config
from tests.mailmeter.test_api import BILLING_TOKEN, NEW_ACCOUNT, Api, start_api  # noqa: F401 (a fixture)
from tests.mailmeter.test_cli_and_service import mailmeter

CLI_ACTOR = f"cli:{getpass.getuser()}"


def test_cli_changes_are_audited_with_the_local_user(tmp_path: Path) -> None:
    config = write_config(tmp_path, 2526)
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    steps = [
        (
            "account",
            "add",
            "app",
            "--password-file",
            str(tmp_path / "pw"),
            "--plan",
            "small",
            "--sender-domain",
            "example.com",
        ),
        ("payment", "failed", "app", "--reason", "card expired"),
        ("balance", "add", "app", "12.50"),
        ("limit", "quota", "app", "500"),
        ("billing", "run"),
    ]
    for step in steps:
        result = mailmeter(config, *step)
        assert result.returncode == 0, result.stderr
    refused = mailmeter(config, "balance", "add", "app", "1.5e3")  # refused: no change, no event
    assert refused.returncode == 2

    listed = mailmeter(config, "audit", "--account", "app", "--json")
    assert listed.returncode == 0, listed.stderr
    events = json.loads(listed.stdout)
    assert [e["action"] for e in events] == ["limit.quota", "balance.add", "payment.failed", "account.add"]
    assert {e["actor"] for e in events} == {CLI_ACTOR}
    added, failed = events[3], events[2]
    assert added["before"] is None and added["after"]["sender_domains"] == ["example.com"]
    assert failed["changes"]["payment_state"] == ["ok", "failed"]
    assert failed["detail"] == {"reason": "card expired"}
    assert events[1]["changes"]["prepaid_balance"] == ["0.00", "12.50"]
    assert PASSWORD not in listed.stdout and "scrypt" not in listed.stdout

    text = mailmeter(config, "audit")  # every target, newest first, one line each
    lines = text.stdout.splitlines()
    assert lines[0].split("\t")[1:4] == [CLI_ACTOR, "billing.run", "billing"]
    assert "payment_state: ok -> failed" in text.stdout
    ghost = mailmeter(config, "audit", "--account", "ghost")
    assert ghost.returncode == 1 and "no account named 'ghost'" in ghost.stderr


async def test_api_and_cli_changes_share_one_trail_with_their_actors(
    start_api: Callable[..., Awaitable[Api]],  # noqa: F811 (the fixture imported above)
) -> None:
    api: Api = await start_api()
    await api.call("POST", "/v1/accounts", NEW_ACCOUNT)
    await api.call("POST", "/v1/accounts/app/balance", {"amount": "5.00"}, token=BILLING_TOKEN)
    await api.call("POST", "/v1/accounts/app/balance", {"amount": "five"})  # refused: not audited
    config = api.harness.directory / "config.yaml"
    cli = await asyncio.to_thread(mailmeter, config, "payment", "failed", "app")
    assert cli.returncode == 0, cli.stderr
    await api.call("POST", "/v1/billing/run", token=BILLING_TOKEN)

    status, events = await api.call("GET", "/v1/audit")
    assert status == 200
    assert [(e["actor"], e["action"], e["target"]) for e in events] == [
        ("billing", "billing.run", "billing"),
        (CLI_ACTOR, "payment.failed", "app"),
        ("billing", "balance.add", "app"),
        ("ops", "account.add", "app"),
    ]
    assert events[0]["after"]["invoices"] == [] and events[0]["before"] is None
    status, only_app = await api.call("GET", "/v1/audit?account=app&limit=2")
    assert [e["action"] for e in only_app] == ["payment.failed", "balance.add"]
    for query, code in (("?limit=0", 400), ("?limit=x", 400), ("?account=ghost", 404)):
        status, body = await api.call("GET", "/v1/audit" + query)
        assert status == code and body["error"], query
    assert PASSWORD not in json.dumps(events) and "scrypt" not in json.dumps(events)


@pytest.fixture
async def meter(tmp_path: Path) -> Any:
    store = SqliteStore(tmp_path / "meter.db")
    await store.open()
    meter = Meter(store, parse_plans({"small": {"email_quota": 10}}), node="n1")
    await meter.add_account("app", PASSWORD, "small", ["example.com"], [])
    yield meter
    await store.close()


def _draft(action: str, target: str = "app", event_id: str | None = None) -> AuditDraft:
    return AuditDraft(
        at=datetime.now(UTC),
        actor="test",
        action=action,
        target=target,
        view=partial(account_view, currency=USD),
        event_id=event_id,
    )


async def test_an_audit_event_commits_or_rolls_back_with_its_change(meter: Meter) -> None:
    store = meter.store
    async with store.audited(_draft("payment.ok", event_id="evt_1")) as draft:
        await meter.set_payment("app", False, "declined")
    assert draft.written and draft.before is not None and draft.after is not None
    assert (draft.before["payment_state"], draft.after["payment_state"]) == ("ok", "failed")
    # The same event id again: the insert fails, and the change it came with is rolled back.
    with pytest.raises(DuplicateEvent):
        async with store.audited(_draft("payment.ok", event_id="evt_1")):
            await meter.set_payment("app", True, "released")
    assert (await meter.account("app")).payment_ok is False
    # A change to no account writes no event; transactions outside the block write none either.
    with pytest.raises(UnknownAccount):
        async with store.audited(_draft("payment.ok", target="ghost")):
            await meter.set_payment("ghost", True)
    await meter.set_payment("app", True)
    rows = await store.audit_events()
    assert [(row["action"], row["target"], row["event_id"]) for row in rows] == [("payment.ok", "app", "evt_1")]


def test_the_monthly_payment_from_the_cli_applies_next_period_and_is_audited(tmp_path: Path) -> None:
    plans = {
        "b": {"price": {"kind": "flat", "amount": "0.01"}, "funding": {"kind": "prepaid", "monthly_payment": "10.00"}},
        "small": {"email_quota": 10},
    }
    config = write_config(tmp_path, 2526, plans=plans)
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    added = mailmeter(
        config,
        "account",
        "add",
        "app",
        "--password-file",
        str(tmp_path / "pw"),
        "--plan",
        "b",
        "--sender-domain",
        "example.com",
        "--monthly-payment",
        "20.00",
    )
    assert added.returncode == 0, added.stderr
    changed = mailmeter(config, "balance", "monthly", "app", "35.00")
    assert changed.returncode == 0, changed.stderr
    result = json.loads(changed.stdout)
    assert (result["monthly_payment"], result["next_monthly_payment"], result["prepaid_balance"]) == (
        "20.00",
        "35.00",
        "20.00",
    )
    usage = json.loads(mailmeter(config, "usage", "app", "--json").stdout)
    assert usage["prepaid"]["next_credit_at"] == result["applies_from"]
    for args, message, status in (
        (("app", "35.005"), "has more decimals than USD has (2)", 2),
        (("ghost", "1.00"), "no account named 'ghost'", 1),
    ):
        refused = mailmeter(config, "balance", "monthly", *args)  # (the API test covers the other refusals)
        assert refused.returncode == status and message in refused.stderr, refused.stderr
    events = json.loads(mailmeter(config, "audit", "--account", "app", "--json").stdout)
    assert [(e["action"], e["actor"]) for e in events] == [("balance.monthly", CLI_ACTOR), ("account.add", CLI_ACTOR)]
    assert events[0]["detail"] == {"amount": "35.00"} and events[1]["detail"]["monthly_payment"] == "20.00"
