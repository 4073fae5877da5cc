"""Two relay processes sharing one PostgreSQL meter: the last emails race, and a node killed under load.

Real parts only: two `python -m mailmeter.cli serve` processes (own node name,
region, spool and port; the same database URL, in a fresh schema, and the same
upstream, an aiosmtpd server in this test), real SMTP sessions over loopback,
SIGKILL. The spool stays on each node's disk; the meter is shared, so what one
node reserves the other cannot.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiosmtplib
import pytest

from mailmeter.metering.meter import Meter
from mailmeter.metering.postgres import PgStore
from mailmeter.policies import parse_plans
from tests.conftest import PASSWORD, Upstream, write_config
from tests.pgserver import PG_URL, isolated_schema, scalar, schema_url

REPO = Path(__file__).resolve().parent.parent
TAG = re.compile(rb"X-Test-Id: (\S+)")


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    async with isolated_schema() as name:
        yield name


@dataclass
class Node:
    """One relay process; `start` again after a kill brings the same node (name, spool) back."""

    config: Path
    leasing: bool = False
    process: asyncio.subprocess.Process | None = None
    port: int = 0
    started: dict[str, object] = field(default_factory=dict)  # the last relay.started log line
    drains: list[asyncio.Task[None]] = field(default_factory=list)

    async def start(self) -> None:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "mailmeter.cli",
            "serve",
            "--config",
            str(self.config),
            stderr=asyncio.subprocess.PIPE,
            cwd=REPO,
        )
        assert process.stderr is not None
        while True:
            raw = await asyncio.wait_for(process.stderr.readline(), 30)
            assert raw, "the relay exited during start-up"
            record = json.loads(raw)
            if record.get("event") == "relay.started":
                break
        self.process, self.port, self.started = process, int(record["listen"].rsplit(":", 1)[1]), record
        self.drains.append(asyncio.create_task(_drain(process.stderr)))  # never block on a full pipe

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 30)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        await asyncio.gather(*self.drains, return_exceptions=True)

    def spool_drained(self) -> bool:
        active = self.config.parent / "spool" / "active"
        return not any("." not in path.name for path in active.iterdir())


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.read(65536):
        pass


@pytest.fixture(params=["leasing", "no-leasing"])
async def cluster(
    tmp_path: Path, upstream: Upstream, schema: str, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[Node, Node, Meter]]:
    """Two nodes (eu, us) on one schema, and a meter of our own on it for setting up and checking.

    Twice: with allowance leasing (the default: 50 emails for 0.5 s) and without it
    (every recipient decided in the database), since both must keep every guarantee.
    """
    plans = {"race": {"email_quota": 5000}}
    lease_emails = 50 if request.param == "leasing" else 0
    nodes = []
    for name, region in (("node-eu", "eu"), ("node-us", "us")):
        directory = tmp_path / name
        directory.mkdir()
        config = write_config(
            directory,
            upstream.port,
            node={"name": name, "region": region},
            plans=plans,
            database={"url": schema_url(schema), "pool_size": 8, "lease_emails": lease_emails, "lease_seconds": 0.5},
            log={"level": "info"},
            delivery={"workers": 4, "retry_first_delay": 0.2, "retry_max_delay": 0.5, "max_age": 3600},
        )
        nodes.append(Node(config, leasing=lease_emails > 0))
    store = PgStore(PG_URL, pool_size=2, server_settings={"search_path": schema})
    await store.open()
    meter = Meter(store, parse_plans(plans), node="test", region="preload")
    # Bound to loopback (like Postfix mynetworks): sessions need no AUTH, so 200 sessions do not
    # spend seconds of scrypt; the meter path is the same as after AUTH.
    await meter.add_account("app", PASSWORD, "race", ["example.com"], ["127.0.0.0/8"])
    await asyncio.gather(*(node.start() for node in nodes))
    try:
        yield nodes[0], nodes[1], meter
    finally:
        await asyncio.gather(*(node.stop() for node in nodes))
        await store.close()


async def no_holds_left(schema: str) -> int:
    """The holds left once every node gave back its idle leases (within lease_seconds)."""
    deadline = time.monotonic() + 5
    while (left := await scalar(schema, "SELECT COUNT(*) FROM holds")) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return left


def message(test_id: str) -> bytes:
    return f"X-Test-Id: {test_id}\r\nSubject: two nodes\r\n\r\nhello\r\n".encode()


async def session(port: int, test_id: str, recipients: int) -> list[str]:
    """One SMTP session, one message: the recipients that got a 250 with the message's 250."""
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=30)
    await client.connect()
    try:
        try:
            await client.mail("app@example.com")
        except aiosmtplib.SMTPSenderRefused as refused:  # the quota was used up before MAIL
            assert refused.code == 451, refused
            return []
        held = []
        for n in range(recipients):
            try:
                await client.rcpt(f"{test_id}.{n}@dest.test")
                held.append(f"{test_id}.{n}@dest.test")
            except aiosmtplib.SMTPRecipientRefused as refused:
                assert refused.code == 452, refused
        if not held:
            await client.rset()
            return []
        response = await client.data(message(test_id))
        assert response.code == 250
        return held
    finally:
        client.close()


