"""Postfix as the relay's client: a private Postfix instance (bench/services.py) with
`relayhost` = the relay, behind a WireTap that records what Postfix writes.

Postfix's smtp client pipelines when EHLO offers PIPELINING: MAIL, every RCPT and DATA
in one write. The relay takes three recipients (plan `tiny`), answers the fourth and
fifth 452 in the middle of the group, and Postfix, reading the replies in order, sends
the message to the three and keeps the two deferred in its queue.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import smtplib
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.services import PostfixInstance, ProcessLedger
from tests.conftest import Upstream, add_account, free_port, settled_usage
from tests.test_pipelining import WireTap, require

RECIPIENTS = ["a@dest.test", "b@dest.test", "c@dest.test", "d@dest.test", "e@dest.test"]
MESSAGE = (
    "From: app@example.com\r\nTo: a@dest.test\r\nSubject: through postfix\r\n"
    "Message-ID: <viapostfix@example.com>\r\n\r\nhello\r\n"
)


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A directory Postfix's unprivileged processes can traverse."""
    path = Path(tempfile.mkdtemp(prefix="mailmeter-postfix-client-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def maillog_lines(instance: PostfixInstance, pattern: str) -> list[str]:
    try:
        text = (instance.root / "maillog").read_text()
    except OSError:
        return []
    return [line for line in text.splitlines() if re.search(pattern, line)]


async def test_postfix_pipelines_to_the_relay_and_gets_each_recipients_reply(  # type: ignore[no-untyped-def]
    make_relay, upstream: Upstream, scratch: Path
) -> None:
    require("postfix", root=True)
    harness = make_relay(upstream.port)
    await harness.start()
    await add_account(harness, plan="tiny", networks=("127.0.0.0/8",))
    tap = WireTap(harness.port)
    await tap.start()
    instance = PostfixInstance(ledger=ProcessLedger(scratch), root=scratch / "postfix", port=free_port())
    try:
        await asyncio.to_thread(instance.start, tap.port)

        def submit() -> dict[str, tuple[int, bytes]]:
            with smtplib.SMTP("127.0.0.1", instance.port, timeout=30) as client:
                return client.sendmail("app@example.com", RECIPIENTS, MESSAGE)

        assert await asyncio.to_thread(submit) == {}  # Postfix took all five
        await upstream.handler.wait_for(lambda: len(upstream.handler.messages) == 1, timeout=60)
        assert upstream.handler.messages[0].rcpt_tos == RECIPIENTS[:3]
        assert b"<viapostfix@example.com>" in upstream.handler.messages[0].content

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            sent = maillog_lines(instance, r"status=sent .*250 2\.0\.0 Ok: queued as")
            deferred = maillog_lines(instance, r"status=deferred .*452 4\.7\.1 Email quota")
            if len(sent) == 3 and len(deferred) == 2:
                break
            await asyncio.sleep(0.1)
        assert sorted(re.search(r"to=<([^>]+)>", line).group(1) for line in sent) == RECIPIENTS[:3]  # type: ignore[union-attr]
        assert sorted(re.search(r"to=<([^>]+)>", line).group(1) for line in deferred) == RECIPIENTS[3:]  # type: ignore[union-attr]
        assert all("in reply to RCPT TO command" in line for line in deferred)

        # Postfix pipelined: MAIL, the five RCPTs and DATA arrived as one turn (no wait between).
        groups = [turn for log in range(len(tap.connections)) for turn in tap.turns(log) if b"MAIL FROM:" in turn]
        assert len(groups) == 1
        assert groups[0].startswith(b"MAIL FROM:<app@example.com>")
        assert groups[0].count(b"RCPT TO:") == 5 and groups[0].endswith(b"DATA\r\n")
    finally:
        await asyncio.to_thread(instance.stop)
        await tap.stop()
    assert harness.relay is not None
    usage = await settled_usage(harness.relay.meter)
    assert (usage.accepted, usage.reserved) == (3, 0)


async def test_smtp_source_sessions_with_several_recipients(make_relay, upstream: Upstream) -> None:  # type: ignore[no-untyped-def]
    """Postfix's smtp-source (4 sessions, 40 messages of 3 recipients) against the EHLO that
    now offers PIPELINING and ENHANCEDSTATUSCODES: every message and recipient is taken.

    (Postfix 3.7's smtp-source has no -P option and does not pipeline: `smtp-source -P`
    answers "invalid option"; pipelining clients are the Postfix test above and the raw
    groups of test_pipelining_in.py.)"""
    require("smtp-source")
    harness = make_relay(upstream.port)
    await harness.start()
    await add_account(harness, domains=("example.com", "dest.test"), networks=("127.0.0.0/8",))
    process = await asyncio.create_subprocess_exec(
        "smtp-source",
        *("-s", "4", "-m", "40", "-r", "3", "-M", "client.test"),
        *("-f", "app@example.com", "-t", "rcpt@dest.test"),
        f"127.0.0.1:{harness.port}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    await upstream.handler.wait_for(lambda: len(upstream.handler.messages) == 40, timeout=60)
    assert all(len(message.rcpt_tos) == 3 for message in upstream.handler.messages)
    assert harness.relay is not None
    usage = await settled_usage(harness.relay.meter)
    assert (usage.accepted, usage.reserved) == (120, 0)
