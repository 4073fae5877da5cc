"""Wiring: build the meter, spool, delivery and SMTP server from a Config and run them.

Start order matters for the no-loss promise: the meter opens and releases the
holds this node left behind; the spool's incoming files are settled against the
meter (committed -> active, otherwise deleted); delivery resumes the active
queue; only then does the SMTP port open.
"""

from __future__ import annotations

import asyncio
import gc
import signal
import socket
import ssl
import sys
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from mailmeter.api import ApiServer, bind_api, start_api
from mailmeter.config import Config, ConfigError, database_label, load_config
from mailmeter.metrics import Metrics
from mailmeter.notices import NoticeSender
from mailmeter.sdnotify import Notifier
from mailmeter.startup import (
    EXIT_STARTUP,
    StartupError,
    cannot_listen,
    database_unusable,
    node_claimed,
    owner_label,
    spool_busy,
    spool_unusable,
)
from mailmeter.workers import STARTUP_FAILED, supervise, worker_config
from metering.billing import Billing
from metering.gateway import NoGateway, PaymentGateway, WebhookGateway
from metering.leases import LeaseSettings
from metering.meter import Meter
from metering.postgres import PgStore
from metering.records import NodeClaimed, StoreUnavailable
from metering.sqlite import SqliteStore
from metering.store import Store
from relay.abuse import AuthLimits
from relay.delivery import Delivery, RetryPolicy, UpstreamConfig
from relay.smtpd import RelayContext, RelaySMTP, SmtpSettings, is_loopback
from relay.spool import Spool, SpoolBusy


def open_store(config: Config) -> Store:
    """PostgreSQL when `database.url` is set (nodes share one meter), else the SQLite file."""
    if config.database.url is not None:
        return PgStore(config.database.url, pool_size=config.database.pool_size)
    return SqliteStore(config.resolve(config.database.path), busy_timeout_ms=config.database.busy_timeout_ms)


def open_meter(config: Config) -> tuple[Store, Meter]:
    store = open_store(config)
    database = config.database
    leasing = None
    if database.url is not None and database.lease_emails > 0:
        leasing = LeaseSettings(emails=database.lease_emails, seconds=database.lease_seconds)
    return store, Meter(store, config.parsed_plans(), node=config.node.name, region=config.node.region,
                        leasing=leasing)


def payment_gateway(config: Config) -> PaymentGateway:
    gateway = config.billing.gateway
    if gateway.kind == "webhook":
        assert gateway.url is not None
        secret = config.read_secret("billing.gateway.secret_file", gateway.secret_file)
        assert secret is not None
        return WebhookGateway(gateway.url, secret, timeout=gateway.timeout)
    return NoGateway()


def build_billing(config: Config, meter: Meter) -> Billing:
    return Billing(
        meter,
        payment_gateway(config),
        retry_first_delay=config.billing.charge_retry_first_delay,
        retry_max_delay=config.billing.charge_retry_max_delay,
    )


def upstream_of(config: Config) -> UpstreamConfig:
    upstream = config.upstream
    return UpstreamConfig(
        host=upstream.host,
        port=upstream.port,
        tls=upstream.tls,
        username=upstream.username,
        password=config.upstream_password(),
        timeout=upstream.timeout,
        verify_certificate=upstream.verify_certificate,
    )


def retry_of(config: Config) -> RetryPolicy:
    return RetryPolicy(
        first_delay=config.delivery.retry_first_delay,
        factor=config.delivery.retry_factor,
        max_delay=config.delivery.retry_max_delay,
        max_age=config.delivery.max_age,
    )


def smtp_settings(config: Config, listen_address: str, tls: ssl.SSLContext | None = None) -> SmtpSettings:
    """The SMTP-in settings of a config (the listen address is the one actually bound)."""
    return SmtpSettings(
        hostname=config.hostname,
        message_size_limit=config.limits.message_size,
        recipients_per_message=config.limits.recipients_per_message,
        tls_context=tls if tls is not None else tls_context(config),
        plaintext_auth=config.auth.allow_plaintext_on_loopback and is_loopback(listen_address),
        timeout=config.limits.session_timeout,
        max_session_seconds=config.limits.session_max_duration,
        bare_newlines=config.limits.bare_newlines,
        max_connections_per_client=config.abuse.max_connections_per_client,
        auth_limits=AuthLimits(
            max_failures=config.abuse.auth_max_failures,
            window=config.abuse.auth_failure_window,
            lockout=config.abuse.auth_lockout,
            delay=config.abuse.auth_failure_delay,
            delay_max=config.abuse.auth_failure_delay_max,
            checks_per_client=config.abuse.auth_checks_per_client,
            checks_in_flight=config.abuse.auth_checks_in_flight,
        ),
    )


