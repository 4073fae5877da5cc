"""Starting `mailmeter serve`: one instance per spool and node name; every start-up failure one line.

Real processes only: the running relay and the second one are `mailmeter serve`
subprocesses on real sockets, the read-only places are real read-only bind mounts.
A second instance must exit at once (status 2, one line naming the process in the
way) without touching the running node's holds, spool or sessions.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from tests.conftest import PASSWORD, RawSmtp, Upstream, free_port, write_config
from tests.mailmeter.test_cli_and_service import add
from tests.mailmeter.test_service_signals import REPO, Service, launch
from tests.pgserver import admin_connection, isolated_schema, scalar, schema_url
from tests.test_abuse import plain, session

START_TIMEOUT = 30.0  # "at once": a hang fails the test


async def serve_once(config: Path, timeout: float = START_TIMEOUT) -> tuple[int, list[str]]:
    """Run `mailmeter serve` expecting it to refuse to start: (exit status, stderr lines)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mailmeter.cli",
        "serve",
        "--config",
        str(config),
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO,
        start_new_session=True,
    )
    try:
        _, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
        raise AssertionError(f"mailmeter serve did not exit within {timeout} s (it hangs)") from None
    return process.returncode or 0, err.decode().splitlines()


def one_line(lines: list[str]) -> str:
    """The operator's line: exactly one, not JSON, no traceback."""
    plain_lines = [line for line in lines if not line.startswith("{")]
    assert len(plain_lines) == 1, lines
    assert "Traceback" not in "\n".join(lines), lines
    assert plain_lines[0].startswith("mailmeter: "), lines
    return plain_lines[0]


@asynccontextmanager
async def running(config: Path, directory: Path) -> AsyncIterator[Service]:
    svc = await launch(config, directory)
    started = await svc.event("relay.started")
    svc.port = int(started["listen"].rsplit(":", 1)[1])
    try:
        yield svc
    finally:
        if svc.process.returncode is None:
            svc.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(svc.process.wait(), 30)
            except TimeoutError:
                svc.process.kill()
                await svc.process.wait()
        svc.notify.close()


async def open_transaction(port: int) -> RawSmtp:
    """A session holding one email of account app: AUTH, MAIL, RCPT answered, DATA not yet sent."""
    client = await session(port)
    assert (await client.command(plain("app", PASSWORD))).code == 235
    assert (await client.command("MAIL FROM:<app@example.com>")).code == 250
    assert (await client.command("RCPT TO:<held@dest.test>")).code == 250
    return client


async def finish_transaction(client: RawSmtp) -> int:
    assert (await client.command("DATA")).code == 354
    reply = await client.command(b"Subject: held across a second start\r\n\r\nbody\r\n.")
    await client.command("QUIT")
    client.close()
    return reply.code


def usage_of(config: Path) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, "-m", "mailmeter.cli", "--config", str(config), "usage", "app", "--json"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


async def test_a_second_instance_exits_at_once_and_the_running_one_keeps_its_transaction(
    tmp_path: Path, upstream: Upstream
) -> None:
    """Same config, started while the first holds an open transaction: exit 2 with one line that
    names the running process (pid, node); its incoming/ file, its hold and its session survive."""
    config = write_config(tmp_path, upstream.port, log={"level": "info"})
    assert add(config).returncode == 0
    async with running(config, tmp_path) as first:
        client = await open_transaction(first.port)
        stray = tmp_path / "spool" / "incoming" / "in-flight"  # as if a commit were in flight
        stray.write_bytes(b"{}\n")
        status, lines = await serve_once(config)
        line = one_line(lines)
        assert status == 2, lines
        assert f"spool.path {tmp_path / 'spool'} is in use" in line
        assert f"pid {first.process.pid}" in line and "node test-node" in line
        assert stray.exists()  # the second one settled nothing
        assert usage_of(config)["reserved"] == 1  # nor released the running node's hold
        assert await finish_transaction(client) == 250
        await upstream.handler.wait_for(lambda: upstream.handler.delivered_to() == ["held@dest.test"])
        stray.unlink()
    usage = usage_of(config)
    assert (usage["accepted"], usage["reserved"], usage["delivered"]) == (1, 0, 1)


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    async with isolated_schema() as name:
        yield name


async def test_a_second_node_of_the_same_name_on_postgresql_is_refused(
    tmp_path: Path, upstream: Upstream, schema: str
) -> None:
    """PostgreSQL: another process under the running node's name (its own spool, so the spool lock
    does not stop it) is refused by the live claim on the name, before it releases any hold."""
    database = {"url": schema_url(schema), "pool_size": 4, "lease_emails": 0}
    first_dir, second_dir = tmp_path / "a", tmp_path / "b"
    first_dir.mkdir()
    second_dir.mkdir()
    config = write_config(first_dir, upstream.port, log={"level": "info"}, database=database)
    twin = write_config(second_dir, upstream.port, log={"level": "info"}, database=database)
    assert add(config).returncode == 0
    async with running(config, first_dir) as first:
        client = await open_transaction(first.port)
        status, lines = await serve_once(twin)
        line = one_line(lines)
        assert status == 2, lines
        assert "node.name 'test-node' is in use by another running mailmeter" in line
        assert f"mailmeter pid {first.process.pid} on" in line  # the holder, as the database knows it
        assert await scalar(schema, "SELECT COUNT(*) FROM holds") == 1
        assert await finish_transaction(client) == 250
    # The claim died with the first process: the same name starts now.
    async with running(twin, second_dir) as again:
        assert again.port
    assert await scalar(schema, "SELECT COUNT(*) FROM holds") == 0