async def test_200_sessions_on_two_nodes_race_for_the_last_1000_emails(
    cluster: tuple[Node, Node, Meter], upstream: Upstream, schema: str
) -> None:
    eu, us, meter = cluster
    preload = await meter.reserve("app", None, 4000)  # quota 5,000: 1,000 left
    await meter.commit(preload.hold_id, "PRELOAD", 4000)
    # 200 sessions of 6 recipients each (1,200 wanted), alternating between the nodes.
    ports = [eu.port if n % 2 == 0 else us.port for n in range(200)]
    accepted = await asyncio.gather(*(session(port, f"s{n}", 6) for n, port in enumerate(ports)))
    for attempt in range(3):
        # With leasing, a node may refuse (452, "try later") while the other still holds a few
        # of the last emails in its lease; it gives them back within lease_seconds, and the
        # clients' queues retry, as an MTA does. Without leasing no retry is ever needed.
        if sum(len(a) for a in accepted) >= 1000 or not eu.leasing:
            break
        await asyncio.sleep(1.2)
        retry_ports = [eu.port if n % 2 == 0 else us.port for n in range(20)]
        accepted += await asyncio.gather(*(session(p, f"r{attempt}-{n}", 6) for n, p in enumerate(retry_ports)))
        ports += retry_ports
    by_node = {
        "eu": sum(len(a) for a, p in zip(accepted, ports, strict=True) if p == eu.port),
        "us": sum(len(a) for a, p in zip(accepted, ports, strict=True) if p == us.port),
    }
    recipients = [r for a in accepted for r in a]
    assert len(recipients) == 1000
    await upstream.handler.wait_for(lambda: len(upstream.handler.delivered_to()) >= 1000, timeout=40)
    await asyncio.sleep(0.3)  # nothing more may come
    assert sorted(upstream.handler.delivered_to()) == sorted(recipients)  # exactly those, each once
    assert await no_holds_left(schema) == 0  # idle leases given back; then nothing is reserved
    report = await meter.usage("app")
    assert (report.usage.accepted, report.usage.reserved) == (5000, 0)
    assert by_node["eu"] > 0 and by_node["us"] > 0  # both nodes really took part
    assert report.as_json()["by_region"] == {"preload": 4000, **by_node}  # each node's region label


@dataclass
class Tally:
    accepted: dict[str, int] = field(default_factory=dict)  # test id -> recipients, got 250
    refused: set[str] = field(default_factory=set)
    in_doubt: dict[str, int] = field(default_factory=dict)  # no answer to the final "."
    after_kill: list[int] = field(default_factory=list)  # the survivor's replies after the kill


