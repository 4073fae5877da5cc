"""One relay node: the meter, spool, delivery, SMTP server and billing job built from a Config,
started and stopped in order.

No HTTP here: the composition root (mailmeter/serve.py) adds the admin API through `start_api`.

Start order matters for the no-loss promise: the meter opens and releases the
holds this node left behind; the spool's incoming files are settled against the
meter (committed -> active, otherwise deleted); delivery resumes the active
queue; only then does the SMTP port open.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from mailmeter.config import Config, ConfigError, ListenConfig, database_label
from mailmeter.control import ControlServer
from mailmeter.events import EventSender, EventSettings
from mailmeter.factory import build_billing, open_meter
from mailmeter.metering.billing import Billing
from mailmeter.metering.meter import Meter
from mailmeter.metering.records import NodeClaimed, StoreUnavailable
from mailmeter.metering.store import Store
from mailmeter.metrics import Metrics
from mailmeter.notices import NoticeSender
from mailmeter.relay.abuse import AuthLimits
from mailmeter.relay.delivery import Delivery, RetryPolicy, UpstreamConfig
from mailmeter.relay.smtpd import Listener, RelayContext, RelaySMTP, SmtpSettings, is_loopback
from mailmeter.relay.spool import Spool, SpoolBusy
from mailmeter.relay.upstreams import UpstreamStatus, read_health_file
from mailmeter.reloading import restart_section, split_changes
from mailmeter.startup import (
    bind_api,
    cannot_listen,
    database_unusable,
    node_claimed,
    owner_label,
    spool_busy,
    spool_unusable,
)


class ApiHandle(Protocol):
    """A running admin HTTP API, as the node stops it (mailmeter/api.py's ApiServer)."""

    @property
    def port(self) -> int: ...
    async def stop(self) -> None: ...


# Serves the admin API of a started node on its bound socket (mailmeter/serve.py's start_api).
StartApi = Callable[["Relay", socket.socket], Awaitable[ApiHandle]]


def upstreams_of(config: Config) -> tuple[UpstreamConfig, ...]:
    """The configured smarthosts, in the order delivery tries them."""
    return tuple(
        UpstreamConfig(
            host=upstream.host,
            port=upstream.port,
            tls=upstream.tls,
            username=upstream.username,
            password=config.upstream_password(index),
            timeout=upstream.timeout,
            verify_certificate=upstream.verify_certificate,
        )
        for index, upstream in enumerate(config.upstream)
    )


def upstream_health(config: Config) -> list[UpstreamStatus]:
    """Each configured smarthost's health as the node's running processes last wrote it
    (SPOOL/upstream-health.json, and SPOOL/worker-I/ with listen.processes), for
    `mailmeter queue list` and other processes than the relay's. Several processes are
    merged: down if one of them skips it now, failures summed, the latest error and change.
    A smarthost no process has written about yet shows up with no failures."""
    spool = config.resolve(config.spool.path)
    roots = [spool] + [spool / f"worker-{worker}" for worker in range(1, config.processes)]
    seen: dict[str, list[UpstreamStatus]] = {}
    for root in roots:
        for status in read_health_file(root):
            seen.setdefault(status.upstream, []).append(status)
    merged = []
    for position, upstream in enumerate(config.upstream, start=1):
        label = f"{upstream.host}:{upstream.port}"
        views = seen.get(label, [])
        latest = max(views, key=lambda view: view.last_change, default=None)
        merged.append(
            UpstreamStatus(
                upstream=label,
                position=position,
                up=all(view.up for view in views),
                down_until=max((view.down_until for view in views if not view.up), default=0.0),
                failures=sum(view.failures for view in views),
                consecutive_failures=max((view.consecutive_failures for view in views), default=0),
                last_error=latest.last_error if latest is not None else "",
                last_change=latest.last_change if latest is not None else 0.0,
                delivered_attempts=sum(view.delivered_attempts for view in views),
            )
        )
    return merged


def retry_of(config: Config) -> RetryPolicy:
    return RetryPolicy(
        first_delay=config.delivery.retry_first_delay,
        factor=config.delivery.retry_factor,
        max_delay=config.delivery.retry_max_delay,
        max_age=config.delivery.max_age,
    )


def smtp_settings(config: Config, listen_address: str | None = None, tls: ssl.SSLContext | None = None) -> SmtpSettings:
    """The SMTP-in settings of a config. Plaintext AUTH, when allowed, applies to each
    loopback listener of mode smtp (listener_of); `listen_address` is not used any more."""
    return SmtpSettings(
        hostname=config.hostname,
        message_size_limit=config.limits.message_size,
        recipients_per_message=config.limits.recipients_per_message,
        tls_context=tls if tls is not None else tls_context(config),
        plaintext_auth=config.auth.allow_plaintext_on_loopback,
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


def notices_of(config: Config, store: Store, spool: Spool, delivery: Delivery) -> NoticeSender:
    """The sender of account notices (usage alerts, invoices), as `billing.notices` says."""
    notices_config = config.billing.notices
    return NoticeSender(
        store,
        spool,
        delivery.submit,
        from_address=notices_config.from_address or f"billing@{config.hostname}",
        webhook_url=notices_config.webhook_url,
        webhook_secret=config.read_secret("billing.notices.webhook_secret_file", notices_config.webhook_secret_file),
    )


def listener_of(listen: ListenConfig) -> Listener:
    """How the sessions of one configured listener behave (relay/smtpd.py)."""
    return Listener(mode=listen.mode, auth=listen.auth, loopback=is_loopback(listen.address), name=listen.label())


def tls_context(config: Config) -> ssl.SSLContext | None:
    if config.tls.certificate is None or config.tls.key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    certificate, key = config.resolve(config.tls.certificate), config.resolve(config.tls.key)
    try:
        context.load_cert_chain(certificate, key)
    except (ssl.SSLError, OSError) as error:
        raise ConfigError(
            f"tls: cannot load the certificate {certificate} with the key {key}"
            f" ({getattr(error, 'strerror', None) or error}); give a PEM certificate chain and"
            " its private key"
        ) from None
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
    server: asyncio.Server | None = None  # the first listener's
    servers: list[asyncio.Server] = field(default_factory=list)  # every listener's, in config order
    billing_task: asyncio.Task[None] | None = None
    events_task: asyncio.Task[None] | None = None  # sends account events to their webhooks
    lease_task: asyncio.Task[None] | None = None  # gives back unused lease emails (PostgreSQL, leasing on)
    metrics: Metrics = field(default_factory=Metrics)  # served at the admin API's GET /metrics
    api: ApiHandle | None = None  # the admin HTTP API, when api.enabled
    start_api: StartApi | None = None  # how the composition root serves it (None: this node has no HTTP side)
    portal: ApiHandle | None = None  # the account holders' pages, when portal.enabled (mailmeter/portal/)
    start_portal: StartApi | None = None  # how the composition root serves them
    primary: bool = True  # runs the billing job and the API (worker 0 of listen.processes)
    claim_task: asyncio.Task[None] | None = None  # keeps the node-name claim (PostgreSQL)
    fatal: asyncio.Future[str] = field(default_factory=lambda: asyncio.get_event_loop().create_future())
    implicit_tls: ssl.SSLContext | None = (
        None  # the smtps listeners' context (a reload loads a new certificate into it)
    )
    _api_socket: socket.socket | None = None  # bound at start, served once the spool is settled
    control: ControlServer | None = None  # SPOOL/control: `mailmeter queue` (mailmeter/control.py)
    _portal_socket: socket.socket | None = None  # likewise for the portal

    @classmethod
    def build(
        cls,
        config: Config,
        primary: bool = True,
        start_api: StartApi | None = None,
        start_portal: StartApi | None = None,
    ) -> Relay:
        store, meter = open_meter(config)
        spool = Spool(config.resolve(config.spool.path))
        # The inline spool: only where the meter can keep messages (SQLite); PostgreSQL nodes
        # keep every message in their file spool, whatever spool.inline says. Delivery reads
        # the store's messages whenever it can hold some, so those a run with spool.inline
        # on left behind are delivered after it is switched off.
        inline = config.spool.inline and config.spool.inline_max_bytes > 0 and meter.inline_spool
        delivery = Delivery(
            spool=spool,
            results=meter,
            upstream=upstreams_of(config),
            retry=retry_of(config),
            hostname=config.hostname,
            workers=config.delivery.workers,
            upstream_down_seconds=config.delivery.upstream_down_seconds,
            inline=meter if meter.inline_spool else None,
        )
        settings = smtp_settings(config)
        metrics = Metrics()
        delivery.observer = metrics
        context = RelayContext(
            settings=settings,
            meter=meter,
            spool=spool,
            on_accepted=delivery.submit,
            observer=metrics,
            inline_max_bytes=config.spool.inline_max_bytes if inline else 0,
            on_accepted_inline=delivery.submit_inline if inline else None,
        )
        metrics.watch_queue(lambda: delivery.queue_depth, delivery.oldest_age)
        metrics.watch_leases(lambda: meter.leases)
        metrics.watch_upstreams(delivery.health.snapshot)
        notices = notices_of(config, store, spool, delivery)
        return cls(
            config,
            store,
            meter,
            spool,
            delivery,
            context,
            build_billing(config, meter),
            notices,
            metrics=metrics,
            primary=primary,
            start_api=start_api,
            start_portal=start_portal,
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
            listen=f"{self.config.listen[0].address}:{self.port}",
            listeners=[
                listen.model_copy(update={"port": port}).label() for listen, port in zip(self.config.listen, self.ports)
            ],
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
        await self._bind_listeners()
        if config.api.enabled and self.primary and self.start_api is not None:
            try:
                self._api_socket = bind_api(config.api.address, config.api.port)
            except OSError as error:
                raise cannot_listen("api", config.api.address, config.api.port, error) from None
        if config.portal.enabled and self.primary and self.start_portal is not None:
            try:
                self._portal_socket = bind_api(config.portal.address, config.portal.port)
            except OSError as error:
                raise cannot_listen("portal", config.portal.address, config.portal.port, error) from None
        # Alone on this spool and node name: what the last run of this node left is ours.
        released = await self.meter.release_abandoned_holds()
        activated, dropped = await self.settle_incoming()
        await self.delivery.start()
        control = ControlServer(self.delivery, root)
        try:
            await control.start()
        except OSError as error:
            raise spool_unusable(root, error) from None
        self.control = control
        for server in self.servers:
            await server.start_serving()
        if claim is not None:
            self.claim_task = asyncio.create_task(claim.keep(self._claim_lost))
        if self.primary:
            self.billing_task = asyncio.create_task(self._billing_loop())
            self.events_task = asyncio.create_task(self._events_loop())
        if self.meter.leases is not None:
            self.lease_task = asyncio.create_task(self._lease_loop(self.meter.leases.settings.seconds))
        if self._api_socket is not None and self.start_api is not None:
            api_socket, self._api_socket = self._api_socket, None
            self.api = await self.start_api(self, api_socket)
        if self._portal_socket is not None and self.start_portal is not None:
            portal_socket, self._portal_socket = self._portal_socket, None
            self.portal = await self.start_portal(self, portal_socket)
        return released, activated, dropped

    async def _bind_listeners(self) -> None:
        """Bind every listener (accepting only once the spool is settled: start_serving)."""
        config = self.config
        loop = asyncio.get_running_loop()
        several = len(config.listen) > 1
        for index, listen in enumerate(config.listen):
            listener = listener_of(listen)
            ssl_context = None
            if listen.mode == "smtps":
                if self.implicit_tls is None:
                    self.implicit_tls = tls_context(config)
                ssl_context = self.implicit_tls

            def session(listener: Listener = listener) -> RelaySMTP:
                return RelaySMTP(self.context, listener)

            try:
                server = await loop.create_server(
                    session,
                    host=listen.address,
                    port=listen.port,
                    reuse_address=True,
                    reuse_port=config.processes > 1 or None,  # the workers share the port
                    ssl=ssl_context,
                    # (asyncio's default, 60 s, unless the idle timeout is shorter)
                    ssl_handshake_timeout=min(60.0, config.limits.session_timeout) if ssl_context is not None else None,
                    start_serving=False,
                )
            except OSError as error:
                key = f"listen.{index}" if several else "listen"
                raise cannot_listen(key, listen.address, listen.port, error) from None
            self.servers.append(server)
        self.server = self.servers[0]

    async def _abandon_start(self) -> None:
        """Undo a start that failed part way, in reverse order (each step may not have happened)."""
        if self._api_socket is not None:
            self._api_socket.close()
            self._api_socket = None
        if self._portal_socket is not None:
            self._portal_socket.close()
            self._portal_socket = None
        if self.api is not None:
            await self.api.stop()
            self.api = None
        for server in self.servers:
            server.close()
            await server.wait_closed()
        self.servers, self.server = [], None
        for task in (self.claim_task, self.billing_task, self.lease_task, self.events_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self.claim_task = self.billing_task = self.lease_task = self.events_task = None
        if self.control is not None:
            await self.control.stop()
            self.control = None
        await self.delivery.stop()
        await self.store.close()
        self.spool.unclaim()

    def _claim_lost(self, reason: str) -> None:
        """Another process took this node's name (our claim's connection was down): stop."""
        if not self.fatal.done():
            self.fatal.set_result(reason)

    @property
    def port(self) -> int:
        """The first listener's port."""
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    @property
    def ports(self) -> list[int]:
        """Every listener's port, in config order (the bound one when the config says 0)."""
        return [int(server.sockets[0].getsockname()[1]) for server in self.servers]

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

        Every key takes effect (new sessions, the next delivery attempt, the next billing
        pass, the admin API restarted on its new address with its tokens read again)
        except those mailmeter/reloading.py lists, which need a restart: they are kept
        as they are and named in the log line (`needs_restart`). Accounts live in the
        database and are always current. Raises ConfigError (and changes nothing) if the
        new config cannot be applied.
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
        notices = notices_of(config, self.store, self.spool, self.delivery)
        applied, fixed = split_changes(self.config, config)
        api_socket = self._bind_new_api(config)  # before anything changes: a port in use refuses the reload
        self.meter.plans = plans
        if self.implicit_tls is not None and config.tls.certificate is not None and config.tls.key is not None:
            # smtps listeners: new handshakes use the new certificate (new_tls proved it loads)
            self.implicit_tls.load_cert_chain(config.resolve(config.tls.certificate), config.resolve(config.tls.key))
        self.context.reconfigure(smtp_settings(config, tls=new_tls))
        self.delivery.reconfigure(upstreams_of(config), retry_of(config), config.delivery.upstream_down_seconds)
        self.delivery.hostname = config.hostname
        self.billing = build_billing(config, self.meter)
        self.notices = notices
        self.config = restart_section(config, self.config)
        await self._restart_api(api_socket)
        log.info("config.reloaded", plans=len(plans), result="applied", changed=applied, needs_restart=fixed)

    def _bind_new_api(self, config: Config) -> socket.socket | None:
        """The new API socket when the API moves to another address or port (or is turned on);
        ConfigError (api) if it cannot listen there. None: nothing to bind ahead."""
        api = config.api
        if not (self.primary and self.start_api is not None and api.enabled):
            return None
        running = self.api is not None and (self.config.api.address, self.config.api.port) == (api.address, api.port)
        if running and api.port != 0:
            return None  # the same address: rebound once the running API has stopped
        try:
            return bind_api(api.address, api.port)
        except OSError as error:
            raise ConfigError(str(cannot_listen("api", api.address, api.port, error))) from None

    async def _restart_api(self, bound: socket.socket | None) -> None:
        """Serve the admin API as self.config.api says: stopped, or started again (tokens read anew)."""
        if not self.primary or self.start_api is None:
            return
        if self.api is not None:
            await self.api.stop()
            self.api = None
            if not self.config.api.enabled:
                structlog.get_logger("mailmeter.api").info("api.stopped", result="api.enabled is false")
        if not self.config.api.enabled:
            return
        api = self.config.api
        try:
            sock = bound if bound is not None else bind_api(api.address, api.port)
        except OSError as error:  # the port it just left was taken meanwhile
            structlog.get_logger("mailmeter.api").error(
                "api.stopped", error=str(cannot_listen("api", api.address, api.port, error)), result="error"
            )
            return
        self.api = await self.start_api(self, sock)

    async def billing_pass(self) -> None:
        """One pass of the billing job: close periods, queue statements, collect charges, send notices."""
        run = await self.billing.run_once()
        self.metrics.charges_result(run.charges_collected, run.charges_failed, run.charges_recorded)
        await self.notices.send_pending()
        if run.invoices or run.charges_collected or run.charges_failed or run.charges_recorded or run.statements:
            structlog.get_logger("mailmeter.billing").info(
                "billing.pass",
                invoices=len(run.invoices),
                charges_collected=run.charges_collected,
                charges_failed=run.charges_failed,
                charges_recorded=run.charges_recorded,
                statements=run.statements,
                result="ok",
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

    def event_sender(self) -> EventSender:
        """The webhook sender with the config's current retry settings (a reload applies at the next pass)."""
        events = self.config.events
        settings = EventSettings(
            max_attempts=events.max_attempts,
            first_delay=events.first_delay,
            max_delay=events.max_delay,
            timeout=events.timeout,
            keep_days=events.keep_days,
        )
        return EventSender(self.store, settings, self.meter.clock)

    async def _events_loop(self) -> None:
        log = structlog.get_logger("mailmeter.events")
        last_prune = 0.0
        while True:
            try:
                sender = self.event_sender()
                await sender.send_due()
                if time.monotonic() - last_prune > 3600:  # hourly: old delivered and failed events go
                    last_prune = time.monotonic()
                    pruned = await sender.prune()
                    if pruned:
                        log.info("events.pruned", events=pruned, result="ok")
            except Exception as error:  # noqa: BLE001 (the store may be down: try again next pass)
                log.error("events.pass", result="error", error=repr(error))
            await asyncio.sleep(self.config.events.interval)

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
        for server in self.servers:
            server.close()
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
        for server in self.servers:
            await server.wait_closed()
        self.servers, self.server = [], None

    async def stop(self) -> None:
        await self.drain()  # first: SMTP clients learn at once to retry elsewhere or later
        if self.api is not None:  # no admin change may start against a closing store
            await self.api.stop()
            self.api = None
        if self.portal is not None:  # nor an account holder's
            await self.portal.stop()
            self.portal = None
        if self.billing_task is not None:
            self.billing_task.cancel()
            await asyncio.gather(self.billing_task, return_exceptions=True)
            self.billing_task = None
        if self.events_task is not None:
            self.events_task.cancel()
            await asyncio.gather(self.events_task, return_exceptions=True)
            self.events_task = None
        if self.context.background:
            await asyncio.gather(*list(self.context.background), return_exceptions=True)
        if self.lease_task is not None:
            self.lease_task.cancel()
            await asyncio.gather(self.lease_task, return_exceptions=True)
            self.lease_task = None
        if self.control is not None:
            await self.control.stop()
            self.control = None
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
