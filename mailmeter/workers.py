"""Several relay processes on one port: `listen.processes` > 1.

One Python process serves SMTP on one core. With `listen.processes: N`, `mailmeter
serve` becomes a small supervisor that starts N relay processes (`serve --worker I`),
each listening on the same address and port with SO_REUSEPORT, so the kernel spreads
connections over them, and each with its own event loop, spool and node name, sharing
the meter (SQLite in WAL mode, or PostgreSQL). Like Postfix's master: the supervisor
only starts, signals and waits; the spool and the meter are the only hand-off.

- Worker 0 is the node as configured (its node name and spool), so switching between
  one and several processes keeps its spool and holds. Worker I > 0 is node
  `NAME.I` with spool `SPOOL/worker-I`: a restarted worker releases its own holds and
  settles its own spool, exactly as a restarted node does.
- Only worker 0 runs the billing job and the admin API (and so serves /metrics for
  its own process).
- systemd: the workers report READY=1 to the supervisor's own notify socket; the
  supervisor says READY=1 to systemd once every worker listens, forwards SIGHUP
  (each worker reloads) and SIGTERM (each drains), and pings the watchdog. If a worker
  dies, the supervisor stops the others and exits non-zero, for systemd to restart.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import sys
from pathlib import Path

import structlog

from mailmeter.config import Config
from mailmeter.sdnotify import Notifier

STOP_GRACE = 60.0  # seconds a worker gets to drain after SIGTERM before it is killed
# A worker that cannot start says why in one notification line beginning with this, and
# exits 2; the supervisor prints the first such line (one line for all) and exits 2 too.
STARTUP_FAILED = "MAILMETER_STARTUP_FAILED="


def worker_config(config: Config, worker: int) -> Config:
    """The config of worker `worker`: its own node name and spool (worker 0: as configured)."""
    if worker == 0:
        return config
    node = config.node.model_copy(update={"name": f"{config.node.name}.{worker}"})
    spool = config.spool.model_copy(update={"path": config.spool.path / f"worker-{worker}"})
    return config.model_copy(update={"node": node, "spool": spool})


async def supervise(path: Path, config: Config) -> int:
    """Run `listen.processes` relay processes until SIGTERM/SIGINT; the exit status."""
    log = structlog.get_logger("mailmeter")
    count = config.processes
    notifier = Notifier()
    inbox = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    name = f"mailmeter-{os.getpid()}-{secrets.token_hex(4)}"
    inbox.bind("\0" + name)  # abstract namespace: nothing on disk to clean up
    inbox.setblocking(False)
    env = {key: value for key, value in os.environ.items() if key not in ("WATCHDOG_USEC", "WATCHDOG_PID")}
    env["NOTIFY_SOCKET"] = "@" + name
    loop = asyncio.get_running_loop()
    workers = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "mailmeter.cli",
            "serve",
            "--config",
            str(path),
            "--worker",
            str(worker),
            env=env,
        )
        for worker in range(count)
    ]
    exits = [asyncio.ensure_future(worker.wait()) for worker in workers]
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: _signal_all(workers, signal.SIGHUP))
    loop.add_signal_handler(signal.SIGUSR1, lambda: _signal_all(workers, signal.SIGUSR1))  # lift AUTH lockouts
    watchdog = asyncio.create_task(notifier.watchdog())
    status = 0
    try:
        reported: list[str] = []  # start-up failures the workers sent
        ready = asyncio.ensure_future(_all_ready(loop, inbox, count, reported))
        stopping = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait([ready, stopping, *exits], return_when=asyncio.FIRST_COMPLETED)
        if ready in done:
            notifier.notify(
                "READY=1",
                f"STATUS=serving on {config.listen[0].address}:{config.listen[0].port} with {count} processes",
            )
            log.info("relay.processes_ready", processes=count, pids=[w.pid for w in workers], result="ok")
            ready = asyncio.ensure_future(_discard(loop, inbox))  # later notifications (reloads) are theirs
            done, _ = await asyncio.wait([stopping, *exits], return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if stopping not in done:  # a worker exited on its own: stop the rest, let systemd restart us
            failures = reported + _startup_failures(inbox)
            if failures:
                print(f"mailmeter: {failures[0]}", file=sys.stderr, flush=True)
                notifier.notify(f"STATUS=could not start: {failures[0]}")
                status = 2
            else:
                dead = [w.pid for w in workers if w.returncode is not None]
                log.error("relay.worker_exited", pids=dead, result="stopping the other workers")
                status = 1
        stopping.cancel()
    finally:
        notifier.notify("STOPPING=1", "STATUS=draining")
        _signal_all(workers, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.gather(*exits), STOP_GRACE)
        except TimeoutError:
            _signal_all(workers, signal.SIGKILL)
            await asyncio.gather(*exits)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
            loop.remove_signal_handler(sig)
        watchdog.cancel()
        await asyncio.gather(watchdog, return_exceptions=True)
        inbox.close()
    if status == 0 and any(worker.returncode not in (0, None) for worker in workers):
        status = 1
    return status


def _startup_failures(inbox: socket.socket) -> list[str]:
    """The start-up failures the workers reported (read from what is queued on the socket)."""
    failures: list[str] = []
    while True:
        try:
            data = inbox.recv(65536)
        except (BlockingIOError, InterruptedError):
            return failures
        for line in data.decode(errors="replace").splitlines():
            if line.startswith(STARTUP_FAILED):
                failures.append(line.removeprefix(STARTUP_FAILED))


async def _all_ready(loop: asyncio.AbstractEventLoop, inbox: socket.socket, count: int, failures: list[str]) -> None:
    """Until `count` READY=1 datagrams came (one per worker, sent once it listens); the
    start-up failures reported meanwhile go into `failures`."""
    ready = 0
    while ready < count:
        lines = (await loop.sock_recv(inbox, 65536)).decode(errors="replace").splitlines()
        ready += lines.count("READY=1")
        failures.extend(line.removeprefix(STARTUP_FAILED) for line in lines if line.startswith(STARTUP_FAILED))


async def _discard(loop: asyncio.AbstractEventLoop, inbox: socket.socket) -> None:
    """Keep reading the workers' notifications so their queue never fills."""
    while True:
        await loop.sock_recv(inbox, 4096)


def _signal_all(workers: list[asyncio.subprocess.Process], sig: signal.Signals) -> None:
    for worker in workers:
        if worker.returncode is None:
            try:
                worker.send_signal(sig)
            except ProcessLookupError:
                pass


__all__ = ["STARTUP_FAILED", "supervise", "worker_config"]
