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
from metering.meter import Meter
from metering.sqlite_store import SqliteStore
from relay.delivery import Delivery, RetryPolicy, UpstreamConfig
from relay.smtpd import RelayContext, RelaySMTP, SmtpSettings, is_loopback
from relay.spool import Spool


def open_meter(config: Config) -> tuple[SqliteStore, Meter]:
    store = SqliteStore(config.resolve(config.database.path))
    return store, Meter(store, config.parsed_plans(), node=config.node.name)


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
    server: asyncio.Server | None = None

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
        return cls(config, store, meter, spool, delivery, context)

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

    async def stop(self) -> None:
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
