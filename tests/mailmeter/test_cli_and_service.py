"""The `mailmeter` command as a user runs it: a real process, real files, real sockets."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import yaml

from tests.conftest import PASSWORD, Upstream, write_config

REPO = Path(__file__).resolve().parents[2]
SECRET_BODY = "the-body-must-never-be-logged"


def mailmeter(config: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailmeter.cli", "--config", str(config), *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=60,
        cwd=REPO,
    )


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(tmp_path, 2526)


def add(config: Path, name: str = "app", *extra: str) -> subprocess.CompletedProcess[str]:
    password_file = config.parent / f"{name}.password"
    password_file.write_text(PASSWORD + "\n")
    return mailmeter(
        config,
        "account",
        "add",
        name,
        "--password-file",
        str(password_file),
        "--plan",
        "small",
        "--sender-domain",
        "example.com",
        *extra,
    )


def test_account_add_list_show(config: Path) -> None:
    result = add(config, "app", "--sender-domain", "Example.ORG")
    assert result.returncode == 0, result.stderr
    assert add(config, "other").returncode == 0
    listing = mailmeter(config, "account", "list")
    assert listing.returncode == 0
    assert [line.split("\t")[0] for line in listing.stdout.splitlines()] == ["app", "other"]
    shown = mailmeter(config, "account", "show", "app", "--json")
    data = json.loads(shown.stdout)
    assert data["name"] == "app" and data["plan"] == "small"
    assert data["sender_domains"] == ["example.com", "example.org"]
    assert data["payment_state"] == "ok" and data["has_password"] is True
    assert PASSWORD not in shown.stdout and "scrypt" not in shown.stdout
    # The stored password is a salted slow hash, never the password.
    database = (config.parent / "meter.db").read_bytes()
    assert PASSWORD.encode() not in database and b"scrypt$16384$" in database


def test_account_errors_name_the_fix(config: Path) -> None:
    assert add(config).returncode == 0
    again = add(config)
    assert again.returncode == 1 and "account 'app' already exists" in again.stderr
    password_file = config.parent / "app.password"
    unknown_plan = mailmeter(
        config,
        "account",
        "add",
        "x",
        "--password-file",
        str(password_file),
        "--plan",
        "gold",
        "--sender-domain",
        "x.test",
    )
    assert unknown_plan.returncode == 2 and "plan 'gold' is not defined" in unknown_plan.stderr
    no_domain = mailmeter(config, "account", "add", "y", "--password-file", str(password_file), "--plan", "small")
    assert no_domain.returncode == 2 and "--sender-domain" in no_domain.stderr
    missing = mailmeter(config, "account", "show", "ghost")
    assert missing.returncode == 1 and "no account named 'ghost'" in missing.stderr


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"listen": {"address": "127.0.0.1", "prot": 25}}, "listen.prot: unknown key"),
        ({"listen": {"address": "127.0.0.1", "port": "smtp"}}, "listen.port:"),
        ({"listen": {"address": "not-an-ip", "port": 25}}, "listen.address:"),
        ({"upstream": None}, "upstream:"),
        ({"upstream": {"host": "127.0.0.1", "tls": "maybe"}}, "upstream.tls:"),
        ({"plans": {"bad": {"email_quota": -5}}}, "plans.bad.email_quota: must be at least 0"),
        ({"plans": {"bad": {"period": {"timezone": "Mars/Base"}}}}, "plans.bad.period.timezone"),
        ({"tls": {"certificate": "missing.pem", "key": "missing.key"}}, "tls.certificate: file"),
        ({"listen": {"address": "0.0.0.0", "port": 25}}, "auth.allow_plaintext_on_loopback"),
    ],
)
def test_bad_config_fails_at_start_naming_the_key(config: Path, change: dict[str, Any], message: str) -> None:
    data = yaml.safe_load(config.read_text())
    data.update(change)
    if data.get("upstream") is None:
        del data["upstream"]
    config.write_text(yaml.safe_dump(data))
    result = mailmeter(config, "serve")
    assert result.returncode == 2
    assert message in result.stderr, result.stderr


def test_example_config_is_valid() -> None:
    from mailmeter.config import load_config

    config = load_config(REPO / "config.example.yaml")
    assert [(listen.address, listen.port, listen.mode) for listen in config.listen] == [("127.0.0.1", 2525, "smtp")]
    assert [(u.host, u.port) for u in config.upstream] == [("127.0.0.1", 2526)]
    assert config.parsed_plans()


async def _read_event(stream: asyncio.StreamReader, event: str, lines: list[dict[str, Any]]) -> dict[str, Any]:
    while True:
        raw = await asyncio.wait_for(stream.readline(), 20)
        if not raw:
            raise AssertionError(f"process exited before logging {event}")
        record = json.loads(raw)
        lines.append(record)
        if record.get("event") == event:
            return record


async def serve(config: Path, lines: list[dict[str, Any]]) -> tuple[asyncio.subprocess.Process, int]:
    """`mailmeter serve` as a process, and its port once it logged relay.started (on uvloop)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mailmeter.cli",
        "serve",
        "--config",
        str(config),
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO,
    )
    assert process.stderr is not None
    try:
        started = await _read_event(process.stderr, "relay.started", lines)
    except BaseException:
        process.kill()
        await process.wait()
        raise
    assert started["event_loop"] == "uvloop"
    return process, int(started["listen"].rsplit(":", 1)[1])


