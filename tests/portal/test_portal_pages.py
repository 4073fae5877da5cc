"""The portal over HTTP (aiohttp client): sign-in and its lockout, each model's page matching
`mailmeter usage --json`, the forms and their CSRF check, and one account never reaching
another's data. The same in a real browser: tests/portal/test_portal_browser.py."""

from __future__ import annotations

import asyncio
import base64
import csv
import hashlib
import html
import io
import re
import ssl
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aiohttp
import trustme

from tests.conftest import PASSWORD, RawSmtp, RelayHarness, Upstream
from tests.portal.harness import FixedClock, Holder, Portal, holders, portal, portal_overrides  # noqa: F401 (fixtures)
from tests.test_billing_live import SECRET, PaymentServer, payments  # noqa: F401 (fixture)
from tests.test_events_suppression import Receiver, receiver  # noqa: F401 (fixture)

DOCUMENTED_D_SCREEN = [
    "Pro 100k",
    "Dec 6 - Jan 5",
    "35,738 extra emails",
    "135,640 emails sent",
    "135,738 total allowed",
    "$214 spent",
    "$599 spending limit",
    "98 emails remaining",
]


def screen_rows(page: str) -> list[str]:
    table = re.search(r'<table class="screen" id="screen">(.*?)</table>', page, re.S)
    assert table is not None, page
    return [html.unescape(cell) for cell in re.findall(r"<tr><td>(.*?)</td>", table.group(1))]


async def test_sign_in_with_password_then_sign_out(portal: Portal, holders: Callable[[], Holder]) -> None:
    await portal.add("d", "included-capped")
    holder = holders()
    assert await holder.get("/usage") == (303, "/signin")
    assert (await holder.sign_in("d"))[:2] == (303, "/usage")
    status, page = await holder.get("/usage")
    assert status == 200 and "Pro 100k" in page and 'href="/invoices"' in page
    assert (await holder.post("/signout", {}))[:2] == (303, "/signin")
    assert await holder.get("/usage") == (303, "/signin")


async def test_session_cookie_is_httponly_and_strict(portal: Portal, holders: Callable[[], Holder]) -> None:
    await portal.add("d", "included-capped")
    holder = holders()
    await holder.get("/signin")
    async with holder.http.post(
        portal.url + "/signin", data={"name": "d", "password": PASSWORD, "csrf": holder.csrf}, allow_redirects=False
    ) as response:
        cookie = response.headers.getall("Set-Cookie")
    session = next(c for c in cookie if c.startswith("mm_session="))
    assert "HttpOnly" in session and "SameSite=Strict" in session and "Secure" not in session  # HTTP here


async def test_the_model_d_page_is_the_documented_screen(portal: Portal, holders: Callable[[], Holder]) -> None:
    await portal.add("d", "included-capped")
    assert await portal.send("d", 135_640) == 135_640
    holder = holders()
    await holder.sign_in("d")
    status, page = await holder.get("/usage")
    usage = await portal.service.usage("d")
    assert status == 200 and screen_rows(page) == usage["dashboard"] == DOCUMENTED_D_SCREEN
    assert "214 x 167" in page and "100,000 + 35,738" in page and "135,738 - 135,640" in page
    assert "Sending beyond 135,738 will add another usage increment" in page
    assert "<svg" in page and "total allowed 135,738" in page


def plain(name: str, password: str = PASSWORD) -> str:
    return base64.b64encode(f"\0{name}\0{password}".encode()).decode()


async def test_password_sign_in_shares_the_smtp_auth_lockout(portal: Portal, holders: Callable[[], Holder]) -> None:
    await portal.add("d", "included-capped")
    holder = holders()
    for _ in range(5):  # abuse.auth_max_failures (5): the name is locked
        assert (await holder.sign_in("d", "wrong password"))[0] == 401
    status, page = await holder.sign_in("d")
    assert status == 429 and "Too many failed sign-ins" in page
    smtp = await RawSmtp.open(portal.relay.port)
    try:
        await smtp.reply()
        await smtp.command("EHLO client.test")
        reply = await smtp.command(f"AUTH PLAIN {plain('d')}")
        assert reply.code == 454 and "locked" in reply.text  # the right password, locked by the portal's failures
    finally:
        smtp.close()
    portal.relay.context.auth_guard.clear()  # the operator's SIGUSR1
    assert (await holder.sign_in("d"))[:2] == (303, "/usage")


