"""Store faults fail closed: a locked or unavailable meter gives 451 4.3.0, a full spool
disk 452 4.3.1, and neither leaves usage, a hold or a spooled message behind."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
from pathlib import Path

import aiosmtplib
import pytest

from tests.conftest import PASSWORD, RelayHarness, Upstream, add_account

MESSAGE = b"Subject: t\r\n\r\nhello\r\n"


async def command(client: aiosmtplib.SMTP, *words: bytes) -> tuple[int, str]:
    response = await client.execute_command(*words)
    return response.code, response.message


def spooled(harness: RelayHarness) -> list[str]:
    assert harness.relay is not None
    spool = harness.relay.spool
    return sorted(p.name for d in (spool.incoming, spool.active) for p in d.iterdir())


async def settled_usage(harness: RelayHarness) -> tuple[int, int]:
    assert harness.relay is not None
    for _ in range(100):
        usage = (await harness.relay.meter.usage("app")).usage
        if usage.reserved == 0:
            break
        await asyncio.sleep(0.05)
    return usage.accepted, usage.reserved


async def test_locked_database_gives_451_and_leaves_nothing(make_relay, upstream: Upstream) -> None:  # type: ignore[no-untyped-def]
    harness: RelayHarness = make_relay(upstream.port, database={"path": "meter.db", "busy_timeout_ms": 100})
    await harness.start()
    await add_account(harness)
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=harness.port, start_tls=False, timeout=10)
    await client.connect()
    await client.login("app", PASSWORD)
    locker = sqlite3.connect(harness.directory / "meter.db", isolation_level=None)
    try:
        assert (await command(client, b"MAIL", b"FROM:<app@example.com>"))[0] == 250  # reads still work (WAL)
        locker.execute("BEGIN EXCLUSIVE")  # another process holds the write lock
        assert await command(client, b"RCPT", b"TO:<a@dest.test>") == (
            451,
            "4.3.0 Metering is temporarily unavailable; retry later",
        )
        locker.execute("COMMIT")
        assert (await command(client, b"RCPT", b"TO:<a@dest.test>"))[0] == 250
        locker.execute("BEGIN EXCLUSIVE")  # now the commit at the end of DATA fails
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await client.data(MESSAGE)
        assert (refused.value.code, refused.value.message) == (
            451,
            "4.3.0 Metering is temporarily unavailable; retry later",
        )
        locker.execute("COMMIT")
    finally:
        locker.close()
    assert await settled_usage(harness) == (0, 0)  # the hold came back once the lock went
    assert spooled(harness) == []
    # The client's retry goes through.
    errors, _ = await client.sendmail("app@example.com", ["a@dest.test"], MESSAGE)
    assert errors == {}
    await client.quit()
    await upstream.handler.wait_for(lambda: upstream.handler.delivered_to() == ["a@dest.test"])
    assert await settled_usage(harness) == (1, 0)


@pytest.fixture
def tiny_disk(tmp_path: Path):  # type: ignore[no-untyped-def]
    mount_point = tmp_path / "spool"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


async def test_full_spool_disk_gives_452_and_leaves_nothing(make_relay, upstream: Upstream, tiny_disk: Path) -> None:  # type: ignore[no-untyped-def]
    harness: RelayHarness = make_relay(
        upstream.port, spool={"path": str(tiny_disk)}, limits={"message_size": 1_000_000}
    )
    await harness.start()
    await add_account(harness)
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=harness.port, start_tls=False, timeout=10)
    await client.connect()
    await client.login("app", PASSWORD)
    big = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 200  # 200 KB on a 64 KB disk
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await client.sendmail("app@example.com", ["a@dest.test"], big)
    assert (refused.value.code, refused.value.message) == (452, "4.3.1 Insufficient system storage; retry later")
    assert await settled_usage(harness) == (0, 0)
    assert spooled(harness) == []
    errors, _ = await client.sendmail("app@example.com", ["b@dest.test"], MESSAGE)  # a small one fits
    assert errors == {}
    await client.quit()
    await upstream.handler.wait_for(lambda: upstream.handler.delivered_to() == ["b@dest.test"])
    assert await settled_usage(harness) == (1, 0)