def tls_context(config: Config) -> ssl.SSLContext | None:
    if config.tls.certificate is None or config.tls.key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    certificate, key = config.resolve(config.tls.certificate), config.resolve(config.tls.key)
    try:
        context.load_cert_chain(certificate, key)
    except (ssl.SSLError, OSError) as error:
        raise ConfigError(f"tls: cannot load the certificate {certificate} with the key {key}"
                          f" ({getattr(error, 'strerror', None) or error}); give a PEM certificate chain and"
                          " its private key") from None
    return context


@dataclass
class Relay:
    """One running relay node."""

    config: Config
    store: Store
    meter: Meter
    spool: Spool
    delivery: Delivery
    context: RelayContext
    billing: Billing
    notices: NoticeSender
    server: asyncio.Server | None = None
    billing_task: asyncio.Task[None] | None = None
    lease_task: asyncio.Task[None] | None = None  # gives back unused lease emails (PostgreSQL, leasing on)
    metrics: Metrics = field(default_factory=Metrics)  # served at the admin API's GET /metrics
    api: ApiServer | None = None  # the admin HTTP API, when api.enabled
    primary: bool = True  # runs the billing job and the API (worker 0 of listen.processes)
    claim_task: asyncio.Task[None] | None = None  # keeps the node-name claim (PostgreSQL)
    fatal: asyncio.Future[str] = field(default_factory=lambda: asyncio.get_event_loop().create_future())
    _api_socket: socket.socket | None = None  # bound at start, served once the spool is settled

    @classmethod
    def build(cls, config: Config, primary: bool = True) -> Relay:
        store, meter = open_meter(config)
        spool = Spool(config.resolve(config.spool.path))
        delivery = Delivery(
            spool=spool,
            results=meter,
            upstream=upstream_of(config),
            retry=retry_of(config),
            hostname=config.hostname,
            workers=config.delivery.workers,
        )
        settings = smtp_settings(config, config.listen.address)
        metrics = Metrics()
        delivery.observer = metrics
        context = RelayContext(
            settings=settings, meter=meter, spool=spool, on_accepted=delivery.submit, observer=metrics
        )
        metrics.watch_queue(lambda: delivery.queue_depth, delivery.oldest_age)
        notices_config = config.billing.notices
        notices = NoticeSender(
            store,
            spool,
            delivery.submit,
            from_address=notices_config.from_address or f"billing@{config.hostname}",
            webhook_url=notices_config.webhook_url,
            webhook_secret=config.read_secret("billing.notices.webhook_secret_file", notices_config.webhook_secret_file),
        )
        return cls(
            config, store, meter, spool, delivery, context, build_billing(config, meter), notices, metrics=metrics,
            primary=primary,
        )

    async def start(self) -> None:
        """Claim, bind, recover, serve; a failure before serving raises StartupError (one
        line for the operator) after undoing what was done, the spool and meter untouched."""
        try:
            released, activated, dropped = await self._start()
        except BaseException:
            await self._abandon_start()
            raise
        structlog.get_logger("mailmeter").info(
            "relay.started",
            listen=f"{self.config.listen.address}:{self.port}",
            node=self.config.node.name,
            event_loop=type(asyncio.get_running_loop()).__module__,
            holds_released=released,
            incoming_activated=activated,
            incoming_dropped=dropped,
            queue_depth=self.delivery.queue_depth,
        )

    async def _start(self) -> tuple[int, int, int]:
        """The start order. Nothing that belongs to a running node (its holds, its incoming/
        files, its active queue) is touched before this process holds the spool's lock and,
        on PostgreSQL, the claim on its node name, and owns its listening sockets."""
        config = self.config
        node = config.node.name
        owner = owner_label(node)
        root = self.spool.root
        try:
            await asyncio.to_thread(self.spool.claim, owner)
        except SpoolBusy as busy:
            raise spool_busy(root, busy.holder) from None
        except OSError as error:
            raise spool_unusable(root, error) from None
        # PostgreSQL's errors do not say where; SQLite's name the file.
        key = f"database.url {database_label(config)}" if config.database.url else "database.path"
        try:
            await self.store.open()
            claim = await self.store.claim_node(node, owner)
        except NodeClaimed as claimed:
            raise node_claimed(node, claimed.holder) from None
        except StoreUnavailable as error:
            raise database_unusable(key, str(error).removeprefix("meter store (PostgreSQL): ")) from None
        try:
            await asyncio.to_thread(self.spool.open)
        except OSError as error:
            raise spool_unusable(root, error) from None
        listen = config.listen
        try:  # bound now, accepting only once the spool is settled (start_serving below)
            self.server = await asyncio.get_running_loop().create_server(
                lambda: RelaySMTP(self.context),
                host=listen.address,
                port=listen.port,
                reuse_address=True,
                reuse_port=listen.processes > 1 or None,  # the workers share the port
                start_serving=False,
            )
        except OSError as error:
            raise cannot_listen("listen", listen.address, listen.port, error) from None
        if config.api.enabled and self.primary:
            try:
                self._api_socket = bind_api(config.api.address, config.api.port)
            except OSError as error:
                raise cannot_listen("api", config.api.address, config.api.port, error) from None
        # Alone on this spool and node name: what the last run of this node left is ours.
        released = await self.meter.release_abandoned_holds()
        activated, dropped = await self.settle_incoming()
        await self.delivery.start()
        await self.server.start_serving()
        if claim is not None:
            self.claim_task = asyncio.create_task(claim.keep(self._claim_lost))
        if self.primary:
            self.billing_task = asyncio.create_task(self._billing_loop())
        if self.meter.leases is not None:
            self.lease_task = asyncio.create_task(self._lease_loop(self.meter.leases.settings.seconds))
        if self._api_socket is not None:
            api_socket, self._api_socket = self._api_socket, None
            self.api = await start_api(self, api_socket)
        return released, activated, dropped

    async def _abandon_start(self) -> None:
        """Undo a start that failed part way, in reverse order (each step may not have happened)."""
        if self._api_socket is not None:
            self._api_socket.close()
            self._api_socket = None
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None
        for task in (self.claim_task, self.billing_task, self.lease_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self.claim_task = self.billing_task = self.lease_task = None
        await self.delivery.stop()
        await self.store.close()
        self.spool.unclaim()

    def _claim_lost(self, reason: str) -> None:
        """Another process took this node's name (our claim's connection was down): stop."""
        if not self.fatal.done():
            self.fatal.set_result(reason)

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def settle_incoming(self) -> tuple[int, int]:
        """Finish what a crash interrupted between the spool write and the 250."""
        activated = dropped = 0
        for queue_id in await asyncio.to_thread(self.spool.incoming_ids):
            if await self.meter.message_committed(queue_id):
                await asyncio.to_thread(self.spool.activate, queue_id)
                activated += 1
            else:
                await asyncio.to_thread(self.spool.discard_incoming, queue_id)
                dropped += 1
        return activated, dropped

    async def reload(self, config: Config) -> None:
        """Apply a new config to the running node without dropping a session.

        Plans, limits, TLS certificate, upstream, retry and billing settings take effect
        for new sessions and the next delivery attempt; accounts live in the database
        and are always current. The listen address, database and spool need a restart.
        Raises ConfigError (and changes nothing) if the new config cannot be applied.
        """
        log = structlog.get_logger("mailmeter")
        plans = config.parsed_plans()
        in_use = {account.plan for account in await self.store.list_accounts()}
        missing = sorted(in_use - set(plans))
        if missing:
            raise ConfigError(f"plans: accounts use plans the new config drops: {', '.join(missing)}")
        if config.currency() != self.meter.currency:
            raise ConfigError(
                f"billing.currency: the ledger holds amounts in {self.meter.currency.code}; changing the currency"
                f" to {config.currency().code} would relabel every balance, charge and invoice"
            )
        new_tls = tls_context(config)
        fixed = [
            key for key, old, new in (
                ("listen", self.config.listen, config.listen),
                ("database", self.config.database, config.database),
                ("spool", self.config.spool, config.spool),
                ("node", self.config.node, config.node),
            ) if old != new
        ]
        self.meter.plans = plans
        self.context.reconfigure(smtp_settings(config, self.config.listen.address, new_tls))
        self.delivery.reconfigure(upstream_of(config), retry_of(config))
        self.billing = build_billing(config, self.meter)
        self.config = config.model_copy(update={"listen": self.config.listen, "database": self.config.database,
                                               "spool": self.config.spool, "node": self.config.node})
        log.info("config.reloaded", plans=len(plans), result="applied", needs_restart=fixed)

    async def billing_pass(self) -> None:
        """One pass of the billing job: close periods, queue statements, collect charges, send notices."""
        run = await self.billing.run_once()
        self.metrics.charges_result(run.charges_collected, run.charges_failed, run.charges_recorded)
        await self.notices.send_pending()
        if run.invoices or run.charges_collected or run.charges_failed or run.charges_recorded or run.statements:
            structlog.get_logger("mailmeter.billing").info(
                "billing.pass", invoices=len(run.invoices), charges_collected=run.charges_collected,
                charges_failed=run.charges_failed, charges_recorded=run.charges_recorded,
                statements=run.statements, result="ok",
            )

    async def _billing_loop(self) -> None:
        log = structlog.get_logger("mailmeter.billing")
        while True:
            try:
                await self.billing_pass()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the store may be down: try again next interval
                log.error("billing.pass", result="error", error=repr(error))
            await asyncio.sleep(self.config.billing.interval)

    async def _lease_loop(self, interval: float) -> None:
        log = structlog.get_logger("mailmeter.meter")
        while True:
            await asyncio.sleep(interval)
            try:
                await self.meter.tend_leases()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the database may be down: its leases wait (or are reclaimed)
                log.error("meter.lease_upkeep", result="error", error=repr(error))

    def begin_drain(self) -> None:
        """At once: stop accepting connections and send idle sessions 421 4.3.2."""
        if self.server is not None:
            self.server.close()
        self.context.drain()

    async def drain(self, grace: float = 30.0) -> None:
        """Stop accepting; idle sessions get 421 4.3.2; DATA in flight finishes (up to `grace` s)."""
        self.begin_drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.context.busy_sessions() and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for session in list(self.context.sessions):
            session.close_for_shutdown()
        if self.server is not None:
            await self.server.wait_closed()
            self.server = None

    async def stop(self) -> None:
        await self.drain()  # first: SMTP clients learn at once to retry elsewhere or later
        if self.api is not None:  # no admin change may start against a closing store
            await self.api.stop()
            self.api = None
        if self.billing_task is not None:
            self.billing_task.cancel()
            await asyncio.gather(self.billing_task, return_exceptions=True)
            self.billing_task = None
        if self.context.background:
            await asyncio.gather(*list(self.context.background), return_exceptions=True)
        if self.lease_task is not None:
            self.lease_task.cancel()
            await asyncio.gather(self.lease_task, return_exceptions=True)
            self.lease_task = None
        await self.delivery.stop()
        await self._give_back_leases()
        if self.claim_task is not None:
            self.claim_task.cancel()
            await asyncio.gather(self.claim_task, return_exceptions=True)
            self.claim_task = None
        await self.store.close()  # and with it the node-name claim
        self.spool.unclaim()  # last: the next instance may settle this spool now
        structlog.get_logger("mailmeter").info("relay.stopped", node=self.config.node.name)

    async def _give_back_leases(self) -> None:
        """At stop, sessions are gone: every unused leased email goes back to its account now
        (if the database cannot be reached, this node's next start releases them)."""
        try:
            given = await self.meter.tend_leases(force=True)
        except Exception as error:
            structlog.get_logger("mailmeter.meter").error("meter.leases_returned", result="error", error=repr(error))
            return
        if given:
            structlog.get_logger("mailmeter.meter").info("meter.leases_returned", emails=given, result="ok")


async def serve(path: Path, config: Config, worker: int | None = None) -> int:
    """Run on the main asyncio loop until SIGTERM/SIGINT; SIGHUP reloads the config.

    Tells systemd READY=1 once listening, RELOADING=1 then READY=1 around a reload,
    STOPPING=1 when the drain starts, and pings its watchdog when WatchdogSec is set.
    With listen.processes > 1 this process supervises that many workers instead
    (mailmeter/workers.py); `worker` is set in each of them. Returns the exit status.
    """
    if worker is None and config.listen.processes > 1:
        return await supervise(path, config)
    log = structlog.get_logger("mailmeter")
    notifier = Notifier()
    config = worker_config(config, worker or 0)
    try:
        relay = Relay.build(config, primary=not worker)
        await relay.start()
    except (StartupError, ConfigError) as error:
        report_startup_failure(notifier, str(error), worker, config.node.name)
        return EXIT_STARTUP
    except (StoreUnavailable, OSError) as error:  # the database or the disk failed while recovering
        report_startup_failure(notifier, f"could not recover the spool and the meter's holds ({error});"
                                         " fix the cause and start again: nothing was lost", worker,
                               config.node.name)
        return EXIT_STARTUP
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    reloading: set[asyncio.Task[None]] = set()

    async def reload() -> None:
        notifier.notify("RELOADING=1")
        try:
            await relay.reload(worker_config(load_config(path), worker or 0))
        except ConfigError as error:
            log.error("config.reload_refused", config=str(path), error=str(error),
                      result="kept the running config")
        except Exception as error:  # e.g. the database is down: keep serving on the old config
            log.error("config.reload_refused", config=str(path), error=repr(error),
                      result="kept the running config")
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
    watchdog = asyncio.create_task(notifier.watchdog())
    # Everything built so far (modules, config, plans) lives as long as the process: out of
    # the collector's sight, a full collection no longer walks it. Those walks were 25-52 ms
    # pauses of the whole relay, a few per minute under bench/run's load: its p99 after DATA.
    gc.collect()
    gc.freeze()
    notifier.notify("READY=1", f"STATUS=serving on {config.listen.address}:{relay.port}")
    status = 0
    try:
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait([stopping, relay.fatal], return_when=asyncio.FIRST_COMPLETED)
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
