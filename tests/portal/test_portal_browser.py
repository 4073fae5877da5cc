"""The portal in a real browser: Debian's chromium, headless, driven by Playwright.

Sign-in and sign-out, the model D screen with the documented example's figures, a spending
limit raised in the page unblocking an open SMTP session, CSRF refused, one account unable
to reach another's pages, and every page at a phone's width (375 px) without horizontal
overflow; a screenshot of each page goes to test-artifacts/screenshots/ for a reviewer.
"""

from __future__ import annotations

import base64
import os
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
from playwright.async_api import Browser, BrowserContext, Page, async_playwright

from tests.conftest import PASSWORD, RawSmtp, free_port
from tests.portal.harness import Portal, portal  # noqa: F401 (fixture)
from tests.portal.test_portal_pages import DOCUMENTED_D_SCREEN, suppress

CHROMIUM = "/usr/bin/chromium"
SCREENSHOTS = Path(__file__).parents[2] / "test-artifacts" / "screenshots"
PHONE = {"width": 375, "height": 812}

pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM) and os.environ.get("CI") != "true",
    reason="Debian's chromium is not installed (.ci/run installs it; with CI=true this fails instead)",
)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield browser
        finally:
            await browser.close()


async def signed_in(browser: Browser, portal: Portal, name: str, width: int = 1024) -> tuple[BrowserContext, Page]:
    context = await browser.new_context(viewport={"width": width, "height": 900})
    page = await context.new_page()
    await page.goto(portal.url + "/usage")
    assert page.url.endswith("/signin")
    await page.fill("#name", name)
    await page.fill("#password", PASSWORD)
    await page.click("#signin")
    await page.wait_for_url("**/usage")
    return context, page


async def screen_rows(page: Page) -> list[str]:
    return [text.strip() for text in await page.locator("#screen tr td:first-child").all_inner_texts()]


async def no_horizontal_overflow(page: Page) -> None:
    width = await page.evaluate("() => document.documentElement.scrollWidth")
    viewport = await page.evaluate("() => window.innerWidth")
    assert width <= viewport, f"{page.url}: {width}px wide in a {viewport}px viewport"


async def test_sign_in_and_sign_out(browser: Browser, portal: Portal) -> None:
    await portal.add("d", "included-capped")
    context, page = await signed_in(browser, portal, "d")
    assert await page.locator(".who").inner_text() == "d"
    cookies = {c["name"]: c for c in await context.cookies()}
    assert cookies["mm_session"]["httpOnly"] and cookies["mm_session"]["sameSite"] == "Strict"
    await page.click("#signout")
    await page.wait_for_url("**/signin")
    await page.goto(portal.url + "/usage")
    assert page.url.endswith("/signin")  # the session is gone
    await page.fill("#name", "d")
    await page.fill("#password", "not the password")
    await page.click("#signin")
    assert "Wrong account name, password or token" in await page.locator("[role=alert]").inner_text()
    await context.close()


async def test_model_d_screen_shows_the_documented_example(browser: Browser, portal: Portal) -> None:
    await portal.add("d", "included-capped")
    assert await portal.send("d", 135_640) == 135_640
    context, page = await signed_in(browser, portal, "d")
    assert await screen_rows(page) == DOCUMENTED_D_SCREEN == (await portal.service.usage("d"))["dashboard"]
    text = await page.locator("#screen").inner_text()
    assert "214 x 167" in text and "100,000 + 35,738" in text and "You have 98 emails left" in text
    assert await page.locator("svg.chart rect.day").count() == 15  # Dec 6 to Dec 20
    await context.close()


