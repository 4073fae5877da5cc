"""The admin HTTP API as a client sees it: a real relay, real HTTP over loopback, real SQLite."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
import pytest

from metering.gateway import sign
from tests.conftest import PASSWORD, RelayHarness, Upstream, write_config
from tests.test_billing_live import E_PLAN, SECRET, PaymentServer

OPS_TOKEN = "ops-0123456789abcdef-token"
BILLING_TOKEN = "billing-0123456789abcdef-token"
WEBHOOK_SECRET = b"inbound-payment-webhook-secret"


@dataclass
class Api:
    """An HTTP client for one relay's admin API."""

    harness: RelayHarness
    session: aiohttp.ClientSession

    @property
    def base(self) -> str:
        assert self.harness.relay is not None and self.harness.relay.api is not None
        return f"http://127.0.0.1:{self.harness.relay.api.port}"

    async def call(
        self, method: str, path: str, body: Any = None, token: str | None = OPS_TOKEN, raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        if data is not None:
            sent.setdefault("Content-Type", "application/json")
        async with self.session.request(method, self.base + path, data=data, headers=sent) as response:
            text = await response.text()
            if response.content_type == "application/json":
                return response.status, json.loads(text)
            return response.status, text

    async def webhook(self, event: dict[str, Any], secret: bytes = WEBHOOK_SECRET,
                      timestamp: float | None = None) -> tuple[int, Any]:
        body = json.dumps(event).encode()
        stamp = str(int(time.time() if timestamp is None else timestamp))
        return await self.call("POST", "/v1/webhooks/payment", raw=body, token=None, headers={
            "X-Mailmeter-Timestamp": stamp, "X-Mailmeter-Signature": sign(secret, stamp, body)})


def api_overrides(directory: Path, **extra: Any) -> dict[str, Any]:
    """Config overrides that enable the API on a free port with two named tokens."""
    (directory / "api.tokens").write_text(f"# admin API tokens\nops:{OPS_TOKEN}\nbilling:{BILLING_TOKEN}\n")
    (directory / "payments.secret").write_bytes(WEBHOOK_SECRET + b"\n")
    api = {"enabled": True, "port": 0, "tokens_file": "api.tokens", "payment_webhook_secret_file": "payments.secret"}
    return {"api": api, "plans": {"e": E_PLAN}, **extra}


@pytest.fixture
async def start_api(
    make_relay: Callable[..., RelayHarness], upstream: Upstream, tmp_path: Path
) -> AsyncIterator[Callable[..., Awaitable[Api]]]:
    sessions: list[aiohttp.ClientSession] = []

    async def start(**extra: Any) -> Api:
        harness = make_relay(upstream.port, **api_overrides(tmp_path, **extra))
        await harness.start()
        session = aiohttp.ClientSession()
        sessions.append(session)
        return Api(harness, session)

    yield start
    for session in sessions:
        await session.close()


@pytest.fixture
async def api(start_api: Callable[..., Awaitable[Api]]) -> Api:
    return await start_api()


NEW_ACCOUNT = {"name": "app", "password": PASSWORD, "plan": "small", "sender_domains": ["example.com"]}


async def test_every_admin_route_needs_a_valid_bearer_token(api: Api) -> None:
    for token, header in ((None, None), ("wrong-token-0123456789", None), (None, "Basic b3BzOnNlY3JldA==")):
        status, body = await api.call("GET", "/v1/accounts", token=token,
                                      headers={"Authorization": header} if header else None)
        assert status == 401 and "api.tokens_file" in body["error"]
    # Every route the API describes as needing the token refuses a request without it.
    status, doc = await api.call("GET", "/openapi.json", token=None)
    guarded = [(method, re.sub(r"{\w+}", "x", path)) for path, item in doc["paths"].items()
               for method, operation in item.items() if operation.get("security") != []]
    assert len(guarded) == 17
    for method, path in guarded:
        status, body = await api.call(method.upper(), path, {}, token=None)
        assert status == 401 and body["error"].startswith("authentication required"), (method, path)
    status, body = await api.call("GET", "/v1/accounts")
    assert (status, body) == (200, [])
    assert (await api.call("GET", "/v1/accounts", token=BILLING_TOKEN))[0] == 200
    status, body = await api.call("GET", "/v1/nowhere")
    assert status == 404 and "openapi.json" in body["error"]
    status, body = await api.call("DELETE", "/v1/accounts")
    assert status == 405 and "error" in body
    # Open routes: health checks and the API's own description.
    status, body = await api.call("GET", "/healthz", token=None)
    assert (status, body) == (200, {"status": "ok", "node": "test-node"})
    assert (await api.call("GET", "/openapi.json", token=None))[0] == 200


async def test_openapi_lists_every_route_with_its_schemas(api: Api) -> None:
    status, doc = await api.call("GET", "/openapi.json", token=None)
    assert status == 200 and doc["openapi"] == "3.1.0"
    assert api.harness.relay is not None and api.harness.relay.api is not None
    routes = {
        (route.resource.canonical, route.method.lower())
        for route in api.harness.relay.api.app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }
    documented = {(path, method) for path, item in doc["paths"].items() for method in item}
    assert routes == documented
    schemas = doc["components"]["schemas"]
    for (path, method) in documented:
        operation = doc["paths"][path][method]
        assert operation["summary"] and operation["responses"], (path, method)
        for response in operation["responses"].values():
            for media in response["content"].values():
                assert "schema" in media, (path, method)
        declared = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
        assert declared == set(re.findall(r"{(\w+)}", path)), (path, method)
        if method in ("put",) or path in ("/v1/accounts", "/v1/webhooks/payment") and method == "post":
            assert "schema" in operation["requestBody"]["content"]["application/json"], (path, method)
    for ref in re.findall(r'"#/components/schemas/(\w+)"', json.dumps(doc)):
        assert ref in schemas
    assert doc["paths"]["/v1/webhooks/payment"]["post"]["security"] == []  # HMAC, not a bearer token


async def test_accounts_add_list_show_usage_and_their_errors(api: Api) -> None:
    status, account = await api.call("POST", "/v1/accounts", NEW_ACCOUNT)
    assert status == 201 and account["name"] == "app" and account["has_password"] is True
    assert PASSWORD not in json.dumps(account) and "scrypt" not in json.dumps(account)
    status, body = await api.call("POST", "/v1/accounts", NEW_ACCOUNT)
    assert status == 409 and "already exists" in body["error"]
    status, body = await api.call("POST", "/v1/accounts", {**NEW_ACCOUNT, "name": "x", "plan": "gold"})
    assert status == 400 and "plan 'gold' is not defined" in body["error"]
    status, body = await api.call("POST", "/v1/accounts", {**NEW_ACCOUNT, "name": "x", "sender_domains": []})
    assert status == 400 and "sender domain" in body["error"]
    status, body = await api.call("POST", "/v1/accounts", raw=b'{"name": "x",')
    assert status == 400 and "not valid JSON" in body["error"]
    status, body = await api.call("POST", "/v1/accounts", ["app"])
    assert status == 400 and "JSON object" in body["error"]
    status, body = await api.call("POST", "/v1/accounts", {**NEW_ACCOUNT, "name": "x", "pasword": "p"})
    assert status == 400 and body["error"].startswith("pasword: unknown field")
    status, body = await api.call("POST", "/v1/accounts", {**NEW_ACCOUNT, "name": "x", "sender_domains": "a.test"})
    assert status == 400 and body["error"].startswith("sender_domains:")

    status, listing = await api.call("GET", "/v1/accounts")
    assert status == 200 and [a["name"] for a in listing] == ["app"]
    status, shown = await api.call("GET", "/v1/accounts/app")
    assert status == 200 and shown["sender_domains"] == ["example.com"] and shown["prepaid_balance"] == "0.00"
    status, body = await api.call("GET", "/v1/accounts/ghost")
    assert status == 404 and body["error"] == "no account named 'ghost' (see `mailmeter account list`)"
    status, usage = await api.call("GET", "/v1/accounts/app/usage")
    assert status == 200 and (usage["accepted"], usage["remaining"], usage["spent"]) == (0, 1000, "0.00")
    assert (await api.call("GET", "/v1/accounts/ghost/usage"))[0] == 404


async def test_payment_balance_repay_and_limits(api: Api) -> None:
    await api.call("POST", "/v1/accounts", {**NEW_ACCOUNT, "plan": "e"})
    status, account = await api.call("POST", "/v1/accounts/app/payment", {"state": "failed", "reason": "card expired"})
    assert status == 200 and (account["payment_state"], account["payment_detail"]) == ("failed", "card expired")
    status, body = await api.call("POST", "/v1/accounts/app/payment", {"state": "broken"})
    assert status == 400 and body["error"].startswith("state:")
    status, body = await api.call("POST", "/v1/accounts/app/payment", {})
    assert status == 400 and body["error"] == "state: this field is required"
    assert (await api.call("POST", "/v1/accounts/ghost/payment", {"state": "ok"}))[0] == 404
    status, account = await api.call("POST", "/v1/accounts/app/payment", {"state": "ok"})
    assert status == 200 and account["payment_state"] == "ok"

    status, result = await api.call("POST", "/v1/accounts/app/balance", {"amount": "25.00"})
    assert (status, result) == (200, {"account": "app", "added": "25.00", "prepaid_balance": "25.00"})
    for bad in (25.5, 25, "1.5e3", "-3.00", "lots"):
        status, body = await api.call("POST", "/v1/accounts/app/balance", {"amount": bad})
        assert status == 400 and body["error"].startswith("amount:"), (bad, body)
    assert (await api.call("POST", "/v1/accounts/ghost/balance", {"amount": "1.00"}))[0] == 404
    status, account = await api.call("GET", "/v1/accounts/app")
    assert account["prepaid_balance"] == "25.00"  # none of the refused top-ups changed it

    status, result = await api.call("POST", "/v1/accounts/app/repay")
    assert (status, result) == (200, {"account": "app", "repaid": "0.00"})

    status, usage = await api.call("PUT", "/v1/accounts/app/limits/included", {"emails": 20})
    assert status == 200 and usage["included_emails"] == 20
    status, usage = await api.call("PUT", "/v1/accounts/app/limits/quota", {"emails": 500})
    assert status == 200 and usage["account"] == "app"
    status, (event,) = await api.call("GET", "/v1/audit?account=app&limit=1")
    assert (event["action"], event["after"]["limit_changes"]["quota"]["new"]) == ("limit.quota", 500)
    status, usage = await api.call("PUT", "/v1/accounts/app/limits/spending", {"amount": "7.50"})
    assert status == 200 and usage["spending_limit"] == "7.50"
    status, usage = await api.call("PUT", "/v1/accounts/app/limits/spending", {"amount": None})
    assert status == 200 and usage["spending_limit"] is None
    status, body = await api.call("PUT", "/v1/accounts/app/limits/spending", {"amount": 7.5})
    assert status == 400 and body["error"].startswith("amount:")
    status, body = await api.call("PUT", "/v1/accounts/app/limits/quota", {"emails": "many"})
    assert status == 400 and body["error"].startswith("emails:")
    status, body = await api.call("PUT", "/v1/accounts/app/limits/quota", {"emails": -1})
    assert status == 400 and body["error"].startswith("emails:")
    status, body = await api.call("PUT", "/v1/accounts/app/limits/daily", {"emails": 5})
    assert status == 400 and "choose included, quota or spending" in body["error"]


async def test_invoices_exports_plans_preview_and_billing_run(api: Api) -> None:
    await api.call("POST", "/v1/accounts", {**NEW_ACCOUNT, "plan": "e", "subscribed_on": "2026-01-01"})
    status, run = await api.call("POST", "/v1/billing/run")
    assert status == 200 and run["invoices"][:2] == ["INV-app-20260101", "INV-app-20260201"]
    status, invoices = await api.call("GET", "/v1/accounts/app/invoices")
    assert status == 200 and invoices[0]["id"] == "INV-app-20260101" and invoices[0]["total"] == "0.00"
    assert (await api.call("GET", "/v1/accounts/ghost/invoices"))[0] == 404
    status, invoice = await api.call("GET", "/v1/invoices/INV-app-20260101")
    assert status == 200 and (invoice["period"], invoice["status"]) == ("Jan 1 - Jan 31", "paid")
    status, body = await api.call("GET", "/v1/invoices/INV-nope")
    assert status == 404 and "mailmeter invoice list" in body["error"]

    async with api.session.get(api.base + "/v1/exports/2026-01.csv",
                               headers={"Authorization": f"Bearer {OPS_TOKEN}"}) as response:
        assert response.status == 200 and response.content_type == "text/csv"
        rows = list(csv.DictReader(io.StringIO(await response.text())))
    assert rows and {row["invoice_id"] for row in rows} == {"INV-app-20260101"}
    status, body = await api.call("GET", "/v1/exports/Jan.csv")
    assert status == 400 and "YYYY-MM" in body["error"]

    status, plans = await api.call("GET", "/v1/plans")
    assert status == 200 and [p["name"] for p in plans] == ["e", "small", "tiny"]
    e = plans[0]
    assert (e["included_emails"], e["in_period_charge"], e["plan_fee"]) == (10, "per_block", "0.00")
    status, preview = await api.call("POST", "/v1/plans/e/preview", {"emails": 26, "start": "2026-04-01"})
    assert status == 200 and [c["amount"] for c in preview["charges"]] == ["1.00"] * 4
    status, body = await api.call("POST", "/v1/plans/gold/preview", {"emails": 1})
    assert status == 404 and "plan 'gold' is not defined" in body["error"]
    status, body = await api.call("POST", "/v1/plans/e/preview", {"emails": "26"})
    assert status == 400 and body["error"].startswith("emails:")
    status, body = await api.call("POST", "/v1/plans/e/preview", {"emails": 1, "start": "April"})
    assert status == 400 and body["error"].startswith("start:")


async def test_metrics_need_the_token_and_are_prometheus_text(api: Api) -> None:
    async with api.session.get(api.base + "/metrics", headers={"Authorization": f"Bearer {OPS_TOKEN}"}) as response:
        assert response.status == 200 and response.content_type == "text/plain"
        text = await response.text()
    assert "# TYPE mailmeter_smtp_sessions_total counter" in text


async def test_payment_webhook_refuses_unsigned_badly_signed_and_stale_events(api: Api) -> None:
    await api.call("POST", "/v1/accounts", NEW_ACCOUNT)
    await api.call("POST", "/v1/accounts/app/payment", {"state": "failed"})
    event = {"id": "evt_1", "type": "payment_method.updated", "account": "app"}
    status, body = await api.call("POST", "/v1/webhooks/payment", event, token=None)
    assert status == 401 and "X-Mailmeter-Signature" in body["error"]
    status, body = await api.call("POST", "/v1/webhooks/payment", event, token=OPS_TOKEN)
    assert status == 401  # a bearer token is no substitute for the signature
    status, body = await api.webhook(event, secret=b"someone-else's-secret")
    assert status == 401 and "signature does not match" in body["error"]
    status, body = await api.webhook(event, timestamp=time.time() - 3600)
    assert status == 401 and "sign the event again with the current time" in body["error"]
    status, account = await api.call("GET", "/v1/accounts/app")
    assert account["payment_state"] == "failed"  # nothing refused above changed anything

    status, result = await api.webhook(event)
    assert status == 200 and result["duplicate"] is False and result["payment_state"] == "ok"
    status, body = await api.webhook({"id": "evt_2", "type": "refund.created"})
    assert status == 400 and body["error"].startswith("type:")
    status, body = await api.webhook({"id": "evt_3", "type": "charge.failed", "charge": "app/nope/block/1"})
    assert status == 404 and body["error"].startswith("charge:")
    status, body = await api.webhook({"type": "payment_method.updated", "account": "app"})
    assert status == 400 and body["error"].startswith("id:")


async def test_payment_webhook_is_off_until_a_secret_is_configured(
    start_api: Callable[..., Awaitable[Api]], tmp_path: Path
) -> None:
    api: Api = await start_api()
    assert api.harness.relay is not None
    await api.harness.stop()
    (tmp_path / "api.tokens").write_text(f"ops:{OPS_TOKEN}\n")
    harness = api.harness
    harness.overrides["api"] = {"enabled": True, "port": 0, "tokens_file": "api.tokens"}
    await harness.start()
    status, body = await api.webhook({"id": "evt_1", "type": "payment_method.updated", "account": "app"})
    assert status == 503 and "api.payment_webhook_secret_file" in body["error"]


async def _pending_charge(api: Api, payments: PaymentServer) -> str:
    """Send 11 emails on plan e (10 included): email 11 opens a $1 block, whose charge the
    gateway answers "pending"; returns the charge's idempotency key."""
    payments.script = [(200, {"status": "pending"})]
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=api.harness.port, start_tls=False, timeout=10)
    await client.connect()
    await client.login("app", PASSWORD)
    await client.sendmail("app@example.com", [f"r{n}@dest.test" for n in range(11)], b"Subject: x\r\n\r\nx\r\n")
    await client.quit()
    status, run = await api.call("POST", "/v1/billing/run")
    assert status == 200 and run["charges_collected"] == 0 and run["charges_failed"] == 0
    (key, charge), = payments.received
    assert key.endswith("/block/1") and charge["amount"] == "1.00"
    return key


