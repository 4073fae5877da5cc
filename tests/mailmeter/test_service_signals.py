"""`mailmeter serve` under systemd's protocol: real process, real signals, real NOTIFY_SOCKET."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import yaml

from tests.conftest import PASSWORD, Upstream, free_port, write_config
from tests.mailmeter.test_cli_and_service import add

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Service:
    process: asyncio.subprocess.Process
    notify: socket.socket
    config: Path
    events: list[dict[str, Any]] = field(default_factory=list)
    port: int = 0

    async def event(self, name: str, timeout: float = 20.0) -> dict[str, Any]:
        assert self.process.stderr is not None
        while True:
            raw = await asyncio.wait_for(self.process.stderr.readline(), timeout)
            if not raw:
                raise AssertionError(f"the process exited before logging {name}: {self.events[-3:]}")
            record = json.loads(raw)
            self.events.append(record)
            if record.get("event") == name:
                return record

    async def notification(self, wanted: str, timeout: float = 10.0) -> list[str]:
        """Datagrams from the service until one contains `wanted`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            try:
                data = await asyncio.wait_for(loop.sock_recv(self.notify, 4096), deadline - loop.time())
            except TimeoutError:
                break
            lines = data.decode().splitlines()
            if wanted in lines:
                return lines
        raise AssertionError(f"no {wanted} from the service")


async def launch(config: Path, directory: Path) -> Service:
    """`mailmeter serve` in its own process group, with systemd's NOTIFY_SOCKET and watchdog."""
    notify_path = directory / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    sock.setblocking(False)
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "400000"}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mailmeter.cli",
        "serve",
        "--config",
        str(config),
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO,
        env=env,
        start_new_session=True,
    )
    return Service(process, sock, config)


@pytest.fixture
async def service(tmp_path: Path, upstream: Upstream) -> AsyncIterator[Service]:
    config = write_config(tmp_path, upstream.port, log={"level": "info"}, plans={"small": {"email_quota": 1000}})
    assert add(config).returncode == 0
    svc = await launch(config, tmp_path)
    process, sock = svc.process, svc.notify
    started = await svc.event("relay.started")
    svc.port = int(started["listen"].rsplit(":", 1)[1])
    yield svc
    if process.returncode is None:
        process.kill()
        await process.wait()
    sock.close()


async def login(port: int) -> aiosmtplib.SMTP:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=10)
    await client.connect()
    await client.login("app", PASSWORD)
    return client


async def test_ready_and_watchdog_notifications(service: Service) -> None:
    lines = await service.notification("READY=1")
    assert any(line.startswith("STATUS=serving") for line in lines)
    await service.notification("WATCHDOG=1", timeout=2)
    await service.notification("WATCHDOG=1", timeout=2)  # keeps pinging every WATCHDOG_USEC / 2


async def test_sighup_reloads_plans_without_dropping_a_session(service: Service, upstream: Upstream) -> None:
    await service.notification("READY=1")
    client = await login(service.port)  # a session open across the reload
    data = yaml.safe_load(service.config.read_text())
    data["plans"]["small"]["email_quota"] = 1
    service.config.write_text(yaml.safe_dump(data))
    service.process.send_signal(signal.SIGHUP)
    reloaded = await service.event("config.reloaded")
    assert reloaded["result"] == "applied"
    await service.notification("RELOADING=1")
    errors, _ = await client.sendmail("app@example.com", ["a@dest.test"], b"Subject: 1\r\n\r\nx\r\n")
    assert errors == {}  # the session survived the reload
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:  # the new quota of 1 is in force
        await client.sendmail("app@example.com", ["b@dest.test"], b"Subject: 2\r\n\r\nx\r\n")
    assert refused.value.code == 451 and "quota" in refused.value.message
    await client.quit()


async def test_invalid_config_on_sighup_keeps_the_old_one(service: Service) -> None:
    await service.notification("READY=1")
    good = service.config.read_text()
    service.config.write_text(good.replace("email_quota: 1000", "email_quota: -3"))
    service.process.send_signal(signal.SIGHUP)
    refused = await service.event("config.reload_refused")
    assert "plans.small.email_quota" in refused["error"]
    client = await login(service.port)
    errors, _ = await client.sendmail("app@example.com", ["a@dest.test"], b"Subject: 1\r\n\r\nx\r\n")
    assert errors == {}
    await client.quit()


