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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from mailmeter.config import Config, ConfigError, database_label
from mailmeter.factory import build_billing, open_meter
from mailmeter.metering.billing import Billing
from mailmeter.metering.meter import Meter
from mailmeter.metering.records import NodeClaimed, StoreUnavailable
from mailmeter.metering.store import Store
from mailmeter.metrics import Metrics
from mailmeter.notices import NoticeSender
from mailmeter.relay.abuse import AuthLimits
from mailmeter.relay.delivery import Delivery, RetryPolicy, UpstreamConfig
from mailmeter.relay.smtpd import RelayContext, RelaySMTP, SmtpSettings, is_loopback
from mailmeter.relay.spool import Spool, SpoolBusy
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
    server: asyncio.Server | None = None
    billing_task: asyncio.Task[None] | None = None
    lease_task: asyncio.Task[None] | None = None  # gives back unused lease emails (PostgreSQL, leasing on)
    metrics: Metrics = field(default_factory=Metrics)  # served at the admin API's GET /metrics
    api: ApiHandle | None = None  # the admin HTTP API, when api.enabled
    start_api: StartApi | None = None  # how the composition root serves it (None: this node has no HTTP side)
    primary: bool = True  # runs the billing job and the API (worker 0 of listen.processes)
    claim_task: asyncio.Task[None] | None = None  # keeps the node-name claim (PostgreSQL)
    fatal: asyncio.Future[str] = field(default_factory=lambda: asyncio.get_event_loop().create_future())
    _api_socket: socket.socket | None = None  # bound at start, served once the spool is settled

    @classmethod
    def build(cls, config: Config, primary: bool = True, start_api: StartApi | None = None) -> Relay:
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
            upstream=upstream_of(config),
            retry=retry_of(config),
            hostname=config.hostname,
            workers=config.delivery.workers,
            inline=meter if meter.inline_spool else None,
        )
        settings = smtp_settings(config, config.listen.address)
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
        notices_config = config.billing.notices
        notices = NoticeSender(
            store,
            spool,
            delivery.submit,
            from_address=notices_config.from_address or f"billing@{config.hostname}",
            webhook_url=notices_config.webhook_url,
            webhook_secret=config.read_secret(
                "billing.notices.webhook_secret_file", notices_config.webhook_secret_file
            ),
        )
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
        if config.api.enabled and self.primary and self.start_api is not None:
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
        if self._api_socket is not None and self.start_api is not None:
            api_socket, self._api_socket = self._api_socket, None
            self.api = await self.start_api(self, api_socket)
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
            key
            for key, old, new in (
                ("listen", self.config.listen, config.listen),
                ("database", self.config.database, config.database),
                ("spool", self.config.spool, config.spool),
                ("node", self.config.node, config.node),
            )
            if old != new
        ]
        self.meter.plans = plans
        self.context.reconfigure(smtp_settings(config, self.config.listen.address, new_tls))
        self.delivery.reconfigure(upstream_of(config), retry_of(config))
        self.billing = build_billing(config, self.meter)
        self.config = config.model_copy(
            update={
                "listen": self.config.listen,
                "database": self.config.database,
                "spool": self.config.spool,
                "node": self.config.node,
            }
        )
        log.info("config.reloaded", plans=len(plans), result="applied", needs_restart=fixed)

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