async def test_serve_process_relays_and_logs_json(tmp_path: Path, upstream: Upstream) -> None:
    config = write_config(tmp_path, upstream.port, log={"level": "info"})
    assert add(config).returncode == 0
    lines: list[dict[str, Any]] = []
    process, port = await serve(config, lines)
    try:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=10)
        await client.connect()
        with pytest.raises(aiosmtplib.SMTPAuthenticationError):
            await client.login("app", "not-the-password")
        await client.login("app", PASSWORD)
        message = f"Subject: t\r\n\r\n{SECRET_BODY}\r\n".encode()
        errors, reply = await client.sendmail("app@example.com", ["a@dest.test", "b@dest.test"], message)
        await client.quit()
        queue_id = reply.rsplit(" ", 1)[1]
        transaction = await _read_event(process.stderr, "smtp.transaction", lines)
        attempt = await _read_event(process.stderr, "delivery.attempt", lines)
    finally:
        process.send_signal(signal.SIGTERM)
        _, rest = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 0
    for raw in rest.decode().splitlines() if rest else []:
        lines.append(json.loads(raw))
    assert transaction["queue_id"] == queue_id and transaction["account"] == "app"
    assert transaction["recipients"] == 2 and transaction["result"] == "accepted"
    assert transaction["level"] == "info" and "timestamp" in transaction
    assert attempt["queue_id"] == queue_id and attempt["result"] == "delivered" and attempt["recipients"] == 2
    everything = json.dumps(lines)
    assert PASSWORD not in everything and "not-the-password" not in everything
    assert SECRET_BODY not in everything
    assert any(line["event"] == "smtp.auth" and line["result"] == "failed" for line in lines), lines
    assert any(line["event"] == "relay.stopped" for line in lines)
    assert sorted(upstream.handler.delivered_to()) == ["a@dest.test", "b@dest.test"]

    usage = mailmeter(config, "usage", "app", "--json")
    assert usage.returncode == 0, usage.stderr
    report = json.loads(usage.stdout)
    assert {
        k: report[k] for k in ("accepted", "delivered", "soft_bounced", "hard_bounced", "reserved", "remaining")
    } == {
        "accepted": 2,
        "delivered": 2,
        "soft_bounced": 0,
        "hard_bounced": 0,
        "reserved": 0,
        "remaining": 998,
    }


async def test_serve_process_starttls_then_auth(tmp_path: Path, upstream: Upstream) -> None:
    """STARTTLS on the served loop (uvloop): aiosmtpd swaps the transport's protocol, which
    once broke on uvloop (aiosmtpd#34, #295). AUTH is refused before TLS, works after."""
    import ssl

    import trustme

    authority = trustme.CA()
    certificate = authority.issue_cert("relay.test", "127.0.0.1")
    certificate.cert_chain_pems[0].write_to_path(str(tmp_path / "relay.pem"))
    certificate.private_key_pem.write_to_path(str(tmp_path / "relay.key"))
    config = write_config(
        tmp_path,
        upstream.port,
        log={"level": "info"},
        auth={"allow_plaintext_on_loopback": False},
        tls={"certificate": str(tmp_path / "relay.pem"), "key": str(tmp_path / "relay.key")},
    )
    assert add(config).returncode == 0
    lines: list[dict[str, Any]] = []
    process, port = await serve(config, lines)
    try:
        context = ssl.create_default_context()
        authority.configure_trust(context)
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=10, tls_context=context)
        await client.connect()
        await client.ehlo()
        assert not client.supports_extension("auth")  # no AUTH offered in the clear
        await client.starttls()
        await client.ehlo()
        assert client.supports_extension("auth")
        await client.login("app", PASSWORD)
        _, reply = await client.sendmail("app@example.com", ["a@dest.test"], b"Subject: t\r\n\r\nover TLS\r\n")
        await client.quit()
        assert "queued as" in reply, reply
        await upstream.handler.wait_for(lambda: len(upstream.handler.messages) == 1)
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 0
    assert upstream.handler.delivered_to() == ["a@dest.test"]


def test_the_smtp_replies_page_lists_every_refusal_text() -> None:
    from mailmeter.relay.replies import all_refusal_texts

    page = (REPO / "docs" / "smtp-replies.md").read_text()
    for reason, text in all_refusal_texts().items():
        assert f"`{reason}`" in page and text in page, reason


def test_readme_test_command_is_what_ci_runs() -> None:
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    command = next(
        line.strip() for line in readme.splitlines() if "pytest" in line and line.strip().startswith("python3")
    )
    assert command in ci
    assert os.access(REPO / ".ci" / "run", os.R_OK)


