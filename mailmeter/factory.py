"""Builds the meter's parts from a Config: the store it names, the meter, the payment gateway and
the billing job. The only module that imports a store (the rest type against metering/store.py)."""

from __future__ import annotations

from mailmeter.config import Config
from mailmeter.metering.billing import Billing
from mailmeter.metering.gateway import NoGateway, PaymentGateway, WebhookGateway
from mailmeter.metering.leases import LeaseSettings
from mailmeter.metering.meter import Meter
from mailmeter.metering.postgres import PgStore
from mailmeter.metering.sqlite import SqliteStore
from mailmeter.metering.store import Store


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
    return store, Meter(store, config.parsed_plans(), node=config.node.name, region=config.node.region, leasing=leasing)


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