async def test_sigterm_drains_data_in_flight_and_421s_idle_sessions(service: Service, upstream: Upstream) -> None:
    await service.notification("READY=1")
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", service.port)
    assert (await idle_reader.readline()).startswith(b"220 ")
    idle_writer.write(b"EHLO idle.test\r\n")
    while not (await idle_reader.readline()).startswith(b"250 "):
        pass
    busy = await login(service.port)
    await busy.mail("app@example.com")
    await busy.rcpt("late@dest.test")
    code, _ = await busy.execute_command(b"DATA")
    assert code == 354
    assert busy.transport is not None
    busy.transport.write(b"Subject: in flight\r\n\r\nfirst half\r\n")
    await asyncio.sleep(0.2)
    service.process.send_signal(signal.SIGTERM)
    await service.notification("STOPPING=1")
    # The idle session is told to go away, unasked, then closed.
    line = await asyncio.wait_for(idle_reader.readline(), 10)
    assert line.startswith(b"421 4.3.2 ") and b"shutting down" in line
    assert await asyncio.wait_for(idle_reader.read(), 10) == b""
    idle_writer.close()
    # The message in DATA completes and is accepted.
    busy.transport.write(b"second half\r\n.\r\n")
    assert busy.protocol is not None
    response = await busy.protocol.read_response(timeout=10)
    assert response.code == 250 and "queued as" in response.message
    # No new connections.
    assert await asyncio.wait_for(service.process.wait(), 30) == 0
    with pytest.raises((ConnectionRefusedError, aiosmtplib.SMTPConnectError, OSError)):
        await login(service.port)
    await upstream.handler.wait_for(lambda: upstream.handler.delivered_to() == ["late@dest.test"])


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    unit = (REPO / "systemd" / "mailmeter.service").read_text()
    assert "Type=notify" in unit and "ExecReload=/bin/kill -HUP $MAINPID" in unit
    for setting in (
        "StateDirectory=mailmeter",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "RestrictAddressFamilies=",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "WatchdogSec=",
    ):
        assert setting in unit, setting
    mailmeter = shutil.which("mailmeter") or str(Path(sys.executable).parent / "mailmeter")
    (tmp_path / "mailmeter.service").write_text(unit.replace("/usr/local/bin/mailmeter", mailmeter))
    result = subprocess.run(
        [analyze, "verify", str(tmp_path / "mailmeter.service")], capture_output=True, text=True, timeout=60
    )
    problems = [line for line in result.stderr.splitlines() if "mailmeter.service" in line]
    assert result.returncode == 0 and not problems, result.stderr


async def test_several_processes_share_the_port_and_the_meter(tmp_path: Path, upstream: Upstream) -> None:
    """listen.processes: 2 -> a supervisor and two relays on one port (SO_REUSEPORT), one meter."""
    port = free_port()
    config = write_config(
        tmp_path,
        upstream.port,
        log={"level": "info"},
        plans={"small": {"email_quota": 30}},
        listen={"address": "127.0.0.1", "port": port, "processes": 2},
    )
    assert add(config).returncode == 0
    svc = await launch(config, tmp_path)
    svc.port = port
    process, sock = svc.process, svc.notify
    try:
        started = {(await svc.event("relay.started"))["node"] for _ in range(2)}
        assert started == {"test-node", "test-node.1"}  # worker 0 is the node as configured
        lines = await svc.notification("READY=1")  # from the supervisor, once both listen
        assert f"STATUS=serving on 127.0.0.1:{port} with 2 processes" in lines
        await svc.notification("WATCHDOG=1", timeout=2)  # the supervisor pings the watchdog

        async def send(n: int) -> int:
            client = await login(port)
            try:
                errors, _ = await client.sendmail("app@example.com", [f"r{n}@dest.test"], b"Subject: x\r\n\r\nx\r\n")
                return 0 if errors else 1
            except aiosmtplib.SMTPException:
                return 0
            finally:
                client.close()

        accepted = sum(await asyncio.gather(*(send(n) for n in range(40))))
        assert accepted == 30  # 40 sessions over two processes for a quota of 30: exactly 30
        await upstream.handler.wait_for(lambda: len(upstream.handler.delivered_to()) == 30)
        served = {e.get("node") for e in svc.events if e.get("event") == "relay.started"}
        assert served == {"test-node", "test-node.1"}
        spools = [tmp_path / "spool" / "active", tmp_path / "spool" / "worker-1" / "active"]
        assert all(path.is_dir() for path in spools)  # each worker its own spool
        process.send_signal(signal.SIGHUP)  # forwarded: each worker reloads
        reloads = [await svc.event("config.reloaded") for _ in range(2)]
        assert all(r["result"] == "applied" and r["needs_restart"] == [] for r in reloads)
        process.send_signal(signal.SIGTERM)
        await svc.notification("STOPPING=1")
        stopped = {(await svc.event("relay.stopped"))["node"] for _ in range(2)}
        assert stopped == {"test-node", "test-node.1"}
        assert await asyncio.wait_for(process.wait(), 60) == 0
        with pytest.raises((ConnectionRefusedError, aiosmtplib.SMTPConnectError, OSError)):
            await login(port)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the supervisor and its workers, whatever happened
        except ProcessLookupError:
            pass
        await process.wait()
        sock.close()


def test_several_processes_need_a_fixed_port(tmp_path: Path, upstream: Upstream) -> None:
    config = write_config(tmp_path, upstream.port, listen={"address": "127.0.0.1", "port": 0, "processes": 2})
    result = subprocess.run(
        [sys.executable, "-m", "mailmeter.cli", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode != 0 and "listen.processes" in result.stderr and "listen.port" in result.stderr


async def test_sigusr1_lifts_every_auth_lockout(service: Service) -> None:
    """Five wrong passwords lock 127.0.0.1 and the login out (the right password gets 454);
    `kill -USR1` (systemctl kill -s USR1) lifts the lockouts of the running relay at once."""
    from tests.test_abuse import try_login

    await service.notification("READY=1")
    for _ in range(5):
        assert (await try_login(service.port, "app", "wrong")).code == 535
    assert (await try_login(service.port, "app", PASSWORD)).code == 454
    service.process.send_signal(signal.SIGUSR1)
    cleared = await service.event("smtp.auth_lockouts_cleared")
    assert cleared["lockouts"] == 2  # the address and the login
    assert (await try_login(service.port, "app", PASSWORD)).code == 235