def test_db_upgrade_and_online_backup(config: Path, tmp_path: Path) -> None:
    import sqlite3

    assert add(config).returncode == 0
    upgraded = mailmeter(config, "db", "upgrade")
    assert upgraded.returncode == 0 and "schema version" in upgraded.stdout
    target = tmp_path / "backup.db"
    assert mailmeter(config, "db", "backup", str(target)).returncode == 0
    with sqlite3.connect(target) as copy:
        assert copy.execute("SELECT name FROM accounts").fetchall() == [("app",)]
    again = mailmeter(config, "db", "backup", str(target))
    assert again.returncode == 2 and "exists" in again.stderr
    # It holds every password hash: only its owner may read it, even under a umask of 000.
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    permissive = tmp_path / "permissive.db"
    result = subprocess.run(
        [sys.executable, "-m", "mailmeter.cli", "--config", str(config), "db", "backup", str(permissive)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        preexec_fn=lambda: os.umask(0),
    )
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(permissive.stat().st_mode) == 0o600
    with sqlite3.connect(permissive) as copy:
        assert copy.execute("SELECT name FROM accounts").fetchall() == [("app",)]


def test_version_prints_the_installed_version(config: Path) -> None:
    import tomllib

    expected = f"mailmeter {tomllib.loads((REPO / 'pyproject.toml').read_text())['project']['version']}"
    for args in (["--version"], ["--config", str(config), "--version"]):
        result = subprocess.run(
            [sys.executable, "-m", "mailmeter.cli", *args], capture_output=True, text=True, timeout=60, cwd=REPO
        )
        assert (result.returncode, result.stdout.strip()) == (0, expected), result


def test_bad_input_is_one_line_and_exit_2(config: Path) -> None:
    """The CLI refuses what the API refuses with a 400: one line naming the argument, exit 2,
    nothing changed (a wide network without its flag, money or counts past what the meter
    keeps, control characters, text that is not UTF-8, a look-alike in a domain)."""
    assert add(config).returncode == 0
    password_file = config.parent / "app.password"
    base = [
        "account",
        "add",
        "lan",
        "--password-file",
        str(password_file),
        "--plan",
        "small",
        "--sender-domain",
        "example.net",
    ]
    cases: list[tuple[list[str | bytes], str]] = [
        ([*base, "--network", "0.0.0.0/0"], "networks: 0.0.0.0/0 is wider than a /16"),
        ([*base, "--network", "::/0"], "--allow-wide-network"),
        (["balance", "add", "app", "99999999999999999999999999.00"], "amount:"),
        (["limit", "spending", "app", "99999999999999999999999999"], "amount:"),
        (["limit", "quota", "app", "1000000000000000000000000"], "emails:"),
        (["payment", "failed", "app", "--reason", "card\x01declined"], "reason: contains the control character"),
        (["account", "show", b"app\xff"], "name: is not valid Unicode text"),
        (
            [
                "account",
                "add",
                "k",
                "--password-file",
                str(password_file),
                "--plan",
                "small",
                "--sender-domain",
                "\u212aelvin.test",
            ],
            "U+212A (KELVIN SIGN)",
        ),
        (
            [
                "account",
                "add",
                "bad\x7fname",
                "--password-file",
                str(password_file),
                "--plan",
                "small",
                "--sender-domain",
                "example.org",
            ],
            "name: contains the control character U+007F",
        ),
    ]
    for args, named in cases:
        result = subprocess.run(
            [sys.executable, "-m", "mailmeter.cli", "--config", str(config), *args],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
        )
        lines = result.stderr.splitlines()
        assert result.returncode == 2 and len(lines) == 1 and named in lines[0], (args, result.stderr)
    wide = mailmeter(config, *base, "--network", "0.0.0.0/0", "--allow-wide-network")
    assert wide.returncode == 0, wide.stderr
    shown = json.loads(mailmeter(config, "account", "show", "app", "--json").stdout)
    assert (shown["prepaid_balance"], shown["payment_state"]) == ("0.00", "ok")
    names = [a["name"] for a in json.loads(mailmeter(config, "account", "list", "--json").stdout)]
    assert names == ["app", "lan"]


def test_account_token_is_printed_once_and_kept_as_a_digest(config: Path) -> None:
    assert add(config).returncode == 0
    first = mailmeter(config, "account", "token", "app")
    assert first.returncode == 0, first.stderr
    token = first.stdout.strip()
    assert len(token) >= 40 and token.encode() not in (config.parent / "meter.db").read_bytes()
    second = json.loads(mailmeter(config, "account", "token", "app", "--json").stdout)
    assert second["account"] == "app" and second["token"] != token
    missing = mailmeter(config, "account", "token", "nobody")
    assert missing.returncode == 1 and "no account named 'nobody'" in missing.stderr
    audit = json.loads(mailmeter(config, "audit", "--account", "app", "--json").stdout)
    assert [event["action"] for event in audit][:2] == ["account.token", "account.token"]
