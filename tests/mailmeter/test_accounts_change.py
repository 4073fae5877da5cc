"""Day-two account changes against a running relay: change, suspend, resume, delete, show
(issue 17 item 1), through the CLI and the admin API on the same database."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiosmtplib
import pytest

from mailmeter.metering.meter import Meter
from tests.conftest import PASSWORD, Upstream, settled_usage
from tests.mailmeter.test_api import NEW_ACCOUNT, Api, api, start_api  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[2]
NEW_PASSWORD = "a new passphrase for the leaked one"


def mailmeter(api: Api, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """The `mailmeter` command on the running relay's config (and so its database)."""
    return subprocess.run(
        [sys.executable, "-m", "mailmeter.cli", "--config", str(api.harness.directory / "config.yaml"), *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=60,
        cwd=REPO,
    )


async def session(api: Api, user: str = "app", password: str = PASSWORD) -> aiosmtplib.SMTP:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=api.harness.port, start_tls=False, timeout=10)
    await client.connect()
    await client.login(user, password)
    return client


async def test_suspend_refuses_a_live_sessions_next_rcpt_and_resume_releases_it(api: Api) -> None:
    assert (await api.call("POST", "/v1/accounts", NEW_ACCOUNT))[0] == 201
    client = await session(api)
    assert (await client.mail("app@example.com")).code == 250
    assert (await client.rcpt("one@dest.test"))[0] == 250

    suspended = mailmeter(api, "account", "suspend", "app")
    assert suspended.returncode == 0, suspended.stderr
    assert "suspended" in suspended.stdout
    reply = await client.execute_command(b"RCPT", b"TO:<two@dest.test>")
    assert reply.code == 452 and reply.message.startswith("4.7.1 Sending is suspended for this account")
    status, account = await api.call("GET", "/v1/accounts/app")
    assert status == 200 and account["standing"] == "suspended" and account["suspended"] is True

    status, account = await api.call("POST", "/v1/accounts/app/resume")
    assert status == 200 and account["suspended"] is False
    assert (await client.execute_command(b"RCPT", b"TO:<two@dest.test>")).code == 250
    await client.quit()
    # Both changes are in the audit trail with the account before and after.
    status, events = await api.call("GET", "/v1/audit?account=app")
    actions = [(e["action"], e["actor"], e["changes"].get("suspended")) for e in events[:2]]
    assert actions[0] == ("account.resume", "ops", [True, False])
    assert actions[1][0] == "account.suspend" and actions[1][1].startswith("cli:") and actions[1][2] == [False, True]


