"""Reload tells the truth (issue 17 item 6): every key of config.example.yaml, nested keys and
each plan's keys included, either takes effect on reload or is named by the reload's log line
as needing a restart (and kept as it runs), as docs/operating.md's table says.

Real parts: a relay started from config.example.yaml (ports and upstream moved to the test's),
reloaded once per key; then `mailmeter serve` itself, reloaded with SIGHUP.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import signal
import urllib.request
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import trustme
import yaml
from structlog.testing import capture_logs

from mailmeter.config import ConfigError, load_config
from mailmeter.node import Relay
from mailmeter.reloading import NEEDS_RESTART, flatten, needs_restart
from mailmeter.serve import build_relay
from tests.conftest import Upstream, free_port, write_config
from tests.mailmeter.test_cli_and_service import add
from tests.mailmeter.test_service_signals import launch

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "config.example.yaml"
TOKEN = "ops:reload-token-0123456789"
# Keys a reload refuses to change (and a restart as well: the ledger holds its amounts).
REFUSED = {"billing.currency"}


def set_key(data: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for part in parents:
        data = data.setdefault(part, {})
    data[last] = value


def files(directory: Path) -> dict[str, str]:
    """Files the changed values point at (relative to the config's directory)."""
    ca = trustme.CA()
    cert = ca.issue_cert("relay.test")
    cert.private_key_and_cert_chain_pem.write_to_path(str(directory / "relay.pem"))
    cert.private_key_pem.write_to_path(str(directory / "relay.key"))
    for name, text in (("secret", "s3cret-0123456789"), ("tokens", TOKEN), ("password", "upstream-pw")):
        (directory / name).write_text(text + "\n")
    return {"cert": "relay.pem", "key": "relay.key", "secret": "secret", "tokens": "tokens", "password": "password"}


def changes_for(key: str, value: Any, paths: dict[str, str]) -> dict[str, Any]:
    """A valid change of `key` (with the keys it needs beside it): {key: new value, ...}."""
    special: dict[str, dict[str, Any]] = {
        "tls.certificate": {"tls.certificate": paths["cert"], "tls.key": paths["key"]},
        "tls.key": {"tls.certificate": paths["cert"], "tls.key": paths["key"]},
        "upstream.password_file": {"upstream.password_file": paths["password"]},
        "billing.gateway.kind": {
            "billing.gateway.kind": "webhook",
            "billing.gateway.url": "https://billing.test/charge",
            "billing.gateway.secret_file": paths["secret"],
        },
        "billing.gateway.secret_file": {"billing.gateway.secret_file": paths["secret"]},
        "billing.notices.webhook_url": {
            "billing.notices.webhook_url": "https://notices.test/hook",
            "billing.notices.webhook_secret_file": paths["secret"],
        },
        "billing.notices.webhook_secret_file": {"billing.notices.webhook_secret_file": paths["secret"]},
        "api.enabled": {"api.enabled": True, "api.tokens_file": paths["tokens"]},
        "api.tokens_file": {"api.tokens_file": paths["tokens"]},
        "api.payment_webhook_secret_file": {"api.payment_webhook_secret_file": paths["secret"]},
        "api.address": {"api.address": "127.0.0.2"},
        "listen.address": {"listen.address": "127.0.0.2"},
        "listen.mode": {"listen.mode": "smtps", "tls.certificate": paths["cert"], "tls.key": paths["key"]},
        "listen.auth": {"listen.auth": "none"},
        "portal.address": {"portal.address": "127.0.0.2"},
        "portal.tls": {"portal.tls": True, "tls.certificate": paths["cert"], "tls.key": paths["key"]},
        "upstream.host": {"upstream.host": "127.0.0.2"},
        "upstream.tls": {"upstream.tls": "starttls"},
        "limits.bare_newlines": {"limits.bare_newlines": "normalize"},
        "log.level": {"log.level": "warning"},
        "billing.currency": {"billing.currency": "EUR"},
        "billing.gateway.url": {"billing.gateway.url": "https://billing.test/other"},
        "billing.notices.from_address": {"billing.notices.from_address": "billing@other.test"},
        "upstream.username": {"upstream.username": "relay"},
        "hostname": {"hostname": "other.test"},
    }
    if key in special:
        return special[key]
    return {key: mutate(key, value)}


def change_plan(key: str, plan: dict[str, Any]) -> dict[str, Any]:
    """A plan with the discriminator `key` (billable, a part's kind) changed: a part of
    another kind replaces the part (and whatever no longer fits with it)."""
    plan = copy.deepcopy(plan)
    leaf = key.split(".", 2)[2]
    threshold = {"kind": "threshold", "amount": "100"}
    if leaf == "billable":
        if plan["billable"] == "results":
            plan.pop("result_prices")
            plan.update(billable="accepted", price={"kind": "flat", "amount": "0.20", "per": 1000})
        else:
            for part in ("price", "in_period_charge", "spending_limit", "included_emails", "plan_fee", "usage_alerts"):
                plan.pop(part, None)
            plan.update(billable="results", result_prices={"per": 1000, "delivered": "0.30"})
    elif leaf == "price.kind":
        if plan["price"]["kind"] == "flat":
            plan.pop("in_period_charge", None)
            plan["price"] = {
                "kind": "volume",
                "tiers": [{"up_to": 1000, "amount": "1.00", "per": 1000}, {"amount": "0.50", "per": 1000}],
            }
        else:
            plan["price"] = {"kind": "flat", "amount": "0.20", "per": 1000}
            if plan.get("in_period_charge", {}).get("kind") == "per_block":
                plan["in_period_charge"] = threshold
    elif leaf == "in_period_charge.kind":
        if plan["in_period_charge"]["kind"] == "per_block":
            plan["in_period_charge"] = threshold
        else:
            plan.pop("in_period_charge")
    elif leaf == "funding.kind":
        prepaid = plan["funding"]["kind"] == "prepaid"
        if not prepaid:
            plan.pop("in_period_charge", None)
        plan["funding"] = (
            {"kind": "postpaid", "net_days": 3} if prepaid else {"kind": "prepaid", "monthly_payment": "10.00"}
        )
    else:
        raise AssertionError(f"{key}: not a discriminator")
    return plan


DISCRIMINATORS = ("billable", "price.kind", "in_period_charge.kind", "funding.kind")


def mutate(key: str, value: Any) -> Any:
    if key.endswith(".per"):
        return value * 2  # amount / per stays a whole number of micros
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, list):
        return [50] if all(isinstance(v, int) for v in value) else value[:-1] + [dict(value[-1], amount="0.40")]
    if isinstance(value, str) and re.fullmatch(r"\d+(\.\d+)?", value):
        return str(Decimal(value) + 1)
    if key.endswith("timezone"):
        return "Europe/Paris" if value != "Europe/Paris" else "UTC"
    if key.endswith(("period.kind",)):
        return "anniversary" if value == "calendar_month" else "calendar_month"
    if key.endswith("issue_time"):
        return "16:00"
    if isinstance(value, str):
        return value + "-2"
    raise AssertionError(f"{key}: no change for {value!r}")