async def test_sign_in_with_the_account_token(portal: Portal, holders: Callable[[], Holder]) -> None:
    await portal.add("d", "included-capped")
    old = (await portal.service.account_token("d"))["token"]
    token = (await portal.service.account_token("d"))["token"]  # replaces the first
    holder = holders()
    assert (await holder.sign_in_token(old))[0] == 401
    assert (await holder.sign_in_token(token))[:2] == (303, "/usage")
    status, page = await holder.get("/usage")
    assert status == 200 and "Pro 100k" in page
    stored = await portal.relay.store._read("SELECT token_hash FROM account_tokens")  # type: ignore[attr-defined]
    assert [row[0] for row in stored] == [hashlib.sha256(token.encode()).hexdigest()]  # never the token


async def test_every_post_without_the_sessions_csrf_token_is_refused(
    portal: Portal, holders: Callable[[], Holder]
) -> None:
    await portal.add("d", "included-capped")
    holder = holders()
    await holder.get("/signin")
    assert (await holder.post("/signin", {"name": "d", "password": PASSWORD}, csrf=None))[0] == 403
    assert (await holder.post("/signin", {"name": "d", "password": PASSWORD}, csrf="forged"))[0] == 403
    await holder.sign_in("d")
    await holder.get("/usage")
    for path, data in FORMS:
        for csrf in (None, "forged", ""):
            status, page = await holder.post(path, data, csrf=csrf)
            assert status == 403 and "did not come from this site" in page, (path, csrf)
    assert (await portal.service.usage("d"))["spending_limit"] == "599.00"  # nothing changed
    assert (await holder.post("/signout", {}, csrf=None))[0] == 403
    assert (await holder.get("/usage"))[0] == 200  # still signed in


FORMS = [
    ("/limits/spending", {"amount": "700.00"}),
    ("/limits/monthly", {"emails": "60000"}),
    ("/monthly-payment", {"amount": "150.00"}),
    ("/top-up", {"amount": "5.00"}),
    ("/repay", {}),
    ("/suppressed/remove", {"address": "nobody@dest.test"}),
]


async def test_a_spending_limit_raised_in_the_portal_unblocks_an_open_smtp_session(
    portal: Portal, holders: Callable[[], Holder]
) -> None:
    await portal.add("d", "included-capped")
    assert await portal.send("d", 200_032) == 200_032  # one email left under the $599 limit
    smtp = await RawSmtp.open(portal.relay.port)
    try:
        await smtp.reply()
        await smtp.command("EHLO client.test")
        assert (await smtp.command(f"AUTH PLAIN {plain('d')}")).code == 235
        assert (await smtp.command("MAIL FROM:<app@d.example>")).code == 250
        assert (await smtp.command("RCPT TO:<one@example.net>")).code == 250  # email 200,033
        refused = await smtp.command("RCPT TO:<two@example.net>")
        assert refused.code == 452 and "Spending limit" in refused.text
        holder = holders()
        await holder.sign_in("d")
        await holder.get("/usage")
        assert await holder.post("/limits/spending", {"amount": "700.00"}) == (303, "/usage?done=spending")
        assert (await smtp.command("RCPT TO:<two@example.net>")).code == 250  # the same session, live
        assert (await smtp.command("DATA")).code == 354
        assert (await smtp.command(b"Subject: t\r\n\r\nhello\r\n.")).code == 250
    finally:
        smtp.close()
    assert (await portal.service.usage("d"))["emails_sent"] == 200_034
    status, page = await holder.get("/usage?done=spending")
    assert "$700 spending limit" in page and "resumes at once" in page
    [event] = [e for e in await portal.service.audit("d") if e["action"] == "limit.spending"]
    assert event["actor"] == "portal:d"


async def test_a_bad_value_is_shown_on_the_page(portal: Portal, holders: Callable[[], Holder]) -> None:
    await portal.add("d", "included-capped")
    holder = holders()
    await holder.sign_in("d")
    await holder.get("/usage")
    status, page = await holder.post("/limits/spending", {"amount": "lots"})
    assert status == 400 and 'role="alert"' in page and "amount" in page and "Pro 100k" in page
    status, page = await holder.post("/limits/monthly", {"emails": "60000"})  # model E's form, not D's
    assert status == 400 and "not something this account" in page