@pytest.fixture
async def payments() -> AsyncIterator[PaymentServer]:
    from tests.conftest import free_port

    server = PaymentServer(port=free_port())
    await server.start()
    yield server
    assert server.runner is not None
    await server.runner.cleanup()


def gateway_overrides(payments: PaymentServer, directory: Path) -> dict[str, Any]:
    (directory / "gateway.secret").write_bytes(SECRET + b"\n")
    return {"billing": {"gateway": {"kind": "webhook", "url": payments.url, "secret_file": "gateway.secret"}}}


async def test_webhook_events_block_and_release_a_live_smtp_session(
    start_api: Callable[..., Awaitable[Api]], payments: PaymentServer, tmp_path: Path
) -> None:
    api: Api = await start_api(**gateway_overrides(payments, tmp_path))
    await api.call("POST", "/v1/accounts", {**NEW_ACCOUNT, "plan": "e"})
    key = await _pending_charge(api, payments)

    session = aiosmtplib.SMTP(hostname="127.0.0.1", port=api.harness.port, start_tls=False, timeout=10)
    await session.connect()
    await session.login("app", PASSWORD)
    assert (await session.mail("app@example.com")).code == 250
    await session.rset()

    status, result = await api.webhook({"id": "evt_f", "type": "charge.failed", "charge": key,
                                        "reason": "card declined"})
    assert status == 200 and (result["applied"], result["payment_state"]) == (True, "failed")
    response = await session.execute_command(b"MAIL", b"FROM:<app@example.com>")
    assert response.code == 451 and response.message.startswith("4.7.1 Sending is paused because a payment failed")

    status, result = await api.webhook({"id": "evt_u", "type": "payment_method.updated", "account": "app"})
    assert status == 200 and result["payment_state"] == "ok"
    await session.rset()
    assert (await session.execute_command(b"MAIL", b"FROM:<app@example.com>")).code == 250
    await session.quit()


