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

from mailmeter.metering.gateway import sign
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
        self,
        method: str,
        path: str,
        body: Any = None,
        token: str | None = OPS_TOKEN,
        raw: bytes | None = None,
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

    async def webhook(
        self, event: dict[str, Any], secret: bytes = WEBHOOK_SECRET, timestamp: float | None = None
    ) -> tuple[int, Any]:
        body = json.dumps(event).encode()
        stamp = str(int(time.time() if timestamp is None else timestamp))
        return await self.call(
            "POST",
            "/v1/webhooks/payment",
            raw=body,
            token=None,
            headers={"X-Mailmeter-Timestamp": stamp, "X-Mailmeter-Signature": sign(secret, stamp, body)},
        )


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
        status, body = await api.call(
            "GET", "/v1/accounts", token=token, headers={"Authorization": header} if header else None
        )
        assert status == 401 and "api.tokens_file" in body["error"]
    # Every route the API describes as needing the token refuses a request without it.
    status, doc = await api.call("GET", "/openapi.json", token=None)
    guarded = [
        (method, re.sub(r"{\w+}", "x", path))
        for path, item in doc["paths"].items()
        for method, operation in item.items()
        if operation.get("security") != []
    ]
    assert len(guarded) == 46
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
    for path, method in documented:
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

    async with api.session.get(
        api.base + "/v1/exports/2026-01.csv", headers={"Authorization": f"Bearer {OPS_TOKEN}"}
    ) as response:
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
    ((key, charge),) = payments.received
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

    status, result = await api.webhook(
        {"id": "evt_f", "type": "charge.failed", "charge": key, "reason": "card declined"}
    )
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
    both = await asyncio.gather(
        *(api.webhook({"id": "evt_race", "type": "payment_method.updated", "account": "app"}) for _ in range(2))
    )
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


def test_the_api_page_documents_every_route() -> None:
    from mailmeter.openapi import PATHS

    page = (Path(__file__).resolve().parents[2] / "docs" / "http-api.md").read_text()
    for path, item in PATHS.items():
        for method in item:
            assert f"{method.upper()} {path}" in page, f"{method.upper()} {path}"


# -- input that must be a 400 naming the field, never a 500 or a 503 (issue 14) -------------


@pytest.fixture(params=["sqlite", "postgresql"])
async def store_api(request: pytest.FixtureRequest, start_api: Callable[..., Awaitable[Api]]) -> AsyncIterator[Api]:
    """The API on the SQLite meter, and on PostgreSQL (which refuses NUL in text: a 503 there)."""
    if request.param == "sqlite":
        yield await start_api()
        return
    from tests.pgserver import isolated_schema, schema_url

    async with isolated_schema() as schema:
        api = await start_api(database={"url": schema_url(schema), "pool_size": 4})
        yield api
        await api.harness.stop()


async def test_wide_network_bindings_need_allow_wide_network(api: Api) -> None:
    """A network binding sends without AUTH: wider than a /16 or /48 it is refused unless the
    request says allow_wide_network (loopback is only this host: always allowed)."""
    for network, widest in (
        ("0.0.0.0/0", 16),
        ("::/0", 48),
        ("10.0.0.0/8", 16),
        ("2001:db8::/32", 48),
        ("::ffff:0:0/96", 16),
    ):
        status, body = await api.call("POST", "/v1/accounts", {**NEW_ACCOUNT, "networks": [network]})
        assert status == 400, (network, body)
        assert body["error"].startswith(f"networks: {network} is wider than a /{widest}")
        assert '"allow_wide_network": true' in body["error"] and "--allow-wide-network" in body["error"]
    assert (await api.call("GET", "/v1/accounts"))[1] == []  # nothing was added
    for name, network in (("lan", "10.1.0.0/16"), ("v6", "2001:db8:1::/48"), ("local", "127.0.0.0/8")):
        status, body = await api.call("POST", "/v1/accounts", {**NEW_ACCOUNT, "name": name, "networks": [network]})
        assert status == 201, body
    status, body = await api.call(
        "POST", "/v1/accounts", {**NEW_ACCOUNT, "networks": ["0.0.0.0/0"], "allow_wide_network": True}
    )
    assert status == 201 and body["networks"] == ["0.0.0.0/0"]
    status, body = await api.call("POST", "/v1/accounts", {**NEW_ACCOUNT, "name": "x", "allow_wide_network": "yes"})
    assert status == 400 and body["error"].startswith("allow_wide_network:")


def deep(depth: int) -> bytes:
    return b'{"amount": ' + b"[" * depth + b"]" * depth + b"}"


