"""Model C: every reply of docs/delivery-results.md, answered by a real upstream, bills as the doc says.

A real aiosmtpd upstream answers each documented reply to one recipient (at RCPT, or
after the data); the relay retries or not by the reply code, and the meter records the
billing category and sub-type the reply means. Stored results from before sub-types
existed stay readable after the schema migration (SQLite and PostgreSQL).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiosmtplib
from aiosmtpd.smtp import SMTP, Envelope, Session

from mailmeter.metering.meter import Meter
from mailmeter.metering.postgres import PgStore
from mailmeter.metering.postgres.schema import PG_MIGRATIONS
from mailmeter.metering.sqlite import SqliteStore
from mailmeter.metering.sqlite.schema import MIGRATIONS
from mailmeter.policies import parse_plans
from tests.conftest import PASSWORD, RelayHarness, Upstream, UpstreamHandler, add_account, free_port
from tests.pgserver import PG_URL, admin_connection, isolated_schema
from tests.result_rows import rows

RESULTS_PLAN = {
    "billable": "results",
    "result_prices": {"per": 1000, "delivered": "0.30", "soft_bounced": "0.10", "invalid": "0.05"},
}
EXPIRE_FAST = {"retry_first_delay": 0.15, "retry_factor": 1, "retry_max_delay": 0.15, "max_age": 1.0}
MESSAGE = b"From: app@example.com\r\nTo: r@dest.test\r\nSubject: categories\r\n\r\nhello\r\n"


@dataclass
class AnsweringHandler(UpstreamHandler):
    """Answers each listed recipient's RCPT with its reply (a 2yz accepts it) and counts the tries."""

    tries: Counter[str] = field(default_factory=Counter)

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        self.tries[address] += 1
        reply = self.rcpt_replies.get(address)
        if reply is None or reply.startswith("2"):
            envelope.rcpt_tos.append(address)
            return reply or "250 OK"
        return reply


async def start_relay(make_relay, port: int) -> RelayHarness:  # type: ignore[no-untyped-def]
    harness = make_relay(
        port, delivery=EXPIRE_FAST, plans={"results": RESULTS_PLAN}, limits={"recipients_per_message": 200}
    )
    await harness.start()
    await add_account(harness, plan="results")
    return harness


async def settled(meter: Meter, total: int, timeout: float = 30.0) -> dict[str, object]:
    """The usage once `total` results are final and nothing is deferred."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        report = (await meter.usage("app")).as_json()
        final = report["delivered"] + report["soft_bounced"] + report["hard_bounced"]
        if final == total and report["deferred"] == 0:
            return report
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not settled: {report}")
        await asyncio.sleep(0.05)


def stored_results(harness: RelayHarness) -> dict[str, tuple[str, str]]:
    with sqlite3.connect(harness.directory / "meter.db") as db:
        return {
            recipient: (result, reason)
            for recipient, result, reason in db.execute("SELECT recipient, result, reason FROM recipient_results")
        }


async def test_every_documented_reply_from_a_real_upstream_bills_as_documented(make_relay) -> None:  # type: ignore[no-untyped-def]
    table = rows()
    handler = AnsweringHandler()
    upstream = Upstream(port=free_port(), handler=handler)
    await upstream.start()
    try:
        harness = await start_relay(make_relay, upstream.port)
        addresses = {f"row{n}@dest.test": row for n, row in enumerate(table)}
        handler.rcpt_replies.update({address: row.reply for address, row in addresses.items()})
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=harness.port, start_tls=False, timeout=10)
        await client.connect()
        await client.login("app", PASSWORD)
        for address in addresses:  # one message each: a 421 drops the upstream connection it came on
            errors, _ = await client.sendmail("app@example.com", [address], MESSAGE)
            assert errors == {}
        client.close()
        assert harness.relay is not None
        report = await settled(harness.relay.meter, len(table))

        stored = stored_results(harness)
        wrong = {
            address: (row.reply, stored.get(address), (row.category, row.reason))
            for address, row in addresses.items()
            if stored.get(address) != (row.category, row.reason)
        }
        assert wrong == {}
        for address, row in addresses.items():  # retried only when the reply code says so
            retried = row.code // 100 == 4 or row.reply.startswith("552 5.5.3")
            assert (handler.tries[address] > 1) == retried, row.reply
        expected = Counter((row.category, row.reason) for row in table)
        assert report["delivered"] == expected["delivered", ""]
        assert report["bounce_types"] == {
            category: {reason: n for (c, reason), n in sorted(expected.items()) if c == category}
            for category in ("soft_bounced", "hard_bounced")
        }
        assert report["accepted"] == len(table)
    finally:
        await upstream.stop()


async def test_552_5_3_4_after_the_data_is_a_soft_bounce_and_not_retried(make_relay, upstream: Upstream) -> None:  # type: ignore[no-untyped-def]
    """The issue's case: a message too large for the upstream, refused after its data."""
    harness = await start_relay(make_relay, upstream.port)
    upstream.handler.data_reply = "552 5.3.4 Message too big for system"
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=harness.port, start_tls=False, timeout=10)
    await client.connect()
    await client.login("app", PASSWORD)
    await client.sendmail("app@example.com", ["big1@dest.test", "big2@dest.test"], MESSAGE)
    client.close()
    assert harness.relay is not None
    report = await settled(harness.relay.meter, 2)
    assert (report["soft_bounced"], report["hard_bounced"]) == (2, 0)
    assert report["bounce_types"] == {"soft_bounced": {"message_too_large": 2}, "hard_bounced": {}}
    # Refused once, for good: no second attempt (retries come after 0.2 s here). The upstream
    # also gets the DSN to app@example.com (refused the same way), on a connection of its
    # own or not: so the original's DATA is counted, not the connections.
    await asyncio.sleep(0.8)
    originals = [m for m in upstream.handler.messages if m.rcpt_tos == ["big1@dest.test", "big2@dest.test"]]
    assert len(originals) == 1
    assert stored_results(harness) == {
        "big1@dest.test": ("soft_bounced", "message_too_large"),
        "big2@dest.test": ("soft_bounced", "message_too_large"),
    }