async def test_the_same_webhook_event_twice_changes_nothing_the_second_time(
    start_api: Callable[..., Awaitable[Api]], payments: PaymentServer, tmp_path: Path
) -> None:
    api: Api = await start_api(**gateway_overrides(payments, tmp_path))
    await api.call("POST", "/v1/accounts", {**NEW_ACCOUNT, "plan": "e"})
    key = await _pending_charge(api, payments)
    succeeded = {"id": "evt_ok", "type": "charge.succeeded", "charge": key}
    status, first = await api.webhook(succeeded)
    assert status == 200 and (first["duplicate"], first["charge_status"]) == (False, "succeeded")
    # The provider redelivers it; then an operator blocks the account by hand. Were the
    # redelivery applied again it would be a no-op anyway, so check the ledger and the
    # audit trail: one event, and a later redelivery does not undo a newer change.
    status, again = await api.webhook(succeeded)
    assert (status, again["duplicate"]) == (200, True)
    await api.call("POST", "/v1/accounts/app/payment", {"state": "failed", "reason": "manual"})
    released = {"id": "evt_pm", "type": "payment_method.updated", "account": "app"}
    assert (await api.webhook(released))[1]["payment_state"] == "ok"
    await api.call("POST", "/v1/accounts/app/payment", {"state": "failed", "reason": "manual again"})
    status, late = await api.webhook(released)  # a late redelivery must not release it again
    assert (status, late["duplicate"]) == (200, True)
    status, account = await api.call("GET", "/v1/accounts/app")
    assert (account["payment_state"], account["payment_detail"]) == ("failed", "manual again")
    # Two deliveries of a new event at the same moment: exactly one applies.
    both = await asyncio.gather(*(api.webhook({"id": "evt_race", "type": "payment_method.updated",
                                               "account": "app"}) for _ in range(2)))
    assert sorted(result["duplicate"] for _, result in both) == [False, True]
    status, events = await api.call("GET", "/v1/audit?account=app")
    webhook_ids = [e["event_id"] for e in events if e["actor"] == "webhook:payment"]
    assert sorted(webhook_ids) == ["evt_ok", "evt_pm", "evt_race"]