async def test_inputs_that_gave_500_or_503_are_400_naming_the_field(store_api: Api) -> None:
    api = store_api
    assert (await api.call("POST", "/v1/accounts", NEW_ACCOUNT))[0] == 201
    lone = '"\\ud800"'  # a lone surrogate, as JSON can carry it
    cases: list[tuple[str, str, bytes, str]] = [
        ("POST", "/v1/accounts", json.dumps({**NEW_ACCOUNT, "name": "a\0b"}).encode(), "name:"),
        (
            "POST",
            "/v1/accounts",
            json.dumps({**NEW_ACCOUNT, "name": "x"})[:-1].encode() + b', "contacts": [' + lone.encode() + b"]}",
            "contacts[0]:",
        ),
        (
            "POST",
            "/v1/accounts",
            json.dumps({**NEW_ACCOUNT, "name": "y", "sender_domains": ["ex\0.com"]}).encode(),
            "sender_domains[0]:",
        ),
        (
            "POST",
            "/v1/accounts",
            json.dumps({**NEW_ACCOUNT, "name": "k", "sender_domains": ["\u212aelvin.test"]}).encode(),
            "is not a domain name: it holds U+212A (KELVIN SIGN), a look-alike of 'K'",
        ),
        (
            "POST",
            "/v1/accounts",
            json.dumps({**NEW_ACCOUNT, "name": "p", "password": "pw\udfff"}, ensure_ascii=True).encode(),
            "password:",
        ),
        (
            "POST",
            "/v1/accounts/app/payment",
            json.dumps({"state": "failed", "reason": "card\0declined"}).encode(),
            "reason:",
        ),
        ("POST", "/v1/accounts/app/balance", b'{"amount": "99999999999999999999999999.00"}', "amount:"),
        ("POST", "/v1/accounts/app/balance", deep(100_000), "the request body is nested too deeply"),
        ("POST", "/v1/accounts/app/balance", deep(50), "amount"),
        ("PUT", "/v1/accounts/app/limits/spending", b'{"amount": "99999999999999999999999999.00"}', "amount:"),
        ("PUT", "/v1/accounts/app/limits/quota", b'{"emails": 1000000000000000000000000000}', "emails:"),
        ("POST", "/v1/plans/e/preview", b'{"emails": 1000000000000000000000000000}', "emails:"),
        ("GET", "/v1/accounts/a%00b", b"", "'name' (path parameter):"),
        ("GET", "/v1/audit?account=a%00b", b"", "'account' (query parameter):"),
        ("GET", "/v1/invoices/x%01y", b"", "'id' (path parameter):"),
    ]
    for method, path, raw, named in cases:
        status, body = await api.call(method, path, raw=raw or None)
        assert status == 400 and named in body["error"], (method, path, raw[:80], status, body)
    # Near the most the meter keeps, a balance stops growing with a 400 (no float, no overflow).
    assert (await api.call("POST", "/v1/accounts/app/balance", {"amount": "999999999.00"}))[0] == 200
    status, body = await api.call("POST", "/v1/accounts/app/balance", {"amount": "2.00"})
    assert status == 400 and body["error"].startswith("amount: the balance would pass 1000000000.00")
    status, account = await api.call("GET", "/v1/accounts/app")
    assert (status, account["prepaid_balance"], account["payment_state"]) == (200, "999999999.00", "ok")
    status, accounts = await api.call("GET", "/v1/accounts")
    assert [a["name"] for a in accounts] == ["app"]  # none of the refused requests added anything