async def test_a_spending_limit_raised_in_the_browser_unblocks_an_open_smtp_session(
    browser: Browser, portal: Portal
) -> None:
    await portal.add("d", "included-capped")
    assert await portal.send("d", 200_032) == 200_032
    smtp = await RawSmtp.open(portal.relay.port)
    context, page = await signed_in(browser, portal, "d")
    try:
        await smtp.reply()
        await smtp.command("EHLO client.test")
        login = base64.b64encode(f"\0d\0{PASSWORD}".encode()).decode()
        assert (await smtp.command(f"AUTH PLAIN {login}")).code == 235
        assert (await smtp.command("MAIL FROM:<app@d.example>")).code == 250
        assert (await smtp.command("RCPT TO:<one@example.net>")).code == 250
        assert (await smtp.command("RCPT TO:<two@example.net>")).code == 452  # the $599 limit is reached
        await page.fill("#limits-spending", "700.00")
        await page.click("#limits-spending ~ button")
        await page.wait_for_url("**/usage?done=spending")
        assert "$700 spending limit" in await screen_rows(page)
        assert (await smtp.command("RCPT TO:<two@example.net>")).code == 250  # the same session
    finally:
        smtp.close()
        await context.close()


async def test_csrf_refused_in_the_browser(browser: Browser, portal: Portal) -> None:
    await portal.add("d", "included-capped")
    context, page = await signed_in(browser, portal, "d")
    for forged in ("forged-token", None):
        await page.goto(portal.url + "/usage")
        await page.fill("#limits-spending", "1.00")
        if forged is None:
            await page.evaluate(
                "() => document.querySelector('form[action=\"/limits/spending\"] [name=csrf]').remove()"
            )
        else:
            await page.evaluate(
                "(t) => document.querySelector('form[action=\"/limits/spending\"] [name=csrf]').value = t", forged
            )
        async with page.expect_navigation() as navigation:
            await page.click("#limits-spending ~ button")
        response = await navigation.value
        assert response is not None and response.status == 403
        assert "did not come from this site" in await page.content()
    assert (await portal.service.usage("d"))["spending_limit"] == "599.00"
    await context.close()


async def test_one_account_cannot_reach_anothers_pages(browser: Browser, portal: Portal) -> None:
    await portal.add("alice", "included-capped", "2025-11-06")
    await portal.add("bob", "included-capped", "2025-11-06")
    portal.clock.now = datetime(2025, 11, 20, tzinfo=timezone.utc)
    await portal.send("alice", 100_500, "alice-campaign")
    portal.clock.now = datetime(2025, 12, 20, tzinfo=timezone.utc)
    await portal.relay.billing.close_due_periods()
    [invoice] = await portal.service.invoices("alice")
    await suppress(portal, "alice", "alice-gone@dest.test")
    await portal.service.set_webhook("alice", "https://hooks.test/alice-hook", ["payment"])
    await portal.service.payment("alice", "failed", "alice-card declined")
    alice, alice_page = await signed_in(browser, portal, "alice")
    bob, bob_page = await signed_in(browser, portal, "bob")
    urls = ["/usage", "/usage/chart.svg", "/invoices", f"/invoices/{invoice['id']}", "/events", "/suppressed"]
    for url in urls:
        response = await alice_page.goto(portal.url + url)
        assert response is not None and response.status == 200
        response = await bob_page.goto(portal.url + url)
        assert response is not None and response.status in (200, 404), url
        assert "alice" not in await bob_page.content(), url
    response = await bob_page.goto(portal.url + f"/invoices/{invoice['id']}")
    assert response is not None and response.status == 404
    await alice_page.goto(portal.url + "/suppressed")
    assert "alice-gone@dest.test" in await alice_page.locator("#suppressions").inner_text()
    await alice.close()
    await bob.close()


