"""A running relay with its portal enabled, the five example plans, and a fixed clock; and an
HTTP client that signs in as an account holder (cookies, CSRF tokens), for the portal's tests."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from mailmeter.node import Relay
from mailmeter.service import AdminService
from tests.conftest import PASSWORD, RelayHarness, Upstream

PLANS = yaml.safe_load((Path(__file__).parents[1] / "policies" / "five_plans.yaml").read_text())["plans"]
NOW = datetime(2025, 12, 20, 12, 0, tzinfo=timezone.utc)  # model D's worked example: period Dec 6 - Jan 5
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@dataclass
class FixedClock:
    now: datetime = NOW

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Portal:
    """The relay under test; `url` is its portal's base URL."""

    harness: RelayHarness
    clock: FixedClock

    @property
    def relay(self) -> Relay:
        assert self.harness.relay is not None
        return self.harness.relay

    @property
    def url(self) -> str:
        assert self.relay.portal is not None
        return f"http://127.0.0.1:{self.relay.portal.port}"

    @property
    def service(self) -> AdminService:
        return AdminService(self.relay.meter, self.relay.billing, "test")

    async def add(self, name: str, plan: str, subscribed: str = "2025-12-06", **extra: Any) -> None:
        await self.service.add_account(
            name, PASSWORD, plan, [f"{name}.example"], [], [], datetime.fromisoformat(subscribed).date(), **extra
        )

    async def send(self, name: str, emails: int, campaign: str = "") -> int:
        """Commit `emails` in one message straight through the meter (as SMTP would)."""
        meter = self.relay.meter
        grant = await meter.reserve(name, None, emails)
        if grant.granted == 0:
            await meter.release(grant.hold_id)
            return 0
        self.sent = getattr(self, "sent", 0) + 1
        await meter.commit(grant.hold_id, f"P{name}{self.sent:06d}", grant.granted, campaign)
        return grant.granted


@dataclass
class Holder:
    """One browser-like client: its own cookie jar, signed in as one account."""

    portal: Portal
    http: aiohttp.ClientSession
    csrf: str = ""
    pages: dict[str, str] = field(default_factory=dict)

    async def get(self, path: str) -> tuple[int, str]:
        async with self.http.get(self.portal.url + path, allow_redirects=False) as response:
            text = await response.text()
            found = _CSRF.search(text)
            if found:
                self.csrf = found.group(1)
            return response.status, response.headers.get("Location", "") if 300 <= response.status < 400 else text

    async def post(self, path: str, data: dict[str, str], csrf: str | None = "session") -> tuple[int, str]:
        form = dict(data)
        if csrf == "session":
            form["csrf"] = self.csrf
        elif csrf is not None:
            form["csrf"] = csrf
        async with self.http.post(self.portal.url + path, data=form, allow_redirects=False) as response:
            text = await response.text()
            return response.status, response.headers.get("Location", "") if 300 <= response.status < 400 else text

    async def sign_in(self, name: str, password: str = PASSWORD) -> tuple[int, str]:
        await self.get("/signin")
        return await self.post("/signin", {"name": name, "password": password})

    async def sign_in_token(self, token: str) -> tuple[int, str]:
        await self.get("/signin")
        return await self.post("/signin", {"token": token})


def portal_overrides(**extra: Any) -> dict[str, Any]:
    return {"portal": {"enabled": True, "port": 0}, "plans": PLANS, **extra}


@pytest.fixture
async def portal(make_relay: Callable[..., RelayHarness], upstream: Upstream) -> AsyncIterator[Portal]:
    harness = make_relay(upstream.port, **portal_overrides())
    relay = await harness.start()
    clock = FixedClock()
    relay.meter.clock = clock
    yield Portal(harness, clock)


@pytest.fixture
async def holders(portal: Portal) -> AsyncIterator[Callable[[], Holder]]:
    sessions: list[aiohttp.ClientSession] = []

    def new() -> Holder:
        http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        sessions.append(http)
        return Holder(portal, http)

    yield new
    for http in sessions:
        await http.close()
