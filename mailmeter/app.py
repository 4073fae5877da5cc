"""Wiring: build the meter, spool, delivery and SMTP server from a Config and run them.

Start order matters for the no-loss promise: the meter opens and releases the
holds this node left behind; the spool's incoming files are settled against the
meter (committed -> active, otherwise deleted); delivery resumes the active
queue; only then does the SMTP port open.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass

import structlog

from mailmeter.config import Config
from mailmeter.notices import NoticeSender
from metering.billing import Billing
from metering.gateway import NoGateway, PaymentGateway, WebhookGateway
from metering.meter import Meter
from metering.sqlite_store import SqliteStore
from relay.delivery import Delivery, RetryPolicy, UpstreamConfig
from relay.smtpd import RelayContext, RelaySMTP, SmtpSettings, is_loopback
from relay.spool import Spool


def open_meter(config: Config) -> tuple[SqliteStore, Meter]:
    store = SqliteStore(config.resolve(config.database.path))
    return store, Meter(store, config.parsed_plans(), node=config.node.name, region=config.node.region)


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
        currency=config.billing.currency,
        retry_first_delay=config.billing.charge_retry_first_delay,
        retry_max_delay=config.billing.charge_retry_max_delay,
    )


def tls_context(config: Config) -> ssl.SSLContext | None:
    if config.tls.certificate is None or config.tls.key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.resolve(config.tls.certificate), config.resolve(config.tls.key))
    return context


@dataclass
class Relay:
    """One running relay node."""

    config: Config
    store: SqliteStore
    meter: Meter
    spool: Spool
    delivery: Delivery
    context: RelayContext
    billing: Billing
    notices: NoticeSender
    server: asyncio.Server | None = None
    billing_task: asyncio.Task[None] | None = None

    @classmethod
    def build(cls, config: Config) -> Relay:
        store, meter = open_meter(config)
        spool = Spool(config.resolve(config.spool.path))
        upstream = config.upstream
        delivery = Delivery(
            spool=spool,
            results=meter,
            upstream=UpstreamConfig(
                host=upstream.host,
                port=upstream.port,
                tls=upstream.tls,
                username=upstream.username,
                password=config.upstream_password(),
                timeout=upstream.timeout,
                verify_certificate=upstream.verify_certificate,
            ),
            retry=RetryPolicy(
                first_delay=config.delivery.retry_first_delay,
                factor=config.delivery.retry_factor,
                max_delay=config.delivery.retry_max_delay,
                max_age=config.delivery.max_age,
            ),
            hostname=config.hostname,
            workers=config.delivery.workers,
        )
        settings = SmtpSettings(
            hostname=config.hostname,
            message_size_limit=config.limits.message_size,
            recipients_per_message=config.limits.recipients_per_message,
            tls_context=tls_context(config),
            plaintext_auth=config.auth.allow_plaintext_on_loopback and is_loopback(config.listen.address),
            timeout=config.limits.session_timeout,
        )
        context = RelayContext(settings=settings, meter=meter, spool=spool, on_accepted=delivery.submit)
        notices_config = config.billing.notices
        notices = NoticeSender(
            store,
            spool,
            delivery.submit,
            from_address=notices_config.from_address or f"billing@{config.hostname}",
            webhook_url=notices_config.webhook_url,
            webhook_secret=config.read_secret("billing.notices.webhook_secret_file", notices_config.webhook_secret_file),
        )
        return cls(config, store, meter, spool, delivery, context, build_billing(config, meter), notices)

    async def start(self) -> None:
        log = structlog.get_logger("mailmeter")
        await self.store.open()
        released = await self.meter.release_abandoned_holds()
        await asyncio.to_thread(self.spool.open)
        activated, dropped = await self.settle_incoming()
        await self.delivery.start()
        self.server = await asyncio.get_running_loop().create_server(
            lambda: RelaySMTP(self.context),
            host=self.config.listen.address,
            port=self.config.listen.port,
            reuse_address=True,
        )
        self.billing_task = asyncio.create_task(self._billing_loop())
        log.info(
            "relay.started",
            listen=f"{self.config.listen.address}:{self.port}",
            node=self.config.node.name,
            holds_released=released,
            incoming_activated=activated,
            incoming_dropped=dropped,
            queue_depth=self.delivery.queue_depth,
        )

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

    async def billing_pass(self) -> None:
        """One pass of the billing job: close periods, queue statements, collect charges, send notices."""
        run = await self.billing.run_once()
        await self.notices.send_pending()
        if run.invoices or run.charges_collected or run.charges_failed or run.statements:
            structlog.get_logger("mailmeter.billing").info(
                "billing.pass", invoices=len(run.invoices), charges_collected=run.charges_collected,
                charges_failed=run.charges_failed, statements=run.statements, result="ok",
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

    async def stop(self) -> None:
        if self.billing_task is not None:
            self.billing_task.cancel()
            await asyncio.gather(self.billing_task, return_exceptions=True)
            self.billing_task = None
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        if self.context.background:
            await asyncio.gather(*list(self.context.background), return_exceptions=True)
        await self.delivery.stop()
        await self.store.close()
        structlog.get_logger("mailmeter").info("relay.stopped", node=self.config.node.name)


async def serve(config: Config) -> None:
    """Run until SIGINT/SIGTERM on the main asyncio loop."""
    import signal

    relay = Relay.build(config)
    await relay.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await relay.stop()