async def test_results_stored_before_the_migration_stay_readable_on_sqlite(tmp_path: Path) -> None:
    path = tmp_path / "meter.db"
    with sqlite3.connect(path) as db:  # a database of the previous schema, with a result in it
        db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        for script in MIGRATIONS[:3]:
            db.executescript(script)
        db.execute("INSERT INTO schema_version VALUES (3)")
        db.execute(
            "INSERT INTO accounts (id, name, plan, subscribed_on, created_at)"
            " VALUES (1, 'app', 'results', '2026-04-01', '2026-04-01T00:00:00Z')"
        )
        db.execute(
            "INSERT INTO messages VALUES ('Q1', 1, '2026-04-01T00:00:00Z', 2, 'n1', '2026-04-02T00:00:00+00:00', '')"
        )
        db.execute(
            "INSERT INTO recipient_results (queue_id, recipient, result, period_key, detail, updated_at)"
            " VALUES ('Q1', 'old@dest.test', 'hard_bounced', '2026-04-01T00:00:00Z',"
            " '552 5.2.2 Mailbox full', '2026-04-02T00:00:00+00:00')"
        )
        db.execute(
            "INSERT INTO period_usage (account_id, period_key, accepted, hard_bounced)"
            " VALUES (1, '2026-04-01T00:00:00Z', 2, 1)"
        )
    store = SqliteStore(path)
    await store.open()
    try:
        await check_old_and_new_results(store)
    finally:
        await store.close()


async def test_results_stored_before_the_migration_stay_readable_on_postgresql() -> None:
    async with isolated_schema() as schema:
        conn = await admin_connection()
        try:
            await conn.execute(f'SET search_path TO "{schema}"')
            await conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            for script in PG_MIGRATIONS[:3]:
                await conn.execute(script)
            await conn.execute("INSERT INTO schema_version VALUES (3)")
            await conn.execute(
                "INSERT INTO accounts (id, name, plan, subscribed_on, created_at)"
                " VALUES (1, 'app', 'results', '2026-04-01', '2026-04-01T00:00:00Z')"
            )
            await conn.execute(
                "INSERT INTO messages VALUES ('Q1', 1, '2026-04-01T00:00:00Z', 2, 'n1',"
                " '2026-04-02T00:00:00+00:00', '')"
            )
            await conn.execute(
                "INSERT INTO recipient_results (queue_id, recipient, result, period_key, detail, updated_at)"
                " VALUES ('Q1', 'old@dest.test', 'hard_bounced', '2026-04-01T00:00:00Z',"
                " '552 5.2.2 Mailbox full', '2026-04-02T00:00:00+00:00')"
            )
            await conn.execute(
                "INSERT INTO period_usage (account_id, period_key, accepted, hard_bounced)"
                " VALUES (1, '2026-04-01T00:00:00Z', 2, 1)"
            )
        finally:
            await conn.close()
        store = PgStore(PG_URL, pool_size=2, server_settings={"search_path": schema})
        await store.open()
        try:
            await check_old_and_new_results(store)
        finally:
            await store.close()


async def check_old_and_new_results(store: SqliteStore | PgStore) -> None:
    """The old result keeps its category (as it was billed) and reads as unclassified; a new
    one with the same reply is categorized by its meaning."""
    from datetime import datetime, timezone

    meter = Meter(
        store,
        parse_plans({"results": RESULTS_PLAN}),
        node="n1",
        clock=lambda: datetime(2026, 4, 20, tzinfo=timezone.utc),
    )
    assert await store.schema_version() == len(MIGRATIONS)
    assert await meter.record_result("Q1", "new@dest.test", "hard_bounced", "552 5.2.2 Mailbox full", 552, "5.2.2")
    report = (await meter.usage("app")).as_json()
    assert (report["soft_bounced"], report["hard_bounced"]) == (1, 1)
    assert report["bounce_types"] == {"soft_bounced": {"mailbox_full": 1}, "hard_bounced": {"unclassified": 1}}