async def test_model_e_limit_change_follows_its_rule(portal: Portal, holders: Callable[[], Holder]) -> None:
    await portal.add("e", "limit-overage", "2025-11-01")
    portal.clock.now = datetime(2025, 11, 20, tzinfo=timezone.utc)
    await portal.send("e", 7_000, "autumn")
    await portal.send("e", 3_000)
    portal.clock.now = datetime(2025, 12, 20, tzinfo=timezone.utc)
    await portal.relay.billing.close_due_periods()
    assert await portal.send("e", 51_200, "spring") == 51_200
    holder = holders()
    await holder.sign_in("e")
    status, page = await holder.get("/usage")
    assert status == 200 and "50,000 emails" in page and "51,200 emails" in page and "spring" in page
    assert "1,200 emails (1 overage charges" in page
    history = re.search(r'<div id="history">(.*?)</div></section>', page, re.S)
    assert history is not None and "autumn: 7,000; (untagged): 3,000" in history.group(1) and "10,000" in page
    assert (await holder.post("/limits/monthly", {"emails": "60000"}))[0] == 303
    assert (await portal.service.usage("e"))["included_emails"] == 60_000  # an increase: at once
    assert (await holder.post("/limits/monthly", {"emails": "40000"}))[0] == 303
    assert (await portal.service.usage("e"))["included_emails"] == 60_000  # a decrease: at the period's end
    status, page = await holder.get("/usage")
    assert "60,000 emails" in page and "40,000 emails (the decrease applies when this period ends)" in page


async def test_model_b_top_up_rises_the_balance_when_the_gateway_confirms(
    portal: Portal, holders: Callable[[], Holder]
) -> None:
    await portal.add("b", "prepaid-tiered", "2025-12-01")
    before = (await portal.service.usage("b"))["prepaid"]["remaining"]
    holder = holders()
    await holder.sign_in("b")
    status, page = await holder.get("/usage")
    assert status == 200 and f"{before} USD" in page and "100,000 more emails" in page
    assert (await holder.post("/top-up", {"amount": "1.00"}))[:2] == (303, "/usage?done=topup")
    [charge] = [c for c in await portal.service.charges("b") if c["kind"] == "topup"]
    assert charge["status"] == "recorded"  # billing.gateway.kind none: for the external system to collect
    assert (await portal.service.usage("b"))["prepaid"]["remaining"] == before  # not yet
    await portal.service.settle_charge(charge["key"], "collected")
    usage = await portal.service.usage("b")
    assert usage["prepaid"]["remaining"] == "101.00" and usage["remaining"] == 101_250
    status, page = await holder.get("/usage")
    assert "101,250 more emails" in page and "succeeded" in page
    assert (await holder.post("/monthly-payment", {"amount": "150.00"}))[0] == 303
    assert (await portal.service.usage("b"))["prepaid"]["next_monthly_payment"] == "150.00"


async def test_a_confirmed_top_up_unblocks_an_open_smtp_session(portal: Portal, holders: Callable[[], Holder]) -> None:
    await portal.add("b", "prepaid-tiered", "2025-12-01")
    assert await portal.send("b", 99_999) == 99_999  # the $100 credit covers 100,000 emails
    holder = holders()
    await holder.sign_in("b")
    await holder.get("/usage")
    smtp = await RawSmtp.open(portal.relay.port)
    try:
        await smtp.reply()
        await smtp.command("EHLO client.test")
        assert (await smtp.command(f"AUTH PLAIN {plain('b')}")).code == 235
        assert (await smtp.command("MAIL FROM:<app@b.example>")).code == 250
        assert (await smtp.command("RCPT TO:<one@example.net>")).code == 250  # email 100,000
        refused = await smtp.command("RCPT TO:<two@example.net>")
        assert refused.code == 452 and "Prepaid balance is used up" in refused.text
        assert (await holder.post("/top-up", {"amount": "1.00"}))[0] == 303
        assert (await smtp.command("RCPT TO:<two@example.net>")).code == 452  # asked for, not confirmed
        [charge] = [c for c in await portal.service.charges("b") if c["kind"] == "topup"]
        await portal.service.settle_charge(charge["key"], "collected")  # the gateway confirms
        assert (await smtp.command("RCPT TO:<two@example.net>")).code == 250  # the same session, live
    finally:
        smtp.close()


