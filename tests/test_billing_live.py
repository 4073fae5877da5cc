"""Billing as an operator sees it: a real webhook server, a running relay, the CLI."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import aiohttp.web
import aiosmtplib
import pytest

from mailmeter.metering.billing import Billing
from mailmeter.metering.gateway import WebhookGateway, verify
from mailmeter.relay.data import has_bare_newline
from tests.conftest import PASSWORD, RelayHarness, Upstream, add_account, free_port, write_config
from tests.mailmeter.test_cli_and_service import mailmeter

SECRET = b"webhook-shared-secret"


@dataclass
class PaymentServer:
    """The operator's payment endpoint: verifies signatures, answers per a script."""

    port: int
    script: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    received: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    bad_signatures: int = 0
    runner: aiohttp.web.AppRunner | None = None

    async def handle(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        body = await request.read()
        if not verify(
            SECRET,
            request.headers["X-Mailmeter-Timestamp"],
            body,
            request.headers["X-Mailmeter-Signature"],
            time.time(),
        ):
            self.bad_signatures += 1
            return aiohttp.web.json_response({"error": "bad signature"}, status=401)
        self.received.append((request.headers["Idempotency-Key"], json.loads(body)))
        status, reply = self.script.pop(0) if self.script else (200, {"status": "succeeded"})
        return aiohttp.web.json_response(reply, status=status)

    async def start(self) -> None:
        app = aiohttp.web.Application()
        app.router.add_post("/charges", self.handle)
        app.router.add_post("/notices", self.handle)
        self.runner = aiohttp.web.AppRunner(app)
        await self.runner.setup()
        await aiohttp.web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/charges"


@pytest.fixture
async def payments() -> AsyncIterator[PaymentServer]:
    server = PaymentServer(port=free_port())
    await server.start()
    yield server
    assert server.runner is not None
    await server.runner.cleanup()


E_PLAN = {
    "included_emails": 10,
    "price": {"kind": "per_block", "amount": "1", "block_emails": 5},
    "in_period_charge": {"kind": "per_block"},
    "usage_alerts": [50, 100],
}


async def test_webhook_gateway_signs_retries_and_blocks_on_decline(
    make_relay, upstream: Upstream, payments: PaymentServer
) -> None:  # type: ignore[no-untyped-def]
    harness: RelayHarness = make_relay(upstream.port, plans={"e": E_PLAN})
    await harness.start()
    await add_account(harness, plan="e")
    relay = harness.relay
    assert relay is not None
    billing = Billing(relay.meter, WebhookGateway(payments.url, SECRET), retry_first_delay=1.0)
    # Two charges: emails 11 and 16 each open a $1 block.
    grant = await relay.meter.reserve("app", None, 16)
    await relay.meter.commit(grant.hold_id, "Q1", 16)
    payments.script = [
        (503, {}),
        (200, {"status": "succeeded"}),
        (200, {"status": "failed", "reason": "card declined"}),
    ]
    assert await billing.collect_charges() == (1, 0, 0)  # block/1 gets a 503 (retried later), block/2 succeeds
    assert await billing.collect_charges() == (0, 0, 0)  # block/1 is not due yet: backoff
    await asyncio.sleep(1.1)
    assert await billing.collect_charges() == (0, 1, 0)  # the retry of block/1 is declined
    keys = [key for key, _ in payments.received]
    assert keys[0].endswith("/block/1") and keys[1].endswith("/block/2")
    assert keys[2] == keys[0]  # the retry reuses the idempotency key
    assert payments.received[0][1]["amount"] == "1.00" and payments.received[0][1]["amount_micros"] == 1_000_000
    assert payments.bad_signatures == 0
    assert await billing.collect_charges() == (0, 0, 0)  # nothing is ever sent twice
    assert len(payments.received) == 3
    # The declined charge blocked the account: the next SMTP transaction is deferred.
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=harness.port, start_tls=False, timeout=10)
    await client.connect()
    await client.login("app", PASSWORD)
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
        await client.sendmail("app@example.com", ["x@dest.test"], b"Subject: x\r\n\r\nx\r\n")
    assert refused.value.code == 451 and "payment failed" in refused.value.message
    # `payment ok` releases it and re-sends the failed charge.
    await relay.meter.set_payment("app", True)
    errors, _ = await client.sendmail("app@example.com", ["x@dest.test"], b"Subject: x\r\n\r\nx\r\n")
    assert errors == {}
    await client.quit()
    await billing.collect_charges()
    assert [key for key, _ in payments.received[3:]] == [keys[0]]