async def sender(port: int, prefix: str, tally: Tally, stop: asyncio.Event, killed: asyncio.Event) -> None:
    """Messages back to back on one session until told to stop or the node dies."""
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=10)
    await client.connect()
    await client.login("app", PASSWORD)
    serial = 0
    try:
        while not stop.is_set():
            serial += 1
            test_id, recipients = f"{prefix}m{serial}", 1 + serial % 2
            try:
                await client.mail("app@example.com")
                for n in range(recipients):
                    await client.rcpt(f"{test_id}.{n}@dest.test")
            except aiosmtplib.SMTPResponseException as error:
                if killed.is_set():
                    tally.after_kill.append(error.code)
                await client.rset()
                continue
            try:
                response = await client.data(message(test_id))
            except aiosmtplib.SMTPResponseException as error:
                tally.refused.add(test_id)
                if killed.is_set():
                    tally.after_kill.append(error.code)
                continue
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                tally.in_doubt[test_id] = recipients
                return
            tally.accepted[test_id] = recipients
            if killed.is_set():
                tally.after_kill.append(response.code)
    except (aiosmtplib.SMTPException, OSError, TimeoutError):
        return  # the node died before DATA: nothing of this message was accepted
    finally:
        client.close()


async def test_a_node_killed_under_load_the_other_keeps_serving_and_the_meter_stays_exact(
    cluster: tuple[Node, Node, Meter], upstream: Upstream, schema: str
) -> None:
    victim, survivor, meter = cluster
    store = meter.store
    await meter.set_email_limit("app", "quota", 1_000_000)  # an increase applies at once
    tally, on_victim = Tally(), Tally()
    stop, killed = asyncio.Event(), asyncio.Event()
    clients = [asyncio.create_task(sender(victim.port, f"v{n}", on_victim, stop, asyncio.Event())) for n in range(6)]
    clients += [asyncio.create_task(sender(survivor.port, f"s{n}", tally, stop, killed)) for n in range(6)]
    await asyncio.sleep(1.0)
    # A session in the middle of a transaction on the victim: its hold is left behind by the kill.
    stranded = aiosmtplib.SMTP(hostname="127.0.0.1", port=victim.port, start_tls=False, timeout=10)
    await stranded.connect()
    await stranded.login("app", PASSWORD)
    await stranded.mail("app@example.com")
    await stranded.rcpt("stranded@dest.test")
    victim.kill()
    killed.set()
    await victim.process.wait()  # type: ignore[union-attr]
    await asyncio.sleep(1.5)  # the survivor keeps serving
    stop.set()
    await asyncio.gather(*clients)
    stranded.close()
    assert len(tally.after_kill) > 10 and set(tally.after_kill) == {250}, tally.after_kill
    assert await scalar(schema, "SELECT COUNT(*) FROM holds WHERE node = 'node-eu'") >= 1
    await victim.start()  # the same node again: releases its holds, settles its incoming spool
    assert int(victim.started["holds_released"]) >= 1  # type: ignore[call-overload]
    deadline = time.monotonic() + 30
    while not (victim.spool_drained() and survivor.spool_drained()):
        assert time.monotonic() < deadline, "the spools did not drain"
        await asyncio.sleep(0.1)

    accepted = {**tally.accepted, **on_victim.accepted}
    in_doubt = {**tally.in_doubt, **on_victim.in_doubt}
    delivered: dict[str, set[str]] = {}
    for received in upstream.handler.messages:
        match = TAG.search(received.content)
        if match:
            delivered.setdefault(match.group(1).decode(), set()).update(received.rcpt_tos)
    assert on_victim.accepted and tally.accepted, "each node accepted mail before the kill"
    for test_id, recipients in accepted.items():  # every 250 reached the upstream, every recipient
        assert len(delivered.get(test_id, ())) == recipients, test_id
    assert set(delivered) <= set(accepted) | set(in_doubt)
    assert not (tally.refused | on_victim.refused) & set(delivered)
    for test_id in set(in_doubt) & set(delivered):  # in doubt: all of it or none of it
        assert len(delivered[test_id]) == in_doubt[test_id]
    distinct = sum(len(recipients) for recipients in delivered.values())
    account = await meter.account("app")
    period = meter.period_of(account)
    assert await no_holds_left(schema) == 0
    usage = await store.usage(account.id, period.key)
    assert usage.accepted == distinct == usage.delivered
    assert usage.reserved == 0
    assert await scalar(schema, "SELECT COUNT(*) FROM recipient_results WHERE result = 'delivered'") == distinct
    regions = await store.breakdown(account.id, period.key)
    assert {row["region"] for row in regions} == {"eu", "us"}