async def test_model_c_repay_overdrawn_through_the_gateway(portal: Portal, holders: Callable[[], Holder]) -> None:
    await portal.add("c", "delivery-results", "2025-11-01")
    portal.clock.now = datetime(2025, 11, 10, tzinfo=timezone.utc)
    await portal.send("c", 1000)
    [queue_id] = [
        row[0]
        for row in await portal.relay.store._read("SELECT queue_id FROM messages")  # type: ignore[attr-defined]
    ]
    for n in range(1000):
        await portal.relay.meter.record_result(queue_id, f"r{n}@example.net", "delivered")
    portal.clock.now = datetime(2025, 12, 2, tzinfo=timezone.utc)
    await portal.relay.billing.close_due_periods()
    holder = holders()
    await holder.sign_in("c")
    status, page = await holder.get("/usage")
    assert status == 200 and "Overdrawn: 0.30 USD" in page and "Repay overdrawn (0.30 USD)" in page
    assert (await holder.post("/repay", {}))[:2] == (303, "/usage?done=repay")
    assert (await holder.post("/repay", {}))[0] == 409  # one repayment at a time
    [charge] = [c for c in await portal.service.charges("c") if c["kind"] == "repay"]
    assert (charge["amount"], charge["status"]) == ("0.30", "recorded")
    assert (await portal.service.account("c"))["overdrawn"] == "0.30"
    await portal.service.settle_charge(charge["key"], "collected")
    assert (await portal.service.account("c"))["overdrawn"] == "0.00"
    [invoice] = await portal.service.invoices("c")
    assert invoice["status"] == "paid"
    status, page = await holder.get(f"/invoices/{invoice['id']}")
    assert status == 200 and "Delivered: 1,000 emails" in page and 'id="print"' in page
    status, text = await holder.get(f"/invoices/{invoice['id']}.csv")
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["invoice", "period", "kind", "description", "quantity", "amount", "currency"]
    assert [invoice["id"], "Nov 1 - Nov 30", "total", "Total", "", "0.30", "USD"] in rows


async def test_one_account_never_reaches_anothers_data(portal: Portal, holders: Callable[[], Holder]) -> None:
    await portal.add("alice", "included-capped", "2025-11-06")
    await portal.add("bob", "included-capped", "2025-11-06")
    portal.clock.now = datetime(2025, 11, 20, tzinfo=timezone.utc)
    await portal.send("alice", 100_500, "alice-secret")
    portal.clock.now = datetime(2025, 12, 20, tzinfo=timezone.utc)
    await portal.relay.billing.close_due_periods()
    [invoice] = await portal.service.invoices("alice")
    alice, bob = holders(), holders()
    await alice.sign_in("alice")
    await bob.sign_in("bob")
    await suppress(portal, "alice", "alice-gone@dest.test")
    await portal.service.set_webhook("alice", "https://hooks.test/alice-hook", ["payment"])
    await portal.service.payment("alice", "failed", "alice-card declined")
    urls = [
        "/",
        "/usage",
        "/usage/chart.svg",
        "/invoices",
        f"/invoices/{invoice['id']}",
        f"/invoices/{invoice['id']}.csv",
        "/events",
        "/suppressed",
    ]
    for url in urls:  # every URL alice has, with bob's session
        assert (await alice.get(url))[0] in (200, 303)
        status, page = await bob.get(url)
        assert "alice" not in page and invoice["id"] not in page, url
        assert status in (200, 303, 404), url
    assert "alice-hook" in (await alice.get("/events"))[1] and "alice-gone" in (await alice.get("/suppressed"))[1]
    assert (await bob.get(f"/invoices/{invoice['id']}"))[0] == 404
    assert (await bob.get(f"/invoices/{invoice['id']}.csv"))[0] == 404
    await bob.get("/usage")
    assert (await bob.post("/limits/spending", {"amount": "42.00"}))[0] == 303
    assert (await portal.service.usage("alice"))["spending_limit"] == "599.00"
    assert (await portal.service.usage("bob"))["spending_limit"] == "42.00"
    assert (await bob.post("/limits/spending", {"amount": "43.00"}, csrf=alice.csrf))[0] == 403
    status, page = await bob.post("/suppressed/remove", {"address": "alice-gone@dest.test"})
    assert status == 404 and "not on the suppression list" in page and "alice" not in page.replace("alice-gone", "")
    assert [s["address"] for s in await portal.service.suppressions("alice")] == ["alice-gone@dest.test"]