@pytest.mark.parametrize(
    ("tokens", "api", "message"),
    [
        (None, {"enabled": True}, "api.tokens_file: the admin API needs a file of NAME:TOKEN lines"),
        ("ops-only-a-name\n", {"enabled": True, "tokens_file": "t"}, "line 1: write NAME:TOKEN"),
        (f"ops:{OPS_TOKEN}\nops:{BILLING_TOKEN}\n", {"enabled": True, "tokens_file": "t"}, "line 2: the name 'ops'"),
        ("ops:short\n", {"enabled": True, "tokens_file": "t"}, "at least 16 characters"),
        ("op s:0123456789abcdef0123\n", {"enabled": True, "tokens_file": "t"}, "token name 'op s' must be"),
        ("# only a comment\n", {"enabled": True, "tokens_file": "t"}, "no tokens: add a NAME:TOKEN line"),
        (None, {"payment_webhook_secret_file": "missing.secret"}, "api.payment_webhook_secret_file: cannot read"),
        (None, {"address": "localhost"}, "api.address:"),
    ],
)
def test_bad_api_config_fails_at_start_naming_the_key(
    tmp_path: Path, tokens: str | None, api: dict[str, Any], message: str
) -> None:
    from mailmeter.config import ConfigError, load_config

    if tokens is not None:
        (tmp_path / "t").write_text(tokens)
    with pytest.raises(ConfigError) as error:
        load_config(write_config(tmp_path, 2526, api=api))
    assert message in str(error.value)
    for line in (tokens or "").splitlines():
        if ":" in line:
            assert line.split(":", 1)[1] not in str(error.value)  # an error never shows a token


