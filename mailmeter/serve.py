"""The composition root: a relay node (mailmeter/node.py) with its admin API and account portal,
run as `mailmeter serve`.

The admin HTTP API is mailmeter/api.py, the account holders' pages mailmeter/portal/; the node
and its HTTP sides never import each other."""

from __future__ import annotations

import asyncio
import gc
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import structlog

from mailmeter.api import ApiDeps, ApiServer, build_app
from mailmeter.config import Config, ConfigError, load_config
from mailmeter.control import QueueClient, spool_sockets
from mailmeter.logs import configure_logging
from mailmeter.metering.records import StoreUnavailable
from mailmeter.node import Relay, tls_context, upstream_health
from mailmeter.portal.app import PortalDeps, PortalServer
from mailmeter.portal.app import build_app as build_portal
from mailmeter.portal.sessions import Sessions
from mailmeter.sdnotify import Notifier
from mailmeter.service import AdminService
from mailmeter.startup import EXIT_STARTUP, StartupError
from mailmeter.workers import STARTUP_FAILED, supervise, worker_config


def build_relay(config: Config, primary: bool = True) -> Relay:
    """One relay node; the primary process (worker 0 of listen.processes) also serves the admin API
    when api.enabled."""
    return Relay.build(config, primary=primary, start_api=start_api, start_portal=start_portal)


async def start_api(relay: Relay, sock: socket.socket) -> ApiServer:
    """The admin API of a running relay, on `sock` (bound by bind_api to `api.address`:`api.port`)."""
    config = relay.config
    queue = QueueClient(spool_sockets(config), health=lambda: upstream_health(relay.config))
    deps = ApiDeps(
        service_for=lambda actor: AdminService(relay.meter, relay.billing, actor, queue),
        tokens=config.api_tokens(),
        webhook_secret=config.read_secret("api.payment_webhook_secret_file", config.api.payment_webhook_secret_file),
        webhook_tolerance=config.api.webhook_tolerance,
        metrics=relay.metrics,
        ping=relay.store.ping,
        node=config.node.name,
    )
    server = ApiServer(build_app(deps))
    await server.start(sock)
    structlog.get_logger("mailmeter.api").info(
        "api.started",
        listen=f"{config.api.address}:{server.port}",
        tokens=deps.tokens.names,
        payment_webhook=deps.webhook_secret is not None,
    )
    return server


async def start_portal(relay: Relay, sock: socket.socket) -> PortalServer:
    """The account holders' pages (mailmeter/portal/) on `sock` (portal.address:portal.port), sharing
    the relay's SMTP AUTH lockout; HTTPS with the relay's certificate when portal.tls."""
    config = relay.config
    portal = config.portal
    deps = PortalDeps(
        service=lambda: AdminService(relay.meter, relay.billing, "portal"),
        guard=relay.context.auth_guard,
        sessions=Sessions(idle=portal.session_idle, lifetime=portal.session_max),
        secure_cookies=portal.secure_cookies or portal.tls,
    )
    server = PortalServer(build_portal(deps), tls_context(config) if portal.tls else None)
    await server.start(sock)
    structlog.get_logger("mailmeter.portal").info(
        "portal.started", listen=f"{portal.address}:{server.port}", tls=portal.tls, result="ok"
    )
    return server


async def serve(path: Path, config: Config, worker: int | None = None) -> int:
    """Run on the main asyncio loop until SIGTERM/SIGINT; SIGHUP reloads the config.

    Tells systemd READY=1 once listening, RELOADING=1 then READY=1 around a reload,
    STOPPING=1 when the drain starts, and pings its watchdog when WatchdogSec is set.
    With listen.processes > 1 this process supervises that many workers instead
    (mailmeter/workers.py); `worker` is set in each of them. Returns the exit status.
    """
    if worker is None and config.processes > 1:
        return await supervise(path, config)
    log = structlog.get_logger("mailmeter")
    notifier = Notifier()
    config = worker_config(config, worker or 0)
    loop = asyncio.get_running_loop()
    # A SIGHUP while the node starts (a reload right after start-up) is kept and applied once
    # it serves, never the signal's default action, which would end the process.
    early_hups: list[int] = []
    loop.add_signal_handler(signal.SIGHUP, lambda: early_hups.append(1))
    try:
        relay = build_relay(config, primary=not worker)
        await relay.start()
    except (StartupError, ConfigError) as error:
        report_startup_failure(notifier, str(error), worker, config.node.name)
        return EXIT_STARTUP
    except (StoreUnavailable, OSError) as error:  # the database or the disk failed while recovering
        report_startup_failure(
            notifier,
            f"could not recover the spool and the meter's holds ({error});"
            " fix the cause and start again: nothing was lost",
            worker,
            config.node.name,
        )
        return EXIT_STARTUP
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    reloading: set[asyncio.Task[None]] = set()

    async def reload() -> None:
        notifier.notify("RELOADING=1")
        try:
            new = worker_config(load_config(path), worker or 0)
            await relay.reload(new)
            configure_logging(new.log.level)  # log.level: from the line after config.reloaded
        except ConfigError as error:
            log.error("config.reload_refused", config=str(path), error=str(error), result="kept the running config")
        except Exception as error:  # e.g. the database is down: keep serving on the old config
            log.error("config.reload_refused", config=str(path), error=repr(error), result="kept the running config")
        notifier.notify("READY=1", "STATUS=serving")

    def on_hup() -> None:
        task = asyncio.create_task(reload())
        reloading.add(task)
        task.add_done_callback(reloading.discard)

    def on_usr1() -> None:  # the operator lifts every AUTH lockout of this process
        lifted = relay.context.auth_guard.clear()
        log.info("smtp.auth_lockouts_cleared", node=config.node.name, lockouts=lifted, result="ok")

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    loop.add_signal_handler(signal.SIGUSR1, on_usr1)
    if early_hups:
        on_hup()
    watchdog = asyncio.create_task(notifier.watchdog())
    # Everything built so far (modules, config, plans) lives as long as the process: out of
    # the collector's sight, a full collection no longer walks it. Those walks were 25-52 ms
    # pauses of the whole relay, a few per minute under bench/run's load: its p99 after DATA.
    gc.collect()
    gc.freeze()
    notifier.notify("READY=1", f"STATUS=serving on {config.listen[0].address}:{relay.port}")
    status = 0
    try:
        stopping = asyncio.ensure_future(stop.wait())
        waiting: list[asyncio.Future[Any]] = [stopping, relay.fatal]
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if relay.fatal.done():
            log.error("relay.stopping", node=config.node.name, reason=relay.fatal.result(), result="exit 1")
            status = 1
        relay.begin_drain()
        notifier.notify("STOPPING=1", "STATUS=draining")
        log.info("relay.draining", node=config.node.name)
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        loop.remove_signal_handler(signal.SIGUSR1)
        await relay.stop()
        watchdog.cancel()
        await asyncio.gather(watchdog, return_exceptions=True)
    return status


def report_startup_failure(notifier: Notifier, message: str, worker: int | None, node: str) -> None:
    """One line: on stderr for the operator (and systemd's STATUS=), or, in a worker of
    listen.processes, to the supervisor, which prints it once for all (mailmeter/workers.py)."""
    if worker is not None and notifier.enabled:
        notifier.notify(f"{STARTUP_FAILED}worker {worker} (node {node}): {message}")
        return
    notifier.notify(f"STATUS=could not start: {message}")
    print(f"mailmeter: {message}", file=sys.stderr, flush=True)