async def test_over_tls_the_session_cookie_is_secure(
    make_relay: Callable[..., RelayHarness], upstream: Upstream, tmp_path: Path
) -> None:
    authority = trustme.CA()
    certificate = authority.issue_cert("relay.test", "127.0.0.1")
    certificate.cert_chain_pems[0].write_to_path(str(tmp_path / "relay.pem"))
    certificate.private_key_pem.write_to_path(str(tmp_path / "relay.key"))
    overrides = portal_overrides(tls={"certificate": str(tmp_path / "relay.pem"), "key": str(tmp_path / "relay.key")})
    overrides["portal"] = {**overrides["portal"], "tls": True}
    relay = await make_relay(upstream.port, **overrides).start()
    await relay.meter.add_account("d", PASSWORD, "included-capped", ["d.example"], [])
    assert relay.portal is not None
    url = f"https://127.0.0.1:{relay.portal.port}"
    client = ssl.create_default_context()
    authority.configure_trust(client)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        async with http.get(url + "/signin", ssl=client) as response:
            token = re.search(r'name="csrf" value="([^"]+)"', await response.text())
            assert token is not None and "Secure" in response.headers["Set-Cookie"]
        form = {"name": "d", "password": PASSWORD, "csrf": token.group(1)}
        async with http.post(url + "/signin", data=form, ssl=client, allow_redirects=False) as response:
            assert response.status == 303
            session = next(c for c in response.headers.getall("Set-Cookie") if c.startswith("mm_session="))
    assert "Secure" in session and "HttpOnly" in session and "SameSite=Strict" in session


async def test_each_models_page_shows_the_numbers_of_usage_json(portal: Portal, holders: Callable[[], Holder]) -> None:
    plans = {
        "a": "per-email-threshold",
        "b": "prepaid-tiered",
        "c": "delivery-results",
        "d": "included-capped",
        "e": "limit-overage",
    }
    for name, plan in plans.items():
        await portal.add(name, plan, "2025-12-06" if name == "d" else "2025-12-01")
    await portal.send("a", 1_300_000)  # past model A's first $250 threshold (1,250,000 emails)
    await portal.send("b", 40_000)
    await portal.send("c", 2_000, "x")
    await portal.send("d", 100_500)
    await portal.send("e", 51_200, "spring")
    expected = {name: figures(name, await portal.service.usage(name)) for name in plans}
    assert expected["a"][:3] == ["1,300,000 emails accepted", "260.00 USD", "10.00 USD"]
    assert expected["b"][:2] == ["60.00 USD", "60,000 more emails"]
    for name in plans:
        holder = holders()
        await holder.sign_in(name)
        status, page = await holder.get("/usage")
        text = html.unescape(page)
        assert status == 200
        for figure in expected[name]:
            assert figure in text, (name, figure)


def figures(name: str, u: dict[str, Any]) -> list[str]:
    """The numbers of `mailmeter usage NAME --json` that model `name`'s page shows, as it writes them."""
    if name == "a":
        return [
            f"{u['accepted']:,} emails accepted",
            f"{u['spent']} USD",
            f"{u['unbilled']} USD",
            "1 threshold charges",
        ]
    if name == "b":
        return [
            f"{u['prepaid']['remaining']} USD",
            f"{u['remaining']:,} more emails",
            f"{u['prepaid']['available']} USD",
        ]
    if name == "c":
        return [f"{u['by_region']['test']:,}", f"{u['deferred']:,} emails are still waiting", "Normal"]
    if name == "d":
        return list(u["dashboard"])
    return [f"{u['included_emails']:,} emails", f"{u['emails_sent']:,} emails", "spring"]