async def test_payment_failed_and_ok_from_the_cli_act_on_an_open_session(
    relay: RelayHarness, upstream: Upstream
) -> None:
    await add_account(relay)
    config = relay.directory / "config.yaml"
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.port, start_tls=False, timeout=10)
    await client.connect()
    await client.login("app", PASSWORD)
    assert (await client.mail("app@example.com")).code == 250
    blocked = await asyncio.to_thread(mailmeter, config, "payment", "failed", "app", "--reason", "card expired")
    assert blocked.returncode == 0, blocked.stderr
    response = await client.execute_command(b"RCPT", b"TO:<a@dest.test>")
    assert response.code == 452 and "payment failed" in response.message
    await client.rset()
    response = await client.execute_command(b"MAIL", b"FROM:<app@example.com>")
    assert response.code == 451 and response.message.startswith("4.7.1 Sending is paused because a payment failed")
    released = await asyncio.to_thread(mailmeter, config, "payment", "ok", "app")
    assert released.returncode == 0
    await client.rset()
    errors, _ = await client.sendmail("app@example.com", ["a@dest.test"], b"Subject: x\r\n\r\nx\r\n")
    assert errors == {}
    await client.quit()
    shown = json.loads((await asyncio.to_thread(mailmeter, config, "account", "show", "app", "--json")).stdout)
    assert shown["payment_state"] == "ok"


async def test_usage_notices_are_emailed_once_through_the_relay(make_relay, upstream: Upstream) -> None:  # type: ignore[no-untyped-def]
    harness: RelayHarness = make_relay(upstream.port, plans={"e": E_PLAN}, billing={"interval": 0.1})
    await harness.start()
    assert harness.relay is not None
    await harness.relay.meter.add_account(
        "app", PASSWORD, "e", ["example.com"], [], contacts=["owner@example.com", "finance@example.com"]
    )
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=harness.port, start_tls=False, timeout=10)
    await client.connect()
    await client.login("app", PASSWORD)
    for n in range(12):
        await client.sendmail("app@example.com", [f"r{n}@dest.test"], b"Subject: x\r\n\r\nx\r\n")
    await client.quit()

    def notices() -> list[bytes]:
        return [m.content for m in upstream.handler.messages if "owner@example.com" in m.rcpt_tos]

    await upstream.handler.wait_for(lambda: len(notices()) == 2)
    await asyncio.sleep(0.5)  # several more billing passes: nothing is sent again
    assert len(notices()) == 2
    texts = b"\n".join(notices())
    assert b"has used 50% of its 10 emails" in texts and b"has used 100% of its 10 emails" in texts
    message = next(m for m in upstream.handler.messages if "owner@example.com" in m.rcpt_tos)
    assert sorted(message.rcpt_tos) == ["finance@example.com", "owner@example.com"]


async def test_usage_notices_are_spooled_with_crlf_line_ends(make_relay) -> None:  # type: ignore[no-untyped-def]
    """Like every spooled message: delivery sends the spool as it is (line ends only checked)."""
    harness: RelayHarness = make_relay(free_port(), plans={"e": E_PLAN}, billing={"interval": 0.1})  # upstream down
    await harness.start()
    assert harness.relay is not None
    await harness.relay.meter.add_account("app", PASSWORD, "e", ["example.com"], [], contacts=["owner@example.com"])
    grant = await harness.relay.meter.reserve("app", None, 5)
    await harness.relay.meter.commit(grant.hold_id, "Q1", 5)  # 50% of 10: a notice
    spool = harness.relay.spool
    for _ in range(100):
        ids = await asyncio.to_thread(spool.active_ids)
        if ids:
            break
        await asyncio.sleep(0.05)
    envelope, body = await asyncio.to_thread(spool.read, ids[0])
    assert envelope.recipients == ["owner@example.com"] and b"Subject:" in body
    assert not has_bare_newline(body)


