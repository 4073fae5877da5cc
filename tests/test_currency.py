"""`billing.currency` end to end: the config refuses what the currency cannot express, and
every amount the relay writes (API, CLI, invoices, CSV export, charges, notices) is in
the currency's minor units and symbol. USD (cents), JPY (none) and BHD (three).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Awaitable, Callable
from datetime import date, datetime, timezone
from pathlib import Path

import pytest
import yaml

from mailmeter.config import ConfigError, load_config
from mailmeter.metering.billing import Billing
from mailmeter.metering.gateway import NoGateway
from mailmeter.metering.meter import Meter
from mailmeter.metering.sqlite import SqliteStore
from mailmeter.notices import notice_text
from mailmeter.policies import parse_plans
from mailmeter.service import AdminError, AdminService
from tests.conftest import write_config
from tests.mailmeter.test_api import NEW_ACCOUNT, Api, start_api  # noqa: F401 (the fixture)
from tests.mailmeter.test_cli_and_service import REPO, mailmeter
from tests.metering.test_billing_meter import Clock

# Per currency: a top-up it accepts and how it is written back, one it refuses.
CASES = {
    "USD": ("25.5", "25.50", "25.001"),
    "JPY": ("2500", "2500", "25.5"),
    "BHD": ("25.125", "25.125", "25.0001"),
}
PLAN = {  # $/¥/BHD 1 a block of 5 past 10 emails, charged as each block opens; a fee of 3
    "plan_fee": "3",
    "included_emails": 10,
    "price": {"kind": "per_block", "amount": "1", "block_emails": 5},
    "in_period_charge": {"kind": "per_block"},
}


def test_an_unknown_currency_or_a_plan_it_cannot_express_fails_at_start(tmp_path: Path) -> None:
    config = write_config(tmp_path, 2526, billing={"currency": "XYZ"})
    with pytest.raises(ConfigError, match="billing.currency: 'XYZ' is not an ISO 4217 currency code"):
        load_config(config)
    example = yaml.safe_load((REPO / "config.example.yaml").read_text())
    example["billing"]["currency"] = "JPY"  # the example's plans are written in cents
    path = tmp_path / "jpy.yaml"
    path.write_text(yaml.safe_dump(example))
    result = mailmeter(path, "serve")
    assert result.returncode == 2
    assert (
        "plans.delivery-results.result_prices.delivered: '0.30' has more decimals than JPY has (none):"
        " write it like 25; a smaller price per email is written per a number of emails" in result.stderr
    )


@pytest.mark.parametrize("code", sorted(CASES))
async def test_the_api_reads_and_writes_amounts_in_the_currency(
    code: str,
    start_api: Callable[..., Awaitable[Api]],  # noqa: F811
) -> None:
    good, written, bad = CASES[code]
    api = await start_api(billing={"currency": code}, plans={"e": PLAN})
    assert (await api.call("POST", "/v1/accounts", {**NEW_ACCOUNT, "plan": "e"}))[0] == 201
    status, result = await api.call("POST", "/v1/accounts/app/balance", {"amount": good})
    assert status == 200 and (result["added"], result["prepaid_balance"]) == (written, written)
    status, error = await api.call("POST", "/v1/accounts/app/balance", {"amount": bad})
    assert status == 400 and f"more decimals than {code} has" in error["error"]
    status, error = await api.call("PUT", "/v1/accounts/app/limits/spending", {"amount": bad})
    assert status == 400 and f"more decimals than {code} has" in error["error"]
    status, usage = await api.call("PUT", "/v1/accounts/app/limits/spending", {"amount": good})
    assert status == 200 and (usage["spending_limit"], usage["currency"]) == (written, code)
    status, plans = await api.call("GET", "/v1/plans")
    fee = {"USD": "3.00", "JPY": "3", "BHD": "3.000"}[code]
    assert [(p["currency"], p["plan_fee"]) for p in plans if p["name"] == "e"] == [(code, fee)]
    status, preview = await api.call("POST", "/v1/plans/e/preview", {"emails": 16})
    block = {"USD": "1.00", "JPY": "1", "BHD": "1.000"}[code]
    assert preview["currency"] == code and [c["amount"] for c in preview["charges"]] == [block, block]


@pytest.mark.parametrize("code", sorted(CASES))
async def test_invoices_export_charges_and_notices_in_the_currency(code: str, tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "meter.db")
    await store.open()
    try:
        await check_a_closed_period(code, store)
    finally:
        await store.close()


async def check_a_closed_period(code: str, store: SqliteStore) -> None:
    from mailmeter.policies.currency import currency_for

    currency = currency_for(code)
    clock = Clock(datetime(2026, 4, 10, tzinfo=timezone.utc))
    meter = Meter(store, parse_plans({"e": PLAN}, currency=currency), node="n1", clock=clock)
    service = AdminService(meter, Billing(meter, NoGateway()), actor="cli:test")
    await meter.add_account(
        "app", "pw", "e", ["example.com"], [], subscribed_on=date(2026, 4, 1), contacts=["billing@app.test"]
    )
    grant = await meter.reserve("app", None, 16)
    await meter.commit(grant.hold_id, "Q1", 16)
    clock.set("2026-05-01T00:00:01+00:00")
    await service.run_billing()

    one = {"USD": "1.00", "JPY": "1", "BHD": "1.000"}[code]
    three = {"USD": "3.00", "JPY": "3", "BHD": "3.000"}[code]
    symbol = {"USD": "$", "JPY": "¥", "BHD": "BHD "}[code]
    charges = await service.charges("app")
    assert [(c["kind"], c["amount"], c["currency"]) for c in charges][:2] == [("block", one, code)] * 2
    assert charges[0]["description"].startswith(f"Usage charge 1: {symbol}1 for 5 more emails")
    [summary] = await service.invoices("app")
    assert (summary["currency"], summary["total"], summary["amount_due"]) == (code, three, three)
    body = await service.invoice(summary["id"])
    assert body["currency"] == code
    assert [(line["description"], line["amount"]) for line in body["lines"]] == [
        ("Plan fee: e", three),
        (f"Email overage: 6 emails. Cost: {symbol}2", {"USD": "2.00", "JPY": "2", "BHD": "2.000"}[code]),
        ("Charged during the period: 2 usage charges", "-" + {"USD": "2.00", "JPY": "2", "BHD": "2.000"}[code]),
    ]
    rows = list(csv.DictReader(io.StringIO(await service.export_csv("2026-04"))))
    assert {row["currency"] for row in rows} == {code}
    assert [row["amount"] for row in rows if row["item"] == "fee"] == [three]
    account = await meter.account("app")
    notice = next(row for row in await store.notices_of(account.id) if row["key"] == "invoice")
    _, text = notice_text("app", "invoice", json.loads(notice["body"]))
    full = {"USD": "$3.00", "JPY": "¥3", "BHD": "BHD 3.000"}[code]
    assert f"total {full}, amount due {full}" in text
    with pytest.raises(AdminError):
        await service.add_balance("app", CASES[code][2])


async def test_a_reload_may_not_change_the_currency_of_the_ledger(make_relay, upstream, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    harness = make_relay(upstream.port, billing={"currency": "BHD"})
    relay = await harness.start()
    changed = load_config(write_config(tmp_path, upstream.port, billing={"currency": "USD"}))
    with pytest.raises(ConfigError, match="the ledger holds amounts in BHD"):
        await relay.reload(changed)
    assert relay.meter.currency.code == "BHD"