async def test_webhook_headers_and_replays(api: Api) -> None:
    """Malformed signature headers are a 400 naming the header (no credentials needed to get one,
    never a 500); an event needs its id in the signed body, so a captured event cannot be applied
    again under a new Idempotency-Key."""
    status, body = await api.call(
        "POST",
        "/v1/webhooks/payment",
        raw=b"{}",
        token=None,
        headers={"X-Mailmeter-Timestamp": str(int(time.time())), "X-Mailmeter-Signature": "sha256=é" + "0" * 63},
    )
    assert status == 400 and body["error"].startswith("X-Mailmeter-Signature:")
    status, body = await api.call(
        "POST",
        "/v1/webhooks/payment",
        raw=b"{}",
        token=None,
        headers={"X-Mailmeter-Timestamp": "١٧٠٠٠٠٠٠٠٠", "X-Mailmeter-Signature": "sha256=" + "0" * 64},
    )
    assert status == 400 and body["error"].startswith("X-Mailmeter-Timestamp:")
    assert (await api.call("POST", "/v1/accounts", NEW_ACCOUNT))[0] == 201
    assert (await api.call("POST", "/v1/accounts/app/payment", {"state": "failed"}))[0] == 200
    event = {"type": "payment_method.updated", "account": "app"}
    body_bytes = json.dumps(event).encode()
    stamp = str(int(time.time()))
    signed = {"X-Mailmeter-Timestamp": stamp, "X-Mailmeter-Signature": sign(WEBHOOK_SECRET, stamp, body_bytes)}
    for key in ("key-1", "key-2"):
        status, body = await api.call(
            "POST", "/v1/webhooks/payment", raw=body_bytes, token=None, headers={**signed, "Idempotency-Key": key}
        )
        assert status == 400 and body["error"].startswith("id:"), body
    assert (await api.call("GET", "/v1/accounts/app"))[1]["payment_state"] == "failed"  # never applied
    with_id = json.dumps({**event, "id": "evt_1"}).encode()
    signed = {"X-Mailmeter-Timestamp": stamp, "X-Mailmeter-Signature": sign(WEBHOOK_SECRET, stamp, with_id)}
    first = await api.call("POST", "/v1/webhooks/payment", raw=with_id, token=None, headers=signed)
    assert first[0] == 200 and first[1]["duplicate"] is False
    assert (await api.call("POST", "/v1/accounts/app/payment", {"state": "failed"}))[0] == 200
    replay = await api.call(
        "POST", "/v1/webhooks/payment", raw=with_id, token=None, headers={**signed, "Idempotency-Key": "a-new-key"}
    )
    assert replay[0] == 200 and replay[1]["duplicate"] is True
    assert (await api.call("GET", "/v1/accounts/app"))[1]["payment_state"] == "failed"  # the replay changed nothing
    nested = b'{"id": "evt_2", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    signed = {"X-Mailmeter-Timestamp": stamp, "X-Mailmeter-Signature": sign(WEBHOOK_SECRET, stamp, nested)}
    status, body = await api.call("POST", "/v1/webhooks/payment", raw=nested, token=None, headers=signed)
    assert status == 400 and "nested too deeply" in body["error"]


PLAN_CHANGE_PLANS = {
    "tiny": {"email_quota": 3},
    "small": {"email_quota": 1000},
    "e": E_PLAN,
    "e-big": {**E_PLAN, "included_emails": 20},
    "pro": {"period": {"kind": "anniversary"}, "email_quota": 5000},
}


async def test_plan_change_upgrades_a_live_session_at_once_and_downgrades_at_the_period_end(
    start_api: Callable[..., Awaitable[Api]],
) -> None:
    api = await start_api(plans=PLAN_CHANGE_PLANS)
    await api.call("POST", "/v1/accounts", {**NEW_ACCOUNT, "plan": "tiny"})
    session = aiosmtplib.SMTP(hostname="127.0.0.1", port=api.harness.port, start_tls=False, timeout=10)
    await session.connect()
    await session.login("app", PASSWORD)
    await session.sendmail("app@example.com", ["a@example.net", "b@example.net"], b"Subject: x\r\n\r\nx\r\n")
    assert (await session.mail("app@example.com")).code == 250
    assert (await session.execute_command(b"RCPT", b"TO:<c@example.net>")).code == 250  # the quota's third
    refused = await session.execute_command(b"RCPT", b"TO:<d@example.net>")
    assert refused.code == 452 and refused.message.startswith("4.7.1 Email quota")

    status, result = await api.call("PUT", "/v1/accounts/app/plan", {"plan": "small"})
    assert status == 200
    assert {k: result[k] for k in ("from", "to", "change", "at_once", "plan", "plan_change")} == {
        "from": "tiny",
        "to": "small",
        "change": "upgrade",
        "at_once": True,
        "plan": "small",
        "plan_change": None,
    }
    assert (await session.execute_command(b"RCPT", b"TO:<d@example.net>")).code == 250  # the same transaction
    assert (await session.data(b"Subject: y\r\n\r\ny\r\n")).code == 250
    await session.quit()
    status, usage = await api.call("GET", "/v1/accounts/app/usage")
    assert (usage["plan"], usage["accepted"], usage["remaining"]) == ("small", 4, 996)

    status, result = await api.call("PUT", "/v1/accounts/app/plan", {"plan": "tiny"})
    assert status == 200 and (result["change"], result["at_once"], result["plan"]) == ("downgrade", False, "small")
    assert result["plan_change"]["plan"] == "tiny" and result["effective"] == result["plan_change"]["effective"]
    assert result["effective"].endswith("T00:00:00+00:00") and result["effective"][8:10] == "01"
    status, account = await api.call("GET", "/v1/accounts/app")
    assert (account["plan"], account["plan_change"]["plan"]) == ("small", "tiny")
    status, result = await api.call("PUT", "/v1/accounts/app/plan", {"plan": "small"})
    assert (result["change"], result["plan_change"]) == ("cancelled", None)
    status, (event,) = await api.call("GET", "/v1/audit?account=app&limit=1")
    assert (event["action"], event["detail"], event["changes"]["plan_change"][1]) == (
        "plan.change",
        {"plan": "small"},
        None,
    )