async def test_usage_notices_also_go_to_a_signed_webhook(
    make_relay, upstream: Upstream, payments: PaymentServer, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "notices.secret").write_bytes(SECRET + b"\n")
    harness: RelayHarness = make_relay(
        upstream.port,
        plans={"e": E_PLAN},
        billing={
            "interval": 0.1,
            "notices": {
                "webhook_url": f"http://127.0.0.1:{payments.port}/notices",
                "webhook_secret_file": "notices.secret",
            },
        },
    )
    await harness.start()
    await add_account(harness, plan="e")  # no contacts: the webhook alone carries the notices
    assert harness.relay is not None
    grant = await harness.relay.meter.reserve("app", None, 5)
    await harness.relay.meter.commit(grant.hold_id, "Q1", 5)  # 50% of 10

    async def posted() -> bool:
        return any(body.get("key") == "alert/50" for _, body in payments.received)

    for _ in range(100):
        if await posted():
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    alerts = [body for _, body in payments.received if body.get("kind") == "usage_alert"]
    assert [(a["account"], a["percent"], a["limit"], a["sent"]) for a in alerts] == [("app", 50, 10, 5)]
    assert payments.bad_signatures == 0


def test_invoices_export_and_preview_from_the_cli(tmp_path: Path) -> None:
    config = write_config(tmp_path, 2526, plans={"e": {**E_PLAN, "usage_alerts": []}})
    password = tmp_path / "pw"
    password.write_text("pw\n")
    added = mailmeter(
        config,
        "account",
        "add",
        "app",
        "--password-file",
        str(password),
        "--plan",
        "e",
        "--sender-domain",
        "example.com",
        "--subscribed-on",
        "2026-01-01",
    )
    assert added.returncode == 0, added.stderr
    billed = mailmeter(config, "billing", "run")
    assert billed.returncode == 0, billed.stderr
    invoices = json.loads(billed.stdout)["invoices"]
    assert invoices[:2] == ["INV-app-20260101", "INV-app-20260201"]  # catch-up: every ended month
    listing = mailmeter(config, "invoice", "list", "app")
    assert listing.stdout.splitlines()[0].split("\t")[0] == "INV-app-20260101"
    shown = json.loads(mailmeter(config, "invoice", "show", "INV-app-20260101", "--json").stdout)
    assert shown["period"] == "Jan 1 - Jan 31" and shown["total"] == "0.00" and shown["status"] == "paid"
    missing = mailmeter(config, "invoice", "show", "INV-nope")
    assert missing.returncode == 1 and "mailmeter invoice list" in missing.stderr
    out = tmp_path / "jan.csv"
    exported = mailmeter(config, "export", "--period", "2026-01", "--csv", str(out))
    assert exported.returncode == 0, exported.stderr
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert rows and {row["invoice_id"] for row in rows} == {"INV-app-20260101"}
    assert mailmeter(config, "export", "--period", "Jan", "--csv", str(out)).returncode == 2

    preview = mailmeter(config, "plan", "preview", "e", "--emails", "26", "--start", "2026-04-01", "--json")
    assert preview.returncode == 0, preview.stderr
    data = json.loads(preview.stdout)
    assert (data["accepted"], data["refused"]) == (26, 0)
    assert [c["amount"] for c in data["charges"]] == ["1.00"] * 4  # emails 11, 16, 21 and 26 open blocks
    assert data["invoice"]["total"] == "0.00" and isinstance(data["invoice"]["lines"], list)

    top_up = mailmeter(config, "balance", "add", "app", "12.50")
    assert top_up.returncode == 0 and json.loads(top_up.stdout)["prepaid_balance"] == "12.50"
    bad = mailmeter(config, "balance", "add", "app", "1.5e3")
    assert bad.returncode == 2 and "amount" in bad.stderr
    spending = mailmeter(config, "limit", "spending", "app", "20")
    assert spending.returncode == 0 and json.loads(spending.stdout)["spending_limit"] == "20.00"
    repaid = mailmeter(config, "repay", "app")
    assert repaid.returncode == 0 and json.loads(repaid.stdout)["repaid"] == "0.00"