async def test_every_page_at_a_phones_width_with_a_screenshot(browser: Browser, portal: Portal) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    plans = {"a": "per-email-threshold", "b": "prepaid-tiered", "c": "delivery-results", "d": "included-capped"}
    plans["e"] = "limit-overage"
    portal.clock.now = datetime(2025, 11, 20, tzinfo=timezone.utc)
    for name, plan in plans.items():
        await portal.add(name, plan, "2025-11-06" if name == "d" else "2025-11-01")
        await portal.send(name, {"b": 40_000, "d": 135_640}.get(name, 60_000), "newsletter")
    portal.clock.now = datetime(2025, 12, 20, tzinfo=timezone.utc)
    await portal.relay.billing.close_due_periods()
    for name in plans:
        await portal.send(name, 30_000, "newsletter")
        await portal.send(name, 5_000, "receipts")
    # Long values for the Events and Suppressed pages: a webhook nothing answers (its errors
    # in the delivery log) and long addresses.
    nowhere = f"http://127.0.0.1:{free_port()}/a-rather-long-path/for-the-webhook-receiver/that-nothing-listens-on"
    for address in ("nobody@dest.test", "a.very.long.mailbox.name.that.does.not.exist.anymore@subdomain.example.org"):
        await suppress(portal, "d", address)
    await portal.service.set_webhook("d", nowhere)
    await portal.service.payment("d", "failed", "card declined by the issuing bank, please update the payment method")
    await portal.relay.event_sender().send_due()
    context = await browser.new_context(viewport=PHONE)
    page = await context.new_page()
    await page.goto(portal.url + "/signin")
    await no_horizontal_overflow(page)
    await page.screenshot(path=str(SCREENSHOTS / "signin.png"), full_page=True)
    await context.close()
    for name in plans:
        context, page = await signed_in(browser, portal, name, width=PHONE["width"])
        [invoice] = await portal.service.invoices(name)
        urls = [("usage", "/usage"), ("invoices", "/invoices"), ("invoice", f"/invoices/{invoice['id']}")]
        urls += [("events", "/events"), ("suppressed", "/suppressed")]
        for slug, url in urls:
            response = await page.goto(portal.url + url)
            assert response is not None and response.status == 200, url
            await no_horizontal_overflow(page)
            await page.screenshot(path=str(SCREENSHOTS / f"{name}-{slug}.png"), full_page=True)
        await context.close()
    assert len(list(SCREENSHOTS.glob("*.png"))) >= 26


async def test_events_and_suppressed_pages_from_the_nav_and_a_removal(browser: Browser, portal: Portal) -> None:
    await portal.add("d", "included-capped")
    await suppress(portal, "d", "nobody@dest.test")
    await suppress(portal, "d", "gone@dest.test")
    await portal.service.set_webhook("d", f"http://127.0.0.1:{free_port()}/hook", ["payment"])
    await portal.service.payment("d", "failed", "card declined")
    await portal.relay.event_sender().send_due()  # nothing listens: an attempt without an answer
    context, page = await signed_in(browser, portal, "d", width=PHONE["width"])
    await page.click("header nav >> text=Events")
    await page.wait_for_url("**/events")
    assert "/hook" in await page.locator("#webhook").inner_text()
    log = await page.locator("article.event table.attempts").inner_text()
    assert "no answer" in log and "Connect" in log
    await page.click("header nav >> text=Suppressed")
    await page.wait_for_url("**/suppressed")
    assert await page.locator("#suppressions tbody tr").count() == 2
    await page.click("button[aria-label='Remove nobody@dest.test']")
    await page.wait_for_url("**/suppressed?removed=*")
    assert "nobody@dest.test is no longer suppressed" in await page.locator("[role=status]").inner_text()
    assert await page.locator("#suppressions tbody tr").count() == 1
    assert [s["address"] for s in await portal.service.suppressions("d")] == ["gone@dest.test"]
    await no_horizontal_overflow(page)
    await context.close()


async def test_the_invoice_prints_without_the_pages_chrome(browser: Browser, portal: Portal) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    await portal.add("d", "included-capped", "2025-11-06")
    portal.clock.now = datetime(2025, 11, 20, tzinfo=timezone.utc)
    await portal.send("d", 135_640)
    portal.clock.now = datetime(2025, 12, 20, tzinfo=timezone.utc)
    await portal.relay.billing.close_due_periods()
    [invoice] = await portal.service.invoices("d")
    context, page = await signed_in(browser, portal, "d")
    await page.goto(portal.url + f"/invoices/{invoice['id']}")
    lines = await page.locator("#lines").inner_text()
    assert "Email overage: 35,640 emails" in lines and "214.00 USD" in lines
    assert await page.locator("header").is_visible() and await page.locator("#print").is_visible()
    await page.emulate_media(media="print")
    assert not await page.locator("header").is_visible() and not await page.locator("#print").is_visible()
    assert await page.locator("#lines").is_visible()
    await page.pdf(path=str(SCREENSHOTS / "d-invoice.pdf"))
    assert (SCREENSHOTS / "d-invoice.pdf").read_bytes().startswith(b"%PDF")
    await context.close()
