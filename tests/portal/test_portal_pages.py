"""The portal over HTTP (aiohttp client): sign-in and its lockout, each model's page matching
`mailmeter usage --json`, the forms and their CSRF check, and one account never reaching
another's data. The same in a real browser: tests/portal/test_portal_browser.py."""

from __future__ import annotations

import html
import re
from collections.abc import Callable

from tests.conftest import PASSWORD
from tests.portal.harness import Holder, Portal, holders, portal  # noqa: F401 (fixtures)

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