async def test_change_domains_networks_contacts_and_password_take_effect_at_once(api: Api) -> None:
    assert (await api.call("POST", "/v1/accounts", NEW_ACCOUNT))[0] == 201
    client = await session(api)
    assert (await client.execute_command(b"MAIL", b"FROM:<app@example.org>")).code == 550
    changed = mailmeter(
        api,
        "account",
        "change",
        "app",
        "--add-domain",
        "Example.ORG",
        "--remove-domain",
        "example.com",
        "--add-network",
        "192.0.2.0/24",
        "--add-contact",
        "ops@example.org",
    )
    assert changed.returncode == 0, changed.stderr
    await client.rset()
    assert (await client.execute_command(b"MAIL", b"FROM:<app@example.org>")).code == 250
    await client.rset()
    assert (await client.execute_command(b"MAIL", b"FROM:<app@example.com>")).code == 550
    await client.quit()

    # A leaked password: the new one works at once, the old one no longer does.
    changed = mailmeter(api, "account", "change", "app", "--password-file", "-", stdin=NEW_PASSWORD + "\n")
    assert changed.returncode == 0, changed.stderr
    with pytest.raises(aiosmtplib.SMTPAuthenticationError):
        await session(api)
    (await session(api, password=NEW_PASSWORD)).close()

    status, account = await api.call("GET", "/v1/accounts/app")
    assert account["sender_domains"] == ["example.org"] and account["networks"] == ["192.0.2.0/24"]
    assert account["contacts"] == ["ops@example.org"]
    status, events = await api.call("GET", "/v1/audit?account=app&limit=2")
    assert events[0]["action"] == "account.change" and events[0]["detail"] == {"password": "changed"}
    assert NEW_PASSWORD not in json.dumps(events)
    assert events[1]["changes"]["sender_domains"] == [["example.com"], ["example.org"]]

    # Over the API, and the errors that name the fix.
    status, account = await api.call("PATCH", "/v1/accounts/app", {"remove_networks": ["192.0.2.0/24"]})
    assert status == 200 and account["networks"] == []
    for body, message in (
        ({"remove_domains": ["example.org"]}, "at least one sender domain"),
        ({"remove_domains": ["typo.test"]}, "'typo.test' is not one of the account's (example.org)"),
        ({"remove_networks": ["198.51.100.0/24"]}, "not bound to the account"),
        ({"add_networks": ["10.0.0.0/8"]}, "wider than a /16"),
        ({"clear_password": True}, "neither a password nor a bound network"),
        ({}, "nothing to change"),
        ({"add_domains": "example.net"}, "add_domains: give a list of strings"),
    ):
        status, error = await api.call("PATCH", "/v1/accounts/app", body)
        assert status == 400 and message in error["error"], (body, error)
    assert (await api.call("PATCH", "/v1/accounts/ghost", {"add_domains": ["x.test"]}))[0] == 404
    missing = mailmeter(api, "account", "change", "app", "--remove-domain", "typo.test")
    assert missing.returncode == 2 and "typo.test" in missing.stderr


async def test_delete_is_refused_with_mail_in_the_queue_then_forced_and_the_records_stay(
    api: Api, upstream: Upstream
) -> None:
    assert (await api.call("POST", "/v1/accounts", NEW_ACCOUNT))[0] == 201
    upstream.handler.rcpt_replies["later@dest.test"] = "451 4.3.0 try again later"
    client = await session(api)
    await client.sendmail("app@example.com", ["later@dest.test"], b"Subject: queued\r\n\r\nbody\r\n")
    await client.quit()
    assert api.harness.relay is not None
    meter = api.harness.relay.meter
    await _wait(lambda: _deferred(meter))

    refused = mailmeter(api, "account", "delete", "app")
    assert refused.returncode == 1
    assert "1 recipient(s) of its mail still await a delivery result" in refused.stderr
    assert "mailmeter queue list --account app" in refused.stderr and "--force" in refused.stderr
    status, error = await api.call("DELETE", "/v1/accounts/app")
    assert status == 409 and "not invoiced yet" in error["error"]

    status, deleted = await api.call("DELETE", "/v1/accounts/app?force=true")
    assert status == 200 and deleted["deleted_at"] is not None and deleted["suspended"] is True
    # It sends nothing any more: no login.
    with pytest.raises(aiosmtplib.SMTPAuthenticationError):
        await session(api)
    # Its records stay readable; its name is not reused; it is listed only on request.
    assert (await api.call("GET", "/v1/accounts/app/invoices"))[0] == 200
    status, account = await api.call("GET", "/v1/accounts/app")
    assert status == 200 and account["standing"] == "deleted"
    status, events = await api.call("GET", "/v1/audit?account=app&limit=1")
    assert events[0]["action"] == "account.delete" and events[0]["detail"]["force"] is True
    status, error = await api.call("POST", "/v1/accounts", NEW_ACCOUNT)
    assert status == 409 and "never reused" in error["error"]
    assert (await api.call("GET", "/v1/accounts"))[1] == []
    assert [a["name"] for a in (await api.call("GET", "/v1/accounts?deleted=true"))[1]] == ["app"]
    for method, path, body in (
        ("POST", "/v1/accounts/app/resume", None),
        ("PATCH", "/v1/accounts/app", {"add_domains": ["example.net"]}),
        ("POST", "/v1/accounts/app/balance", {"amount": "5.00"}),
        ("PUT", "/v1/accounts/app/limits/quota", {"emails": 5}),
        ("PUT", "/v1/accounts/app/plan", {"plan": "tiny"}),
    ):
        status, error = await api.call(method, path, body)
        assert status == 409 and "was deleted on" in error["error"], (path, error)
    again = mailmeter(api, "account", "delete", "app", "--force")
    assert again.returncode == 1 and "already deleted" in again.stderr
    listed = mailmeter(api, "account", "list", "--deleted")
    assert listed.stdout.split("\t")[-1].strip() == "deleted"