async def test_port_in_use_is_one_line_and_exit_2(tmp_path: Path, upstream: Upstream) -> None:
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        config = write_config(tmp_path, upstream.port, listen={"address": "127.0.0.1", "port": port})
        status, lines = await serve_once(config)
        assert status == 2
        assert f"listen: 127.0.0.1:{port} is already in use by another program" in one_line(lines)
        api_config = write_config(
            tmp_path, upstream.port, api={"enabled": True, "port": port, "tokens_file": str(tokens(tmp_path))}
        )
        status, lines = await serve_once(api_config)
        assert status == 2
        assert f"api: 127.0.0.1:{port} is already in use" in one_line(lines)
        portal_config = write_config(tmp_path, upstream.port, portal={"enabled": True, "port": port})
        status, lines = await serve_once(portal_config)
        assert status == 2
        assert f"portal: 127.0.0.1:{port} is already in use" in one_line(lines)
    assert not list((tmp_path / "spool" / "incoming").iterdir())


def tokens(directory: Path) -> Path:
    path = directory / "tokens"
    path.write_text("ops:" + "t" * 32 + "\n")
    return path


async def test_supervisor_reports_a_workers_start_up_failure_in_one_line(tmp_path: Path, upstream: Upstream) -> None:
    """listen.processes: 2 with worker 1's spool held by another process: the supervisor prints
    the worker's one line (which worker, which node, what is in the way) and exits 2."""
    port = free_port()
    config = write_config(tmp_path, upstream.port, listen={"address": "127.0.0.1", "port": port, "processes": 2})
    holder_dir = tmp_path / "holder"
    holder_dir.mkdir()
    holder = write_config(
        holder_dir,
        upstream.port,
        node={"name": "test-node.1"},
        log={"level": "info"},
        spool={"path": str(tmp_path / "spool" / "worker-1")},
    )
    async with running(holder, holder_dir) as lone:
        status, lines = await serve_once(config)
        line = one_line(lines)
        assert status == 2, lines
        assert line.startswith("mailmeter: worker 1 (node test-node.1): spool.path ")
        assert f"pid {lone.process.pid}" in line
    with socket.socket() as taken:  # every worker fails: still one line
        taken.bind(("127.0.0.1", port))
        taken.listen()
        status, lines = await serve_once(config)
        assert status == 2 and "is already in use by another program" in one_line(lines)


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[Path]:
    """A directory that is really read-only (root ignores file modes): a read-only bind mount."""
    path = tmp_path / "ro"
    path.mkdir()
    (path / "spool").mkdir()
    (path / "meter.db").write_bytes(b"")
    mounted = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot bind-mount here (needs root): {mounted.stderr.strip()}")
    subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], check=True)
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)


async def test_unusable_database_and_spool_are_one_line_each(
    tmp_path: Path, upstream: Upstream, read_only: Path
) -> None:
    cases = [
        (
            {"database": {"path": str(read_only / "meter.db")}},
            f"database.path: cannot open {read_only / 'meter.db'}: attempt to write a readonly database",
        ),
        ({"database": {"path": str(read_only / "new" / "meter.db")}}, "database.path"),
        ({"spool": {"path": str(read_only / "spool")}}, f"spool.path {read_only / 'spool'}: cannot write"),
        ({"spool": {"path": str(read_only / "missing" / "spool")}}, "spool.path"),
        ({"database": {"url": f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"}}, "database.url"),
    ]
    for overrides, expected in cases:
        config = write_config(tmp_path, upstream.port, **overrides)
        status, lines = await serve_once(config)
        line = one_line(lines)
        assert status == 2, (overrides, lines)
        assert expected in line, (overrides, line)


async def test_a_node_takes_its_name_again_after_a_lost_connection_and_stops_if_another_took_it(
    tmp_path: Path, upstream: Upstream, schema: str
) -> None:
    """The claim lives on its own connection: killed by the server, it is taken again; taken by
    someone else meanwhile, the node stops (exit 1) rather than run as a second `test-node`."""
    config = write_config(
        tmp_path, upstream.port, log={"level": "info"}, database={"url": schema_url(schema), "pool_size": 4}
    )
    admin = await admin_connection()
    try:
        await admin.execute(f'SET search_path = "{schema}"')
        async with running(config, tmp_path) as node:
            claim = "SELECT pid FROM pg_stat_activity WHERE application_name = $1"
            owner = f"mailmeter pid {node.process.pid} on {socket.gethostname()}, node test-node"
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", await admin.fetchval(claim, owner))
            again = await node.event("meter.node_claim", timeout=20)
            assert again["result"] == "claimed again"
            backend = await admin.fetchval(claim, owner)
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", backend)
            for _ in range(100):  # terminating is asynchronous: the lock goes when the backend has gone
                if not await admin.fetchval("SELECT COUNT(*) FROM pg_stat_activity WHERE pid = $1", backend):
                    break
                await asyncio.sleep(0.01)
            taken = await admin.fetchval(
                "SELECT pg_try_advisory_lock("
                "hashtextextended('mailmeter.node:' || current_schema() || ':test-node', 0))"
            )
            assert taken
            lost = await node.event("meter.node_claim_lost", timeout=20)
            assert lost["result"] == "stopping"
            assert await asyncio.wait_for(node.process.wait(), 30) == 1
    finally:
        await admin.close()