def live(relay: Relay) -> dict[str, Callable[[], Any]]:
    """Where a key's value is at work in the running relay (not just in relay.config)."""
    settings = lambda: relay.context.settings  # noqa: E731
    auth = lambda: relay.context.settings.auth_limits  # noqa: E731
    return {
        "hostname": lambda: (settings().hostname, relay.delivery.hostname),
        "tls.certificate": lambda: settings().tls_context is not None,
        "auth.allow_plaintext_on_loopback": lambda: settings().plaintext_auth,
        "limits.message_size": lambda: settings().message_size_limit,
        "limits.recipients_per_message": lambda: settings().recipients_per_message,
        "limits.session_timeout": lambda: settings().timeout,
        "limits.session_max_duration": lambda: settings().max_session_seconds,
        "limits.bare_newlines": lambda: settings().bare_newlines,
        "abuse.max_connections_per_client": lambda: relay.context.connections.limit,
        "abuse.auth_max_failures": lambda: relay.context.auth_guard.limits.max_failures,
        "abuse.auth_failure_window": lambda: auth().window,
        "abuse.auth_lockout": lambda: auth().lockout,
        "abuse.auth_failure_delay": lambda: auth().delay,
        "abuse.auth_failure_delay_max": lambda: auth().delay_max,
        "abuse.auth_checks_per_client": lambda: auth().checks_per_client,
        "abuse.auth_checks_in_flight": lambda: auth().checks_in_flight,
        "upstream.host": lambda: relay.delivery.upstream.host,
        "upstream.port": lambda: relay.delivery.upstream.port,
        "upstream.tls": lambda: relay.delivery.upstream.tls,
        "upstream.verify_certificate": lambda: relay.delivery.upstream.verify_certificate,
        "upstream.username": lambda: relay.delivery.upstream.username,
        "upstream.password_file": lambda: relay.delivery.upstream.password,
        "upstream.timeout": lambda: relay.delivery.upstream.timeout,
        "delivery.retry_first_delay": lambda: relay.delivery.retry.first_delay,
        "delivery.retry_factor": lambda: relay.delivery.retry.factor,
        "delivery.retry_max_delay": lambda: relay.delivery.retry.max_delay,
        "delivery.max_age": lambda: relay.delivery.retry.max_age,
        "billing.charge_retry_first_delay": lambda: relay.billing.retry_first_delay,
        "billing.charge_retry_max_delay": lambda: relay.billing.retry_max_delay,
        "billing.gateway.kind": lambda: type(relay.billing.gateway).__name__,
        "billing.notices.from_address": lambda: relay.notices.from_address,
        "billing.notices.webhook_url": lambda: relay.notices.webhook_url,
        "billing.notices.webhook_secret_file": lambda: relay.notices.webhook_secret,
        "api.enabled": lambda: relay.api is not None,
        "delivery.workers": lambda: len(relay.delivery._tasks),
    }