async def test_plan_change_errors_name_the_fix(start_api: Callable[..., Awaitable[Api]]) -> None:
    api = await start_api(plans=PLAN_CHANGE_PLANS)
    await api.call("POST", "/v1/accounts", {**NEW_ACCOUNT, "plan": "e"})
    status, body = await api.call("PUT", "/v1/accounts/app/plan", {"plan": "gold"})
    assert status == 400 and body["error"].startswith("plan 'gold' is not defined (known: e, e-big, pro, small")
    status, body = await api.call("PUT", "/v1/accounts/app/plan", {})
    assert (status, body["error"]) == (400, "plan: this field is required")
    status, body = await api.call("PUT", "/v1/accounts/app/plan", {"plan": 5})
    assert (status, body["error"]) == (400, "plan: give a string")
    status, body = await api.call("PUT", "/v1/accounts/app/plan", {"plan": "e-big", "at": "now"})
    assert status == 400 and body["error"].startswith("at: unknown field")
    assert (await api.call("PUT", "/v1/accounts/ghost/plan", {"plan": "e-big"}))[0] == 404
    status, body = await api.call("PUT", "/v1/accounts/app/plan", {"plan": "pro"})
    assert status == 409 and "a plan change keeps the account's billing periods" in body["error"]
    status, account = await api.call("GET", "/v1/accounts/app")
    assert (account["plan"], account["plan_change"]) == ("e", None)  # refused changes change nothing
    status, events = await api.call("GET", "/v1/audit?account=app")
    assert [e["action"] for e in events] == ["account.add"]


async def test_preview_from_a_balance_through_scripted_events(api: Api) -> None:
    events = [
        {"at": 12, "type": "limit", "which": "included", "emails": 20},
        {"at": 15, "type": "payment", "state": "failed"},
        {"at": 18, "type": "payment", "state": "ok"},
    ]
    status, result = await api.call(
        "POST", "/v1/plans/e/preview", {"emails": 30, "start": "2026-04-01", "balance": "5.00", "events": events}
    )
    assert status == 200, result
    assert (result["balance"], result["accepted"], result["refused"]) == ("5.00", 27, 3)
    assert [(r["first"], r["last"], r["reason"]) for r in result["refusals"]] == [(16, 18, "payment_failed")]
    assert [(e["at"], e["type"]) for e in result["events"]] == [(12, "limit"), (15, "payment"), (18, "payment")]
    # 11 and 12 over the first 10 (a $1 block of 5); raised to 20: 21-27 over it, overage 9: two blocks.
    assert [(c["key"], c["trigger_email"]) for c in result["charges"]] == [("block/1", 11), ("block/2", 24)]
    assert [line["description"] for line in result["invoice"]["lines"]] == [
        "Email overage: 9 emails. Cost: $2",
        "Charged during the period: 2 usage charges",
    ]
    for bad, message in [
        ({"events": {"at": 1}}, "events: give a list"),
        ({"events": [{"at": 1, "type": "refund"}]}, "events[0].type: 'refund' is not an event"),
        ({"events": [{"at": 1, "type": "top_up", "amount": 5}]}, "events[0].amount: write the top-up"),
        ({"events": [{"at": 1, "type": "payment", "state": "ok", "x": 1}]}, "events[0].x: unknown field"),
        ({"events": [{"at": 99, "type": "payment", "state": "ok"}]}, "events[0].at: 99 is not between 0 and"),
        ({"events": [{"at": 1, "type": "plan", "plan": "gold"}]}, "events[0].plan: 'gold' is not a plan"),
        ({"balance": 5}, "balance: write money as a decimal string"),
        ({"balance": "-5.00"}, "balance: the starting balance must not be negative"),
    ]:
        status, body = await api.call("POST", "/v1/plans/e/preview", {"emails": 30, **bad})
        assert status == 400 and body["error"].startswith(message), (bad, body)


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
    status, body = await api.call(
        "POST", "/v1/accounts", {**NEW_ACCOUNT, "name": "x", "plan": "e", "monthly_payment": "5.00"}
    )
    assert status == 400 and "postpaid" in body["error"]
    status, events = await api.call("GET", "/v1/audit?account=app")
    assert [e["action"] for e in events] == ["balance.monthly", "account.add"]
    assert events[0]["detail"] == {"amount": "35.00"} and events[0]["actor"] == "ops"
    assert [c["amount"] for c in events[0]["changes"]["monthly_payment_changes"][1]] == ["20.00", "35.00"]