async def test_a_top_up_through_the_webhook_gateway(
    make_relay: Callable[..., RelayHarness],
    upstream: Upstream,
    tmp_path: Path,
    payments: PaymentServer,
) -> None:
    (tmp_path / "gateway.secret").write_bytes(SECRET + b"\n")
    gateway = {"kind": "webhook", "url": payments.url, "secret_file": "gateway.secret"}
    harness = make_relay(upstream.port, **portal_overrides(billing={"gateway": gateway}))
    await harness.start()
    portal = Portal(harness, FixedClock())
    portal.relay.meter.clock = portal.clock
    await portal.add("b", "prepaid-tiered", "2025-12-01")
    holder = Holder(portal, aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)))
    try:
        await holder.sign_in("b")
        await holder.get("/usage")
        assert (await holder.post("/top-up", {"amount": "2.50"}))[0] == 303  # the gateway answers succeeded
        [charge] = [body for _, body in payments.received if body["kind"] == "topup"]
        assert (charge["kind"], charge["amount"], charge["account"]) == ("topup", "2.50", "b")
        assert (await portal.service.usage("b"))["prepaid"]["remaining"] == "102.50"  # at once
        payments.script.append((200, {"status": "failed", "reason": "card declined"}))
        assert (await holder.post("/top-up", {"amount": "5.00"}))[0] == 303
        usage = await portal.service.usage("b")
        assert usage["prepaid"]["remaining"] == "102.50" and usage["payment_state"] == "failed"
        status, page = await holder.get("/usage")
        assert "Sending is paused because a payment failed" in page and "failed" in page
    finally:
        await holder.http.close()


async def test_an_account_name_with_url_characters_reaches_its_invoice(
    portal: Portal, holders: Callable[[], Holder]
) -> None:
    name = "o'k?#%<b>"
    await portal.service.add_account(name, PASSWORD, "included-capped", ["ok.example"], [], [], NOW_NOV.date())
    portal.clock.now = NOW_NOV
    await portal.send(name, 10)
    portal.clock.now = datetime(2025, 12, 20, tzinfo=timezone.utc)
    await portal.relay.billing.close_due_periods()
    holder = holders()
    await holder.sign_in(name)
    status, page = await holder.get("/invoices")
    link = re.search(r'<a href="(/invoices/[^"]+)">', page)
    assert status == 200 and link is not None and "<b>" not in page
    status, page = await holder.get(html.unescape(link.group(1)))
    assert status == 200 and "Invoice" in page and "&lt;b&gt;" in page
    async with holder.http.get(portal.url + html.unescape(link.group(1)) + ".csv") as response:
        assert response.status == 200 and "attachment" in response.headers["Content-Disposition"]


NOW_NOV = datetime(2025, 11, 6, 12, tzinfo=timezone.utc)


# -- events and suppression (docs/events.md) ------------------------------------------------

NOT_EXIST = "550 5.1.1 <nobody@dest.test>: Recipient address rejected: User unknown"


async def suppress(portal: Portal, name: str, address: str, reply: str = NOT_EXIST) -> None:
    """An email of `name` to `address` that hard-bounced as "does not exist", as the relay records it."""
    assert await portal.send(name, 1) == 1
    queue_id = f"P{name}{portal.sent:06d}"
    code, enhanced = reply.split()[:2]
    assert await portal.relay.meter.record_result(queue_id, address, "hard_bounced", reply, int(code), enhanced)


def attempt_rows(page: str, event: str) -> list[list[str]]:
    """The delivery log of event `event` on the Events page: [attempt, time, HTTP status, error] per row."""
    found = re.search(rf'<article class="event" id="{event}".*?</article>', page, re.S)
    assert found is not None, page
    rows = re.findall(r"<tr>(<td.*?)</tr>", found.group(0), re.S)
    return [[html.unescape(cell) for cell in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)] for row in rows]


async def test_the_events_page_shows_the_webhook_and_each_delivery_attempt(
    portal: Portal, holders: Callable[[], Holder], receiver: Receiver
) -> None:
    await portal.add("d", "included-capped")
    receiver.fail = 1  # 500, then 200
    url = await receiver.start()
    hook = await portal.service.set_webhook("d", url, ["payment", "bounced"])
    receiver.secret = hook["secret"]
    await portal.service.payment("d", "failed", "card declined")
    [event] = await portal.service.events("d")
    holder = holders()
    await holder.sign_in("d")
    status, page = await holder.get("/events")
    assert status == 200 and 'href="/events" aria-current=page' in page
    assert html.escape(url) in page and "Bounced, Payment" in page and hook["secret"] not in page
    assert "payment_state: failed; detail: card declined" in page and "Not sent yet" in page
    sender = portal.relay.event_sender()

    async def attempts(count: int) -> None:
        for _ in range(200):
            if len((await portal.service.events("d"))[0]["attempts"]) >= count:
                return
            await sender.send_due()
            await asyncio.sleep(0.05)
        raise AssertionError(f"no attempt {count}")

    await attempts(1)
    status, page = await holder.get("/events")
    [first] = attempt_rows(page, event["id"])
    assert (
        first[0] == "1"
        and first[1] == "2025-12-20 12:00:00 UTC"
        and first[2:] == ["500", "HTTP 500 Internal Server Error"]
    )
    assert "to be retried at 2025-12-20 12:00:30 UTC" in page  # events.first_delay
    portal.clock.now = NOW_RETRY
    await attempts(2)
    status, page = await holder.get("/events")
    assert attempt_rows(page, event["id"])[1] == ["2", "2025-12-20 12:05:00 UTC", "200", "-"]
    assert 'data-status="delivered"' in page and "delivered to your webhook" in page
    assert receiver.answered == [500, 200] and len(receiver.events()) == 2  # signed, verified