async def test_delete_without_usage_needs_no_force(api: Api) -> None:
    assert (await api.call("POST", "/v1/accounts", NEW_ACCOUNT))[0] == 201
    deleted = mailmeter(api, "account", "delete", "app")
    assert deleted.returncode == 0, deleted.stderr
    assert "deleted" in deleted.stdout and "not reused" in deleted.stdout


async def test_account_show_is_one_screen(api: Api) -> None:
    assert (await api.call("POST", "/v1/accounts", {**NEW_ACCOUNT, "contacts": ["ops@example.com"]}))[0] == 201
    client = await session(api)
    await client.sendmail("app@example.com", ["a@dest.test", "b@dest.test"], b"Subject: hi\r\n\r\nbody\r\n")
    await client.quit()
    assert api.harness.relay is not None
    await settled_usage(api.harness.relay.meter)
    meter = api.harness.relay.meter
    await _wait(lambda: _finished(meter, 2))
    shown = mailmeter(api, "account", "show", "app")
    assert shown.returncode == 0, shown.stderr
    lines = dict(line.split(None, 1) for line in shown.stdout.splitlines())
    assert lines["account"] == "app (active)"
    assert lines["plan"].startswith("small (")
    assert lines["usage"].startswith("2 accepted: 2 delivered, 0 soft bounced, 0 invalid; 0 awaiting a result")
    assert lines["allowance"] == "1,000 emails this period, 998 remaining"
    assert lines["payment"] == "ok"
    assert (lines["domains"], lines["networks"], lines["contacts"]) == ("example.com", "-", "ops@example.com")
    assert lines["auth"] == "password set"
    data = json.loads(mailmeter(api, "account", "show", "app", "--json").stdout)
    assert data["usage"]["accepted"] == 2 and data["standing"] == "active" and "password_hash" not in data


async def _deferred(meter: Meter) -> bool:
    return bool((await meter.usage("app")).deferred)


async def _finished(meter: Meter, delivered: int) -> bool:
    return (await meter.usage("app")).usage.delivered == delivered


async def _wait(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.05)


async def test_change_suspend_and_delete_on_postgresql(start_api: Callable[..., Awaitable[Api]]) -> None:
    """The PostgreSQL store mirrors the SQLite one (metering/postgres/accounts.py's edit_account)."""
    from tests.pgserver import isolated_schema, schema_url

    async with isolated_schema() as schema:
        api = await start_api(database={"url": schema_url(schema), "pool_size": 4})
        assert (await api.call("POST", "/v1/accounts", NEW_ACCOUNT))[0] == 201
        status, account = await api.call(
            "PATCH",
            "/v1/accounts/app",
            {"add_domains": ["example.org"], "add_networks": ["192.0.2.7/24"], "add_contacts": ["ops@example.org"]},
        )
        assert status == 200, account
        assert account["sender_domains"] == ["example.com", "example.org"]
        assert (account["networks"], account["contacts"]) == (["192.0.2.0/24"], ["ops@example.org"])
        assert (await api.call("POST", "/v1/accounts/app/suspend"))[1]["suspended"] is True
        status, deleted = await api.call("DELETE", "/v1/accounts/app")
        assert status == 200 and deleted["deleted_at"] is not None
        assert api.harness.relay is not None
        assert await api.harness.relay.meter.store.all_networks() == []  # binds no client any more
        await api.harness.stop()
