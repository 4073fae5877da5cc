"""The queue of a running relay through `mailmeter queue` and the admin API (issue 17 item 2):
list, show, flush, hold, release and delete, with the books balanced after a delete.

Run with the inline spool on (the default: small messages kept in the store, only their
state in spool/active); the important ones run with spool.inline: false too (the files)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from tests.conftest import PASSWORD, Upstream, UpstreamHandler, free_port, write_config
from tests.mailmeter.test_accounts_change import mailmeter
from tests.mailmeter.test_api import NEW_ACCOUNT, Api, start_api  # noqa: F401 (fixtures)


async def cli(api: Api, *args: str) -> subprocess.CompletedProcess[str]:
    """`mailmeter` in a thread: the relay under test runs on this test's event loop and must answer it."""
    return await asyncio.to_thread(mailmeter, api, *args)


SLOW_RETRY = {"retry_first_delay": 300, "retry_max_delay": 4000}  # as in production: 300 s to the next attempt
# Both spools: the inline spool (the default on SQLite) and the file spool.
BOTH_SPOOLS = pytest.mark.parametrize("inline", [True, False], ids=["inline", "files"])


def spooled_as(api: Api, queue_id: str, inline: bool) -> None:
    """The message is kept where this run says: in the store (no spool/active/QID file) or a file."""
    assert (api.harness.directory / "spool" / "active" / queue_id).exists() is not inline


async def send(api: Api, recipients: list[str], subject: str = "queued") -> None:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=api.harness.port, start_tls=False, timeout=10)
    await client.connect()
    await client.login("app", PASSWORD)
    await client.sendmail("app@example.com", recipients, f"Subject: {subject}\r\n\r\nbody\r\n".encode())
    await client.quit()


async def until(check: Callable[[], Awaitable[Any]], timeout: float = 10.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await check()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.05)


async def deferred_entry(api: Api) -> dict[str, Any]:
    """The one message in the queue once its first attempt was deferred."""

    async def check() -> dict[str, Any] | None:
        status, entries = await api.call("GET", "/v1/queue")
        assert status == 200, entries
        return entries[0] if entries and entries[0]["status"] == "deferred" else None

    entry: dict[str, Any] = await until(check)
    return entry


