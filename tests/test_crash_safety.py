"""Crash safety: load through a real relay process, SIGKILL at random moments, restart, drain.

Every message that got a `250` must reach the upstream; a message refused with an
explicit reply never may; the meter's accepted usage must equal what reaches the
upstream, recipient for recipient; no charge may be lost or doubled. A client whose
connection died after its final "." got no answer at all: its message is "in doubt"
(the relay may have committed it just before dying), as in any MTA; it is delivered
exactly when the meter counted it, never half.

Run twice: with the file spool, and with the inline spool (spool.inline: each message
kept in the store's commit transaction, no spool file).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import sqlite3
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiosmtplib
import pytest

from tests.conftest import PASSWORD, Upstream, write_config
from tests.mailmeter.test_cli_and_service import add

REPO = Path(__file__).resolve().parent.parent
TRIALS = int(os.environ.get("CRASH_TRIALS", "20"))
TAG = re.compile(rb"X-Test-Id: (\S+)")
PLAN = {  # model E's shape, small: a $1 charge per started block of 50 emails past 100
    "included_emails": 100,
    "price": {"kind": "per_block", "amount": "1", "block_emails": 50},
    "in_period_charge": {"kind": "per_block"},
    "usage_alerts": [],
}


@dataclass
class Tally:
    accepted: dict[str, int] = field(default_factory=dict)  # test id -> recipients, got 250
    refused: set[str] = field(default_factory=set)  # got an explicit non-250 reply to DATA
    in_doubt: dict[str, int] = field(default_factory=dict)  # no reply to the final "."


async def sender(port: int, prefix: str, rng: random.Random, tally: Tally) -> None:
    """One client: log in once, then send messages back to back until the relay dies."""
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=5)
    try:
        await client.connect()
        await client.login("app", PASSWORD)
    except (TimeoutError, aiosmtplib.SMTPException, OSError):
        client.close()
        return
    serial = 0
    try:
        while True:
            serial += 1
            test_id = f"{prefix}m{serial}"
            recipients = rng.randint(1, 3)
            try:
                await client.mail("app@example.com")
                for n in range(recipients):
                    await client.rcpt(f"{test_id}.{n}@dest.test")
            except aiosmtplib.SMTPResponseException:
                await client.rset()
                continue
            body = f"X-Test-Id: {test_id}\r\nSubject: crash test\r\n\r\n{'x' * 900}\r\n".encode()
            try:
                response = await client.data(body)
            except aiosmtplib.SMTPResponseException:
                tally.refused.add(test_id)
                continue
            except (TimeoutError, aiosmtplib.SMTPException, OSError):
                tally.in_doubt[test_id] = recipients  # the relay died before answering the final "."
                return
            if response.code == 250:
                tally.accepted[test_id] = recipients
            else:
                tally.refused.add(test_id)
    except (TimeoutError, aiosmtplib.SMTPException, OSError):
        return  # died before DATA: nothing of this message can have been accepted
    finally:
        client.close()


async def start(config: Path) -> tuple[asyncio.subprocess.Process, int]:
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
    while True:
        raw = await asyncio.wait_for(process.stderr.readline(), 30)
        assert raw, "the relay exited during start-up"
        record = json.loads(raw)
        if record.get("event") == "relay.started":
            # Keep draining stderr so the process never blocks on a full pipe.
            asyncio.ensure_future(_drain(process.stderr))
            return process, int(record["listen"].rsplit(":", 1)[1])


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.read(65536):
        pass


@pytest.mark.parametrize("inline", [False, True], ids=["file-spool", "inline-spool"])
async def test_sigkill_at_random_moments_loses_and_doubles_nothing(
    tmp_path: Path, upstream: Upstream, inline: bool
) -> None:
    config = write_config(
        tmp_path,
        upstream.port,
        spool={"inline": inline},
        plans={"e": PLAN},
        delivery={"workers": 4, "retry_first_delay": 0.2, "retry_max_delay": 0.5, "max_age": 3600},
        billing={"interval": 0.2},
        log={"level": "info"},
    )
    password = tmp_path / "app.password"
    password.write_text(PASSWORD + "\n")
    assert add(config).returncode == 0
    import yaml

    data = yaml.safe_load(config.read_text())
    database = tmp_path / data["database"]["path"]
    with sqlite3.connect(database) as db:
        db.execute("UPDATE accounts SET plan = 'e'")
    rng = random.Random(20261122)
    tally = Tally()
    for trial in range(TRIALS):
        process, port = await start(config)
        clients = [
            asyncio.ensure_future(sender(port, f"t{trial}c{n}", random.Random(rng.random()), tally))
            for n in range(rng.randint(4, 10))
        ]
        await asyncio.sleep(rng.uniform(0.3, 1.2))
        process.send_signal(signal.SIGKILL)
        await process.wait()
        await asyncio.gather(*clients)
    # A last start lets the spool drain completely.
    process, port = await start(config)
    try:
        spool = tmp_path / data["spool"]["path"]

        def drained() -> bool:
            active = spool / "active"
            with sqlite3.connect(database) as db:
                stored = db.execute("SELECT COUNT(*) FROM spooled_messages").fetchone()[0]
            return not stored and not any(p for p in active.iterdir() if "." not in p.name)

        for _ in range(600):
            if drained():
                break
            await asyncio.sleep(0.1)
        assert drained(), "the spool did not drain"
        await asyncio.sleep(1.0)  # let the billing job see the final usage
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 30)

    # Distinct recipients per message: a kill between the upstream's 250 and the spool
    # recording it makes the restarted relay send that recipient again (at-least-once,
    # as every MTA); the meter still counts it once. Duplicates are reported, not hidden.
    recipients_of: dict[str, set[str]] = {}
    copies = 0
    for message in upstream.handler.messages:
        match = TAG.search(message.content)
        if match:
            seen = recipients_of.setdefault(match.group(1).decode(), set())
            copies += len(seen & set(message.rcpt_tos))
            seen.update(message.rcpt_tos)
    delivered: Counter[str] = Counter({test_id: len(rcpts) for test_id, rcpts in recipients_of.items()})
    with sqlite3.connect(database) as db:
        accepted_usage = db.execute("SELECT COALESCE(SUM(accepted), 0) FROM period_usage").fetchone()[0]
        reserved = db.execute("SELECT COALESCE(SUM(reserved), 0) FROM period_usage").fetchone()[0]
        holds = db.execute("SELECT COUNT(*) FROM holds").fetchone()[0]
        charges = [row[0] for row in db.execute("SELECT seq FROM charges WHERE kind = 'block' ORDER BY seq")]
        results = db.execute("SELECT COUNT(*) FROM recipient_results WHERE result = 'delivered'").fetchone()[0]

    in_doubt_delivered = {t: n for t, n in tally.in_doubt.items() if t in delivered}
    print(
        f"\ncrash test: {TRIALS} SIGKILLs; 250s {len(tally.accepted)} messages"
        f" ({sum(tally.accepted.values())} recipients); refused {len(tally.refused)};"
        f" in doubt {len(tally.in_doubt)} (delivered {len(in_doubt_delivered)});"
        f" upstream got {len(delivered)} messages ({sum(delivered.values())} distinct recipients,"
        f" {copies} duplicate deliveries after kills);"
        f" meter accepted {accepted_usage}; charges {len(charges)}"
    )
    assert TRIALS >= 20
    if inline:  # the inline path was the one taken: no message went through spool files
        assert not list((tmp_path / data["spool"]["path"] / "active").iterdir())
    assert tally.accepted, "the load produced no accepted mail: the test proves nothing"
    # Every 250 reached the upstream, with all its recipients, exactly once per recipient.
    for test_id, recipients in tally.accepted.items():
        assert delivered[test_id] == recipients, test_id
    # An explicit refusal never did.
    assert not tally.refused & set(delivered)
    # Nothing reached the upstream that the relay did not accept (250 or in doubt).
    assert set(delivered) <= set(tally.accepted) | set(tally.in_doubt)
    for test_id, recipients in in_doubt_delivered.items():
        assert delivered[test_id] == recipients  # in doubt: all of it or none of it
    # The meter counted exactly what was delivered: no usage without a message, none doubled.
    assert accepted_usage == sum(delivered.values()) == results
    assert (reserved, holds) == (0, 0)
    # Charges: exactly the blocks this usage opens, each once.
    expected_blocks = max(0, -(-(accepted_usage - 100) // 50))
    assert charges == list(range(1, expected_blocks + 1))