def example(directory: Path, upstream_port: int) -> dict[str, Any]:
    data = yaml.safe_load(EXAMPLE.read_text())
    data["listen"]["port"] = free_port()
    data["upstream"]["port"] = upstream_port
    data["api"]["port"] = free_port()
    return data


async def test_every_example_key_is_applied_by_reload_or_named_as_needing_a_restart(
    tmp_path: Path, upstream: Upstream
) -> None:
    paths = files(tmp_path)
    base = example(tmp_path, upstream.port)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(base))
    relay = build_relay(load_config(path))
    await relay.start()
    walked = applied = restart = 0
    try:
        original = relay.config
        for key, value in flatten(yaml.safe_load(EXAMPLE.read_text())).items():
            walked += 1
            data = copy.deepcopy(base)
            if key.startswith("plans.") and key.split(".", 2)[2] in DISCRIMINATORS:
                name = key.split(".")[1]
                data["plans"][name] = change_plan(key, data["plans"][name])
            else:
                for changed_key, new in changes_for(key, value, paths).items():
                    set_key(data, changed_key, new)
            path.write_text(yaml.safe_dump(data))
            new_config = load_config(path)
            before = {name: read() for name, read in live(relay).items()}
            if key in REFUSED:
                with pytest.raises(ConfigError, match=re.escape(key)):
                    await relay.reload(new_config)
                continue
            with capture_logs() as logs:
                await relay.reload(new_config)
            (line,) = [e for e in logs if e["event"] == "config.reloaded"]
            named = [k for k in line["needs_restart"] if key == k or key.startswith(k + ".")]
            took = [k for k in line["changed"] if key == k or key.startswith(k + ".")]
            running = flatten(relay.config.model_dump(mode="json"))
            if needs_restart(key):
                restart += 1
                assert named == [key] and not took, (key, line)
                assert running[key] == flatten(original.model_dump(mode="json"))[key], key  # kept until a restart
                if key in live(relay):
                    assert live(relay)[key]() == before[key], key
            else:
                applied += 1
                assert took and not line["needs_restart"], (key, line)
                if key.startswith("plans."):
                    name = key.split(".")[1]
                    assert relay.meter.plans[name] == new_config.parsed_plans()[name], key
                else:
                    assert running[key] == flatten(new_config.model_dump(mode="json"))[key], key
                    if key in live(relay):
                        assert live(relay)[key]() != before[key], key  # at work, not only recorded
            path.write_text(yaml.safe_dump(base))
            await relay.reload(load_config(path))  # back to the example for the next key
    finally:
        await relay.stop()
    assert walked > 150 and restart >= 10 and applied > 130, (walked, restart, applied)