@BOTH_SPOOLS
async def test_flush_delivers_a_deferred_message_now_not_in_300_seconds(
    start_api: Callable[..., Awaitable[Api]], upstream: Upstream, inline: bool
) -> None:
    api = await start_api(delivery=SLOW_RETRY, spool={"inline": inline})
    assert (await api.call("POST", "/v1/accounts", NEW_ACCOUNT))[0] == 201
    upstream.handler.rcpt_replies["later@dest.test"] = "451 4.3.0 mailbox busy, try again later"
    sent = time.time()
    await send(api, ["later@dest.test"])
    entry = await deferred_entry(api)
    spooled_as(api, entry["queue_id"], inline)
    assert entry["status"] == "deferred" and entry["account"] == "app" and entry["sender"] == "app@example.com"
    assert entry["pending"] == ["later@dest.test"] and entry["last_reply"].startswith("451 4.3.0 mailbox busy")
    assert entry["next_attempt_at"] - entry["last_attempt_at"] >= 299  # the production backoff
    assert sent - 1 <= entry["received_at"] <= entry["last_attempt_at"]

    listed = await cli(api, "queue", "list")
    assert listed.returncode == 0, listed.stderr
    received = datetime.fromtimestamp(entry["received_at"], timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    assert listed.stdout.splitlines()[0].startswith(f"upstream 1 127.0.0.1:{upstream.port}  up  failures 0")
    assert listed.stdout.splitlines()[1] == (
        f"{entry['queue_id']}  deferred  account app  from <app@example.com>  size {entry['size']}  received {received}"
    )
    assert (
        "    pending: later@dest.test" in listed.stdout and "-- 1 message(s), 1 recipient(s) pending" in listed.stdout
    )
    as_json = json.loads((await cli(api, "queue", "list", "--account", "app", "--json")).stdout)
    assert [e["queue_id"] for e in as_json] == [entry["queue_id"]]

    del upstream.handler.rcpt_replies["later@dest.test"]  # the upstream is fine again
    flushed = await cli(api, "queue", "flush", entry["queue_id"])
    assert flushed.returncode == 0, flushed.stderr
    assert flushed.stdout.startswith("1 message(s) will be attempted now")
    await upstream.handler.wait_for(lambda: upstream.handler.delivered_to() == ["later@dest.test"], timeout=10)
    assert entry["size"] == len(upstream.handler.messages[0].content)  # the message as relayed, octet for octet
    assert (await until(lambda: _queue_empty(api))) is True
    usage = (await api.call("GET", "/v1/accounts/app/usage"))[1]
    assert (usage["accepted"], usage["delivered"], usage["deferred"]) == (1, 1, 0)
    status, events = await api.call("GET", "/v1/audit?account=app&limit=1")
    assert events[0]["action"] == "queue.flush" and events[0]["detail"]["flushed"] == [entry["queue_id"]]


async def test_queue_list_shows_an_upstream_that_refuses_connections_down(
    start_api: Callable[..., Awaitable[Api]], upstream: Upstream
) -> None:
    """Two smarthosts, the first refusing connections: the attempt moves to the second at once,
    and `queue list`, `queue upstreams` and GET /v1/upstreams show the first down (issue 17 item 4)."""
    refusing = free_port()  # nothing listens there: connection refused
    entry = {"host": "127.0.0.1", "tls": "none", "timeout": 2}
    api = await start_api(
        upstream=[{**entry, "port": refusing}, {**entry, "port": upstream.port}],
        delivery={**SLOW_RETRY, "upstream_down_seconds": 600},
    )
    assert (await api.call("POST", "/v1/accounts", NEW_ACCOUNT))[0] == 201
    upstream.handler.rcpt_replies["later@dest.test"] = "451 4.3.0 mailbox busy, try again later"
    await send(api, ["ok@dest.test", "later@dest.test"])
    await upstream.handler.wait_for(lambda: upstream.handler.delivered_to() == ["ok@dest.test"], timeout=10)
    queued = await deferred_entry(api)

    status, health = await api.call("GET", "/v1/upstreams")
    assert status == 200, health
    assert [(u["upstream"], u["position"], u["up"]) for u in health] == [
        (f"127.0.0.1:{refusing}", 1, False),
        (f"127.0.0.1:{upstream.port}", 2, True),
    ]
    down = health[0]
    assert down["failures"] == 1 and "refused" in down["last_error"].lower() and down["down_until"] > time.time() + 500
    assert health[1]["failures"] == 0 and health[1]["last_error"] == ""

    listed = await cli(api, "queue", "list")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    until_text = datetime.fromtimestamp(down["down_until"], timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    assert lines[0] == (
        f"upstream 1 127.0.0.1:{refusing}  down until {until_text}  failures 1  last error: {down['last_error']}"
    )
    assert lines[1] == f"upstream 2 127.0.0.1:{upstream.port}  up  failures 0"
    assert lines[2].startswith(f"{queued['queue_id']}  deferred  account app")
    as_json = json.loads((await cli(api, "queue", "upstreams", "--json")).stdout)
    assert as_json == health
    text = await cli(api, "queue", "upstreams")
    assert text.returncode == 0 and text.stdout.splitlines() == lines[:2]
    # The list's JSON keeps its shape (a list of messages) for the scripts that read it.
    assert [e["queue_id"] for e in json.loads((await cli(api, "queue", "list", "--json")).stdout)] == [
        queued["queue_id"]
    ]


async def _queue_empty(api: Api) -> bool:
    return (await api.call("GET", "/v1/queue"))[1] == []


async def test_hold_stops_attempts_until_release(start_api: Callable[..., Awaitable[Api]], upstream: Upstream) -> None:
    api = await start_api()  # retries every 0.2-0.5 s (tests/conftest.py)
    assert (await api.call("POST", "/v1/accounts", NEW_ACCOUNT))[0] == 201
    upstream.handler.rcpt_replies["later@dest.test"] = "451 4.3.0 try again later"
    await send(api, ["later@dest.test"])
    entry = await deferred_entry(api)
    queue_id = entry["queue_id"]

    status, held = await api.call("POST", f"/v1/queue/{queue_id}/hold")
    assert status == 200 and held["status"] == "held" and held["next_attempt_at"] is None
    attempts, connections = held["attempts"], upstream.connections
    await asyncio.sleep(2.0)  # four retry delays at least
    status, shown = await api.call("GET", f"/v1/queue/{queue_id}")
    assert (shown["status"], shown["attempts"]) == ("held", attempts)
    assert upstream.connections == connections
    flushed = await cli(api, "queue", "flush", "--all")
    assert "not flushed: held" in flushed.stdout  # a flush does not override a hold

    del upstream.handler.rcpt_replies["later@dest.test"]
    released = await cli(api, "queue", "release", queue_id)
    assert released.returncode == 0, released.stderr
    assert released.stdout.startswith(f"message {queue_id} released")
    await upstream.handler.wait_for(lambda: upstream.handler.delivered_to() == ["later@dest.test"], timeout=10)
    status, events = await api.call("GET", "/v1/audit?limit=3")
    assert [(e["action"], e["target"]) for e in events] == [
        ("queue.release", "app"),
        ("queue.flush", "queue"),  # the whole queue's
        ("queue.hold", "app"),
    ]
    assert events[2]["changes"]["status"] == ["deferred", "held"]


@BOTH_SPOOLS
async def test_delete_gives_a_final_result_and_the_books_balance(
    start_api: Callable[..., Awaitable[Api]], upstream: Upstream, inline: bool
) -> None:
    api = await start_api(delivery=SLOW_RETRY, spool={"inline": inline})
    assert (await api.call("POST", "/v1/accounts", NEW_ACCOUNT))[0] == 201
    upstream.handler.rcpt_replies["later@dest.test"] = "451 4.3.0 try again later"
    await send(api, ["now@dest.test", "later@dest.test"])
    entry = await deferred_entry(api)
    spooled_as(api, entry["queue_id"], inline)
    assert entry["pending"] == ["later@dest.test"]
    usage = (await api.call("GET", "/v1/accounts/app/usage"))[1]
    assert (usage["accepted"], usage["delivered"], usage["deferred"]) == (2, 1, 1)

    deleted = await cli(api, "queue", "delete", entry["queue_id"])
    assert deleted.returncode == 0, deleted.stderr
    assert "1 recipient(s) got the final result 'deleted by operator' (a soft bounce, recorded)" in deleted.stdout
    assert await _queue_empty(api)
    active = api.harness.directory / "spool" / "active"
    assert not [p.name for p in active.iterdir() if entry["queue_id"] in p.name]  # neither message nor state
    assert not await api.harness.relay.meter.spooled_ids()  # nor the store's copy (inline)
    usage = (await api.call("GET", "/v1/accounts/app/usage"))[1]
    finals = usage["delivered"] + usage["soft_bounced"] + usage["hard_bounced"]
    assert (usage["accepted"], usage["delivered"], usage["soft_bounced"], usage["deferred"]) == (2, 1, 1, 0)
    assert usage["accepted"] - finals == 0  # nothing awaits a result
    assert usage["bounce_types"]["soft_bounced"] == {"deleted_by_operator": 1}
    account = (await api.call("GET", "/v1/accounts/app"))[1]
    assert account["awaiting_results"] == 0
    # The operator deleted it: no DSN goes to the sender (the upstream got only the first message).
    await asyncio.sleep(0.5)
    assert len(upstream.handler.messages) == 1
    status, events = await api.call("GET", "/v1/audit?account=app&limit=1")
    assert events[0]["action"] == "queue.delete" and events[0]["detail"]["recipients"] == ["later@dest.test"]
    # Gone: an unknown queue id now, for the CLI (exit 1) and the API (404).
    again = await cli(api, "queue", "delete", entry["queue_id"])
    assert again.returncode == 1 and f"no message {entry['queue_id']!r} in the queue" in again.stderr
    assert (await api.call("DELETE", f"/v1/queue/{entry['queue_id']}"))[0] == 404
    assert (await api.call("GET", "/v1/queue/nope..%2F"))[0] == 404
    assert (await api.call("POST", "/v1/queue/flush", {"queue_id": "X", "all": True}))[0] == 400
    # And the account can be deleted now without --force as far as the queue goes.
    refused = await cli(api, "account", "delete", "app")
    assert "await a delivery result" not in refused.stderr
    # A restart finds nothing left to deliver or report: the result was counted once.
    await api.harness.stop()
    await api.harness.start()
    await asyncio.sleep(0.5)
    assert await _queue_empty(api) and len(upstream.handler.messages) == 1
    after = (await api.call("GET", "/v1/accounts/app/usage"))[1]
    assert (after["accepted"], after["delivered"], after["soft_bounced"]) == (2, 1, 1)


async def test_the_control_socket_is_the_owners_only_and_a_stopped_relay_is_named(
    start_api: Callable[..., Awaitable[Api]], tmp_path: Path
) -> None:
    api = await start_api()
    control = api.harness.directory / "spool" / "control"
    assert stat.S_ISSOCK(os.stat(control).st_mode) and stat.S_IMODE(os.stat(control).st_mode) == 0o600
    assert (await api.call("GET", "/v1/queue"))[1] == []
    await api.harness.stop()
    assert not control.exists()

    stopped = await cli(api, "queue", "list")
    assert stopped.returncode == 1
    assert stopped.stderr.count("\n") == 1 and "the relay is not running on spool" in stopped.stderr
    assert "start it (mailmeter serve" in stopped.stderr
    other = tmp_path / "never-started"
    other.mkdir()
    config = write_config(other, 2526)
    never = await cli(api, "--config", str(config), "queue", "flush", "--all")
    assert never.returncode == 1 and "the relay is not running" in never.stderr


@BOTH_SPOOLS
async def test_a_held_message_stays_held_across_a_restart(
    start_api: Callable[..., Awaitable[Api]], upstream: Upstream, inline: bool
) -> None:
    api = await start_api(spool={"inline": inline})
    assert (await api.call("POST", "/v1/accounts", NEW_ACCOUNT))[0] == 201
    upstream.handler.rcpt_replies["later@dest.test"] = "451 4.3.0 try again later"
    await send(api, ["later@dest.test"])
    queue_id = (await deferred_entry(api))["queue_id"]
    spooled_as(api, queue_id, inline)
    attempts = (await api.call("POST", f"/v1/queue/{queue_id}/hold"))[1]["attempts"]
    await api.harness.stop()
    await api.harness.start()
    await asyncio.sleep(1.5)  # several retry delays
    status, entry = await api.call("GET", f"/v1/queue/{queue_id}")
    assert status == 200 and (entry["status"], entry["attempts"]) == ("held", attempts)
    await api.call("POST", f"/v1/queue/{queue_id}/release")
    later = await until(lambda: _attempted_since(api, queue_id, attempts))
    assert later["attempts"] > attempts


async def _attempted_since(api: Api, queue_id: str, attempts: int) -> dict[str, Any] | None:
    status, entry = await api.call("GET", f"/v1/queue/{queue_id}")
    return entry if status == 200 and entry["attempts"] > attempts else None


async def test_a_spool_path_too_long_for_a_unix_socket_still_has_its_control_socket(
    start_api: Callable[..., Awaitable[Api]],
) -> None:
    api = await start_api(spool={"path": "a-spool-directory-with-a-long-name/" * 4 + "spool"})
    control = api.harness.directory / ("a-spool-directory-with-a-long-name/" * 4 + "spool") / "control"
    assert len(str(control)) > 108 and stat.S_ISSOCK(os.stat(control).st_mode)
    assert (await api.call("GET", "/v1/queue"))[1] == []
    listed = await cli(api, "queue", "list")
    assert listed.returncode == 0 and listed.stdout.splitlines()[1:] == ["-- 0 message(s), 0 recipient(s) pending"]


async def test_the_queue_of_every_process_of_a_node(tmp_path: Path, upstream: Upstream) -> None:
    """listen.processes: 2: each worker has its spool and control socket; `queue` asks both."""
    from tests.mailmeter.test_cli_and_service import add
    from tests.mailmeter.test_service_signals import launch

    port = free_port()
    config = write_config(
        tmp_path,
        upstream.port,
        listen={"address": "127.0.0.1", "port": port, "processes": 2},
        delivery=SLOW_RETRY,
    )
    assert add(config).returncode == 0
    upstream.handler.rcpt_replies["later@dest.test"] = "451 4.3.0 try again later"
    svc = await launch(config, tmp_path)
    try:
        await svc.notification("READY=1", timeout=30)
        assert (tmp_path / "spool" / "control").is_socket()
        assert (tmp_path / "spool" / "worker-1" / "control").is_socket()

        async def one(n: int) -> None:
            client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=10)
            await client.connect()
            await client.login("app", PASSWORD)
            await client.sendmail("app@example.com", ["later@dest.test"], f"Subject: {n}\r\n\r\nx\r\n".encode())
            await client.quit()

        await asyncio.gather(*(one(n) for n in range(12)))

        async def listed() -> list[dict[str, Any]] | None:
            run = await asyncio.to_thread(_cli, config, "queue", "list", "--json")
            entries: list[dict[str, Any]] = json.loads(run.stdout)
            return entries if len(entries) == 12 and all(e["status"] == "deferred" for e in entries) else None

        await until(listed, timeout=20)
        # Each deferred message has its state file in its process's spool (inline or not).
        spools = [tmp_path / "spool" / "active", tmp_path / "spool" / "worker-1" / "active"]
        held = [[p for p in spool.iterdir() if p.name.endswith(".state")] for spool in spools]
        assert all(held) and sum(map(len, held)) == 12  # both workers hold some (2 in 4096 runs: not)
        del upstream.handler.rcpt_replies["later@dest.test"]
        flushed = await asyncio.to_thread(_cli, config, "queue", "flush", "--all")
        assert flushed.stdout.startswith("12 message(s) will be attempted now"), flushed.stdout + flushed.stderr
        await upstream.handler.wait_for(lambda: len(upstream.handler.delivered_to()) == 12, timeout=20)
    finally:
        try:
            os.killpg(svc.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        await svc.process.wait()
        svc.notify.close()


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailmeter.cli", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


class StalledUpstream(UpstreamHandler):
    """An upstream that holds every message at its end of data until `go` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.go = asyncio.Event()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        await self.go.wait()
        return await super().handle_DATA(server, session, envelope)


async def test_a_message_being_delivered_cannot_be_held_or_deleted_meanwhile(
    start_api: Callable[..., Awaitable[Api]], upstream: Upstream
) -> None:
    stalled = StalledUpstream()
    upstream.handler = stalled
    api = await start_api()
    assert (await api.call("POST", "/v1/accounts", NEW_ACCOUNT))[0] == 201
    await send(api, ["slow@dest.test"])

    async def active() -> dict[str, Any] | None:
        entries = (await api.call("GET", "/v1/queue"))[1]
        return entries[0] if entries and entries[0]["status"] == "active" else None

    queue_id = (await until(active))["queue_id"]
    for method, path in (("DELETE", f"/v1/queue/{queue_id}"), ("POST", f"/v1/queue/{queue_id}/hold")):
        status, error = await api.call(method, path)
        assert status == 409 and "being delivered right now; try again in a moment" in error["error"]
    busy = await cli(api, "queue", "delete", queue_id)
    assert busy.returncode == 1 and "being delivered right now" in busy.stderr
    stalled.go.set()
    await stalled.wait_for(lambda: stalled.delivered_to() == ["slow@dest.test"])
    assert await until(lambda: _queue_empty(api))


@BOTH_SPOOLS
async def test_a_delete_cut_off_before_its_report_is_counted_once_after_a_restart(
    start_api: Callable[..., Awaitable[Api]], upstream: Upstream, inline: bool
) -> None:
    """The relay died right after `queue delete` wrote the results (active/QID.state), before the
    meter heard of them: the restart reports them, once, and forgets the message (its row or file)."""
    api = await start_api(delivery=SLOW_RETRY, spool={"inline": inline})
    assert (await api.call("POST", "/v1/accounts", NEW_ACCOUNT))[0] == 201
    upstream.handler.rcpt_replies["later@dest.test"] = "451 4.3.0 try again later"
    await send(api, ["now@dest.test", "later@dest.test"])
    queue_id = (await deferred_entry(api))["queue_id"]
    spooled_as(api, queue_id, inline)
    await api.harness.stop()
    # What delete writes first (relay/delivery.py Delivery.delete), and nothing after it.
    state_file = api.harness.directory / "spool" / "active" / f"{queue_id}.state"
    state = json.loads(state_file.read_text())
    for recipient in state["recipients"]:
        if recipient["status"] == "deferred":
            recipient.update(status="deleted", reply="deleted by operator", reported=False)
    state_file.write_text(json.dumps(state))

    await api.harness.start()
    assert await until(lambda: _queue_empty(api))
    active = api.harness.directory / "spool" / "active"
    await until(lambda: _nothing_left(active, queue_id))
    assert not await api.harness.relay.meter.spooled_ids()
    await api.harness.stop()
    await api.harness.start()  # and a second restart finds nothing to report again
    await asyncio.sleep(0.5)
    usage = (await api.call("GET", "/v1/accounts/app/usage"))[1]
    assert (usage["accepted"], usage["delivered"], usage["soft_bounced"], usage["deferred"]) == (2, 1, 1, 0)
    assert usage["bounce_types"]["soft_bounced"] == {"deleted_by_operator": 1}
    assert len(upstream.handler.messages) == 1  # neither sent again nor bounced to the sender


async def _nothing_left(active: Path, queue_id: str) -> bool:
    return not [p for p in active.iterdir() if queue_id in p.name]


@BOTH_SPOOLS
async def test_a_message_held_before_its_first_attempt_is_not_attempted(
    start_api: Callable[..., Awaitable[Api]], upstream: Upstream, inline: bool
) -> None:
    """One delivery worker, stuck on a first message: the second waits, ready (inline: in
    memory, as accepted). Held then, it is not attempted when the worker is free."""
    stalled = StalledUpstream()
    upstream.handler = stalled
    api = await start_api(delivery={"workers": 1}, spool={"inline": inline})
    assert (await api.call("POST", "/v1/accounts", NEW_ACCOUNT))[0] == 201
    await send(api, ["first@dest.test"], "first")
    await send(api, ["second@dest.test"], "second")

    async def waiting() -> list[dict[str, Any]] | None:
        entries: list[dict[str, Any]] = (await api.call("GET", "/v1/queue"))[1]
        return entries if [e["status"] for e in entries] == ["active", "ready"] else None

    second = (await until(waiting))[1]
    spooled_as(api, second["queue_id"], inline)
    status, held = await api.call("POST", f"/v1/queue/{second['queue_id']}/hold")
    assert status == 200 and (held["status"], held["attempts"]) == ("held", 0)
    stalled.go.set()
    await stalled.wait_for(lambda: stalled.delivered_to() == ["first@dest.test"])
    await asyncio.sleep(1.0)
    assert stalled.delivered_to() == ["first@dest.test"]
    status, entry = await api.call("GET", f"/v1/queue/{second['queue_id']}")
    assert status == 200 and (entry["status"], entry["attempts"], entry["size"]) == ("held", 0, second["size"])
    await api.call("POST", f"/v1/queue/{second['queue_id']}/release")
    await stalled.wait_for(lambda: stalled.delivered_to() == ["first@dest.test", "second@dest.test"])
    assert await until(lambda: _queue_empty(api))
