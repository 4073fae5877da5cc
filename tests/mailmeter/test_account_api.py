"""The account's own API (/v1/account/, bearer = the account's token) and the operator's routes
for webhooks, tokens, events and suppression: real relay, real HTTP, real SQLite.

An account token reads only its own account: every /v1/account/ route answered with one
account's token shows that account's data, never the other's, and takes no account name.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from mailmeter.service import token_hash
from tests.mailmeter.test_api import OPS_TOKEN, Api, start_api  # noqa: F401 (the fixture)

ACCOUNT = {"plan": "e", "password": "correct horse battery staple", "sender_domains": ["example.com"]}


async def two_accounts(api: Api) -> tuple[str, str]:
    for name in ("alpha", "beta"):
        status, _ = await api.call("POST", "/v1/accounts", {"name": name, **ACCOUNT})
        assert status == 201
    tokens = []
    for name in ("alpha", "beta"):
        status, body = await api.call("POST", f"/v1/accounts/{name}/token", {})
        assert status == 201 and body["account"] == name and body["token"].startswith("mmat_")
        tokens.append(body["token"])
    return tokens[0], tokens[1]


async def suppress(api: Api, name: str, address: str) -> None:
    """Put an address on the account's list as a hard bounce does (the store's own statement)."""
    assert api.harness.relay is not None
    store = api.harness.relay.meter.store
    account = await api.harness.relay.meter.account(name)
    await store._run(  # type: ignore[attr-defined]
        lambda conn: conn.execute(
            "INSERT INTO suppressions (account_id, address, reason, detail, queue_id, created_at)"
            " VALUES (?, ?, 'not_exist', '550 5.1.1 unknown', 'Q1', '2026-12-01T00:00:00+00:00')",
            (account.id, address),
        )
    )


async def test_an_account_token_reads_only_its_own_account(start_api: Callable[..., Awaitable[Api]]) -> None:
    api = await start_api()
    alpha, beta = await two_accounts(api)
    await suppress(api, "alpha", "gone@dest.test")
    await suppress(api, "beta", "other@dest.test")
    await api.call("PUT", "/v1/accounts/alpha/webhook", {"url": "http://127.0.0.1:9/x", "events": ["payment"]})
    await api.call("PUT", "/v1/accounts/beta/webhook", {"url": "http://127.0.0.1:9/y", "events": ["payment"]})
    await api.call("POST", "/v1/accounts/alpha/payment", {"state": "failed", "reason": "alpha's card"})
    await api.call("POST", "/v1/accounts/beta/payment", {"state": "failed", "reason": "beta's card"})

    for token, me, other in ((alpha, "alpha", "beta"), (beta, "beta", "alpha")):
        status, usage = await api.call("GET", "/v1/account/usage", token=token)
        _, admin_usage = await api.call("GET", f"/v1/accounts/{me}/usage")
        assert status == 200 and usage["account"] == me and usage == admin_usage
        status, events = await api.call("GET", "/v1/account/events", token=token)
        assert status == 200 and [e["account"] for e in events] == [me]
        assert events[0]["data"]["detail"] == f"{me}'s card" and events[0]["type"] == "payment"
        status, listed = await api.call("GET", "/v1/account/suppressions", token=token)
        mine = "gone@dest.test" if me == "alpha" else "other@dest.test"
        theirs = "other@dest.test" if me == "alpha" else "gone@dest.test"
        assert status == 200 and [e["address"] for e in listed] == [mine]
        # The other account's address cannot be removed through this token: not on *its* list.
        status, body = await api.call("DELETE", f"/v1/account/suppressions/{theirs}", token=token)
        assert status == 404
        status, invoices = await api.call("GET", "/v1/account/invoices", token=token)
        assert status == 200 and invoices == []
        # No operator route opens with an account token.
        for method, path in (("GET", f"/v1/accounts/{other}"), ("GET", "/v1/accounts"), ("GET", "/v1/audit")):
            status, body = await api.call(method, path, token=token)
            assert status == 401, (method, path)
    # Both lists are intact after the attempts; each account removes its own.
    assert [e["address"] for e in (await api.call("GET", "/v1/accounts/beta/suppressions"))[1]] == ["other@dest.test"]
    status, body = await api.call("DELETE", "/v1/account/suppressions/GONE@dest.test", token=alpha)
    assert (status, body) == (200, {"account": "alpha", "address": "gone@dest.test", "suppressed": False})
    assert (await api.call("GET", "/v1/account/suppressions", token=alpha))[1] == []
    _, audit = await api.call("GET", "/v1/audit?account=alpha")
    assert audit[0]["action"] == "suppression.remove" and audit[0]["actor"] == "account:alpha"


async def test_account_tokens_are_kept_hashed_and_replaced(
    start_api: Callable[..., Awaitable[Api]], tmp_path: Path
) -> None:
    api = await start_api()
    alpha, _ = await two_accounts(api)
    with sqlite3.connect(tmp_path / "meter.db") as db:
        kept = [tuple(row) for row in db.execute("SELECT * FROM account_tokens")]
    assert len(kept) == 2 and token_hash(alpha) in {row[1] for row in kept}
    assert all(alpha not in str(row) for row in kept)
    for token in (None, "mmat_not-a-token", OPS_TOKEN):
        status, body = await api.call("GET", "/v1/account/usage", token=token)
        assert status == 401 and "account" in body["error"]
    status, renewed = await api.call("POST", "/v1/accounts/alpha/token", {})
    assert status == 201
    assert (await api.call("GET", "/v1/account/usage", token=alpha))[0] == 401  # the old one stops working
    assert (await api.call("GET", "/v1/account/usage", token=renewed["token"]))[0] == 200
    _, audit = await api.call("GET", "/v1/audit?account=alpha")
    assert audit[0]["action"] == "account.token" and alpha not in json.dumps(audit)


async def test_webhook_routes_check_their_input(start_api: Callable[..., Awaitable[Api]]) -> None:
    api = await start_api()
    await api.call("POST", "/v1/accounts", {"name": "alpha", **ACCOUNT})
    for body, field in (
        ({"url": "ftp://host/x"}, "url"),
        ({"url": "http://"}, "url"),
        ({"url": "http://h/x", "events": ["opened"]}, "events"),
        ({"url": "http://h/x", "secret": "short"}, "secret"),
    ):
        status, answer = await api.call("PUT", "/v1/accounts/alpha/webhook", body)
        assert status == 400 and answer["error"].startswith(field), body
    assert (await api.call("PUT", "/v1/accounts/nobody/webhook", {"url": "http://h/x"}))[0] == 404
    assert (await api.call("GET", "/v1/accounts/alpha/webhook"))[0] == 404
    status, hook = await api.call(
        "PUT", "/v1/accounts/alpha/webhook", {"url": "https://h.test/x", "secret": "s" * 20, "events": ["bounced"]}
    )
    assert status == 200 and hook["secret"] == "s" * 20 and hook["events"] == ["bounced"]
    status, shown = await api.call("GET", "/v1/accounts/alpha/webhook")
    assert status == 200 and shown["url"] == "https://h.test/x" and "secret" not in shown
    assert (await api.call("DELETE", "/v1/accounts/alpha/webhook"))[0] == 200
    assert (await api.call("DELETE", "/v1/accounts/alpha/webhook"))[0] == 404
    assert (await api.call("GET", "/v1/accounts/alpha/events?limit=0"))[0] == 400
    status, body = await api.call("DELETE", "/v1/accounts/alpha/suppressions/not-an-address")
    assert status == 400


def test_the_cli_sets_a_webhook_prints_a_token_and_lists_suppressions(tmp_path: Path) -> None:
    from tests.conftest import write_config

    config = write_config(tmp_path, 25)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "mailmeter.cli", "--config", str(config), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    password = tmp_path / "pw"
    password.write_text("correct horse battery staple\n")
    assert (
        run(
            "account",
            "add",
            "app",
            "--password-file",
            str(password),
            "--plan",
            "small",
            "--sender-domain",
            "example.com",
        ).returncode
        == 0
    )
    done = run("account", "webhook", "app", "--url", "https://hooks.test/in", "--events", "bounced,payment")
    assert done.returncode == 0 and "bounced,payment go to https://hooks.test/in" in done.stdout
    assert "signing secret (shown once" in done.stdout and "whsec_" in done.stdout
    wrong = run("account", "webhook", "app", "--url", "https://hooks.test/in", "--events", "opened")
    assert wrong.returncode == 2 and "events: opened" in wrong.stderr
    both = run("account", "webhook", "app", "--url", "https://hooks.test/in", "--remove")
    assert both.returncode == 2 and "--url URL" in both.stderr
    token = run("account", "token", "app")
    assert token.returncode == 0 and token.stdout.startswith("mmat_") and "shown once" in token.stderr
    listed = run("suppression", "list", "app", "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout) == []
    missing = run("suppression", "remove", "app", "nobody@dest.test")
    assert missing.returncode == 1 and "not on the suppression list" in missing.stderr
    events = run("account", "events", "app", "--json")
    assert events.returncode == 0 and json.loads(events.stdout) == []
    assert run("account", "webhook", "app", "--remove").returncode == 0
    audit = run("audit", "--account", "app", "--json")
    actions = [e["action"] for e in json.loads(audit.stdout)]
    assert actions[:3] == ["webhook.remove", "account.token", "webhook.set"]