def test_the_operating_guide_lists_every_key_that_needs_a_restart() -> None:
    page = (REPO / "docs" / "operating.md").read_text()
    section = page.split("### Reload", 1)[1].split("\n### ", 1)[0]
    for key in NEEDS_RESTART:
        assert f"`{key}`" in section, key
    for key in flatten(yaml.safe_load(EXAMPLE.read_text())):
        top = key.split(".")[0]
        assert f"`{top}" in section, key  # every section is in the table, one way or the other


async def test_sighup_applies_the_api_hostname_limits_and_log_level_and_names_restart_keys(
    tmp_path: Path, upstream: Upstream
) -> None:
    config = write_config(tmp_path, upstream.port, log={"level": "info"})
    assert add(config).returncode == 0
    svc = await launch(config, tmp_path)
    try:
        started = await svc.event("relay.started")
        port = int(started["listen"].rsplit(":", 1)[1])
        (tmp_path / "tokens").write_text(TOKEN + "\n")
        api_port = free_port()
        data = yaml.safe_load(config.read_text())
        data["api"] = {"enabled": True, "port": api_port, "tokens_file": "tokens"}
        data["hostname"] = "reloaded.test"
        data["limits"]["message_size"] = 2048
        data["listen"]["port"] = free_port()  # needs a restart
        data["delivery"]["workers"] = 7  # needs a restart
        data["database"]["busy_timeout_ms"] = 1234  # needs a restart
        data["abuse"]["auth_max_failures"] = 1
        data["log"]["level"] = "warning"
        config.write_text(yaml.safe_dump(data))
        svc.process.send_signal(signal.SIGHUP)
        api = await svc.event("api.started")
        assert api["listen"] == f"127.0.0.1:{api_port}"
        line = await svc.event("config.reloaded")
        assert line["needs_restart"] == ["database.busy_timeout_ms", "delivery.workers", "listen.port"]
        assert {"api.enabled", "api.port", "api.tokens_file", "hostname", "limits.message_size"} <= set(line["changed"])
        request = urllib.request.Request(
            f"http://127.0.0.1:{api_port}/v1/accounts", headers={"Authorization": "Bearer reload-token-0123456789"}
        )
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(request, timeout=10).read())
        assert [a["name"] for a in json.loads(body)] == ["app"]
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=10)  # the old port
        banner = await client.connect()
        assert "reloaded.test" in banner.message
        await client.ehlo()
        assert client.esmtp_extensions["size"] == "2048"
        with pytest.raises(aiosmtplib.SMTPAuthenticationError):
            await client.login("app", "wrong")  # one failure locks out: a warning, logged
        client.close()
        lockout = await svc.event("smtp.auth_lockout")
        assert lockout["level"] == "warning"
        between = svc.events[svc.events.index(line) + 1 : -1]
        assert all(e["level"] != "info" for e in between), between  # log.level: warning, at once

        data["api"]["enabled"] = False
        data["log"]["level"] = "info"
        config.write_text(yaml.safe_dump(data))
        svc.process.send_signal(signal.SIGHUP)
        with pytest.raises(OSError):
            for _ in range(50):  # the API stops with the reload
                await asyncio.to_thread(lambda: urllib.request.urlopen(request, timeout=2).read())
                await asyncio.sleep(0.1)
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=10)
        assert (await client.connect()).code == 220  # the old port still serves (listen needs a restart)
        await client.quit()
    finally:
        svc.process.kill()
        await svc.process.wait()
        svc.notify.close()