async def test_the_events_page_without_a_webhook(portal: Portal, holders: Callable[[], Holder]) -> None:
    await portal.add("d", "included-capped")
    await portal.service.payment("d", "failed", "card declined")  # no webhook: nothing recorded
    holder = holders()
    await holder.sign_in("d")
    status, page = await holder.get("/events")
    assert status == 200 and "No webhook is set" in page and "No events yet" in page


async def test_a_suppressed_address_removed_in_the_portal_is_accepted_by_an_open_smtp_session(
    portal: Portal, holders: Callable[[], Holder]
) -> None:
    await portal.add("d", "included-capped")
    await suppress(portal, "d", "nobody@dest.test")
    await suppress(portal, "d", "bad@dest.test", "553 5.1.3 <bad@dest.test>: bad address syntax")
    holder = holders()
    await holder.sign_in("d")
    status, page = await holder.get("/suppressed")
    rows = re.findall(r"<tr><td class=\"wrap\"><strong>(.*?)</strong></td><td>(.*?)</td><td>(.*?)<div", page)
    assert status == 200 and 'href="/suppressed" aria-current=page' in page
    assert rows == [
        ("bad@dest.test", "2025-12-20", "Invalid email: the address is malformed"),
        ("nobody@dest.test", "2025-12-20", "Invalid email: the address does not exist"),
    ]
    assert html.escape(NOT_EXIST) in page and page.count(">Remove</button>") == 2
    smtp = await RawSmtp.open(portal.relay.port)
    try:
        await smtp.reply()
        await smtp.command("EHLO client.test")
        assert (await smtp.command(f"AUTH PLAIN {plain('d')}")).code == 235
        assert (await smtp.command("MAIL FROM:<app@d.example>")).code == 250
        refused = await smtp.command("RCPT TO:<nobody@dest.test>")
        assert refused.code == 550 and "5.1.1" in refused.text and "suppressed" in refused.text
        for csrf in (None, "forged"):  # the Remove form without the session's token: nothing happens
            status, page = await holder.post("/suppressed/remove", {"address": "nobody@dest.test"}, csrf=csrf)
            assert status == 403 and "did not come from this site" in page
        assert (await smtp.command("RCPT TO:<nobody@dest.test>")).code == 550
        removed = await holder.post("/suppressed/remove", {"address": "nobody@dest.test"})
        assert removed == (303, "/suppressed?removed=nobody@dest.test")
        assert (await smtp.command("RCPT TO:<nobody@dest.test>")).code == 250  # the same session, live
    finally:
        smtp.close()
    assert [s["address"] for s in await portal.service.suppressions("d")] == ["bad@dest.test"]
    status, page = await holder.get("/suppressed?removed=nobody@dest.test")
    assert "nobody@dest.test is no longer suppressed" in page and page.count(">Remove</button>") == 1
    [event] = [a for a in await portal.service.audit("d") if a["action"] == "suppression.remove"]
    assert event["actor"] == "account:d" and event["detail"] == {"address": "nobody@dest.test"}
    status, page = await holder.post("/suppressed/remove", {"address": "nobody@dest.test"})  # gone already
    assert status == 404 and 'role="alert"' in page and "not on the suppression list" in page
    status, page = await holder.post("/suppressed/remove", {"address": "no at sign"})
    assert status == 400 and "is not an email address" in page


NOW_RETRY = datetime(2025, 12, 20, 12, 5, tzinfo=timezone.utc)