def test_example_config_defines_the_five_plans() -> None:
    from mailmeter.config import load_config

    config = load_config(Path(__file__).resolve().parent.parent / "config.example.yaml")
    plans = config.parsed_plans()
    for name in ("per-email-threshold", "prepaid-tiered", "delivery-results", "included-capped", "limit-overage"):
        assert name in plans
    d = plans["included-capped"]
    assert (d.display_name, d.included_emails, d.spending_limit) == ("Pro 100k", 100_000, 599_000_000)
    assert date(2026, 1, 1)  # (keeps the import honest for type checkers)


def test_plan_changes_and_a_scripted_preview_from_the_cli(tmp_path: Path) -> None:
    plans = {
        "e": {**E_PLAN, "usage_alerts": []},
        "e-big": {**E_PLAN, "usage_alerts": [], "included_emails": 20},
        "pro": {"period": {"kind": "anniversary"}, "email_quota": 5000},
    }
    config = write_config(tmp_path, 2526, plans=plans)
    password = tmp_path / "pw"
    password.write_text("pw\n")
    added = mailmeter(
        config,
        "account",
        "add",
        "app",
        "--password-file",
        str(password),
        "--plan",
        "e",
        "--sender-domain",
        "example.com",
    )
    assert added.returncode == 0, added.stderr
    upgraded = mailmeter(config, "account", "plan", "app", "e-big")
    assert upgraded.returncode == 0, upgraded.stderr
    assert upgraded.stdout.startswith("account app: upgrade from plan e to plan e-big, in force now: an upgrade")
    downgraded = json.loads(mailmeter(config, "account", "plan", "app", "e", "--json").stdout)
    assert (downgraded["change"], downgraded["at_once"], downgraded["plan"]) == ("downgrade", False, "e-big")
    shown = json.loads(mailmeter(config, "account", "show", "app", "--json").stdout)
    assert (shown["plan"], shown["plan_change"]["plan"]) == ("e-big", "e")
    refused = mailmeter(config, "account", "plan", "app", "pro")
    assert refused.returncode == 1 and "a plan change keeps the account's billing periods" in refused.stderr
    unknown = mailmeter(config, "account", "plan", "app", "gold")
    assert unknown.returncode == 2 and "plan 'gold' is not defined (known: e, e-big, pro" in unknown.stderr
    audit = mailmeter(config, "audit", "--account", "app", "--json")
    assert [e["action"] for e in json.loads(audit.stdout)] == ["plan.change", "plan.change", "account.add"]

    script = ["--event", "12:included=20", "--event", "15:payment=failed", "--event", "18:payment=ok"]
    preview = mailmeter(
        config,
        "plan",
        "preview",
        "e",
        "--emails",
        "30",
        "--start",
        "2026-04-01",
        "--balance",
        "5.00",
        *script,
        "--json",
    )
    assert preview.returncode == 0, preview.stderr
    data = json.loads(preview.stdout)
    assert (data["accepted"], data["refused"], data["balance"]) == (27, 3, "5.00")
    assert [(c["key"], c["trigger_email"]) for c in data["charges"]] == [("block/1", 11), ("block/2", 24)]
    text = mailmeter(config, "plan", "preview", "e", "--emails", "30", "--start", "2026-04-01", *script)
    assert "  refused emails 16 to 18 from 2026-04-" in text.stdout and ": payment_failed" in text.stdout
    bad = mailmeter(config, "plan", "preview", "e", "--emails", "30", "--event", "12:refund=1")
    assert bad.returncode == 2 and "'refund' is not an event" in bad.stderr
    late = mailmeter(config, "plan", "preview", "e", "--emails", "30", "--event", "31:payment=ok")
    assert late.returncode == 2 and "events[0].at: 31 is not between 0 and the 30 emails" in late.stderr