def test_readme_documents_every_route() -> None:
    from mailmeter.openapi import PATHS

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for path, item in PATHS.items():
        for method in item:
            assert f"{method.upper()} {path}" in readme, f"{method.upper()} {path}"


B_PLAN = {
    "price": {"kind": "flat", "amount": "0.01"},
    "funding": {"kind": "prepaid", "monthly_payment": "10.00"},
}


async def test_the_monthly_payment_of_a_prepaid_account(start_api: Callable[..., Awaitable[Api]]) -> None:
    api = await start_api(plans={"e": E_PLAN, "b": B_PLAN})
    status, account = await api.call("POST", "/v1/accounts", {**NEW_ACCOUNT, "plan": "b", "monthly_payment": "20.00"})
    assert status == 201 and account["prepaid_balance"] == "20.00"  # the first period's credit, at once
    [change] = account["monthly_payment_changes"]
    assert change["amount"] == "20.00"
    status, result = await api.call("PUT", "/v1/accounts/app/monthly-payment", {"amount": "35.00"})
    assert status == 200 and (result["monthly_payment"], result["next_monthly_payment"]) == ("20.00", "35.00")
    status, usage = await api.call("GET", "/v1/accounts/app/usage")
    assert usage["prepaid"]["next_credit_at"] == result["applies_from"] > change["from"]
    assert (usage["prepaid"]["available"], usage["remaining"]) == ("20.00", 2_000)
    for bad in (35, "35.001", "-1.00", "lots"):
        status, body = await api.call("PUT", "/v1/accounts/app/monthly-payment", {"amount": bad})
        assert status == 400 and body["error"].startswith("amount:"), (bad, body)
    status, body = await api.call("PUT", "/v1/accounts/app/monthly-payment", {"amount": "1.00", "when": "now"})
    assert status == 400 and body["error"].startswith("when: unknown field")
    assert (await api.call("PUT", "/v1/accounts/ghost/monthly-payment", {"amount": "1.00"}))[0] == 404
    await api.call("POST", "/v1/accounts", {**NEW_ACCOUNT, "name": "e", "plan": "e"})
    status, body = await api.call("PUT", "/v1/accounts/e/monthly-payment", {"amount": "1.00"})
    assert status == 409 and "postpaid" in body["error"]
    status, body = await api.call("POST", "/v1/accounts", {**NEW_ACCOUNT, "name": "x", "plan": "e",
                                                           "monthly_payment": "5.00"})
    assert status == 400 and "postpaid" in body["error"]
    status, events = await api.call("GET", "/v1/audit?account=app")
    assert [e["action"] for e in events] == ["balance.monthly", "account.add"]
    assert events[0]["detail"] == {"amount": "35.00"} and events[0]["actor"] == "ops"
    assert [c["amount"] for c in events[0]["changes"]["monthly_payment_changes"][1]] == ["20.00", "35.00"]
