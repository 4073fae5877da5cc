"""Prometheus metrics of one relay node, in their own registry (no process-global state).

Components get the `Metrics` object they update; the admin API serves
`render()` at /metrics. Gauges that are cheaper to read than to keep in step
(queue depth, oldest message age) are computed when scraped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from mailmeter.relay.upstreams import UpstreamStatus

CONTENT_TYPE = CONTENT_TYPE_LATEST


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.sessions = Counter("mailmeter_smtp_sessions_total", "SMTP sessions opened", registry=r)
        self.sessions_open = Gauge("mailmeter_smtp_sessions_open", "SMTP sessions open now", registry=r)
        self.transactions = Counter(
            "mailmeter_smtp_transactions_total",
            "SMTP transactions by reply class (2xx/4xx/5xx) and reason",
            ["reply_class", "reason"],
            registry=r,
        )
        self.emails_accepted = Counter("mailmeter_emails_accepted_total", "Recipients accepted with a 250", registry=r)
        self.delivery_results = Counter(
            "mailmeter_delivery_results_total",
            "Per-recipient delivery results: delivered, deferred, soft_bounced, hard_bounced",
            ["result"],
            registry=r,
        )
        self.meter_latency = Histogram(
            "mailmeter_meter_seconds",
            "Time of meter operations",
            ["operation"],
            buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=r,
        )
        self.charges = Counter(
            "mailmeter_charges_total",
            "Charges sent to the payment gateway, by result (recorded: no gateway)",
            ["result"],
            registry=r,
        )
        self.queue_depth = Gauge("mailmeter_queue_depth", "Messages in the spool awaiting delivery", registry=r)
        self.queue_oldest = Gauge(
            "mailmeter_queue_oldest_seconds", "Age of the oldest message in the spool", registry=r
        )

    # -- relay.observe.RelayObserver ---------------------------------------------------

    def session_opened(self) -> None:
        self.sessions.inc()
        self.sessions_open.inc()

    def session_closed(self) -> None:
        self.sessions_open.dec()

    def transaction(self, reply_class: str, reason: str) -> None:
        self.transactions.labels(reply_class=reply_class, reason=reason).inc()

    def accepted(self, recipients: int) -> None:
        self.emails_accepted.inc(recipients)

    def meter_call(self, operation: str, seconds: float) -> None:
        self.meter_latency.labels(operation=operation).observe(seconds)

    def delivery_result(self, result: str, recipients: int) -> None:
        self.delivery_results.labels(result=result).inc(recipients)

    def charges_result(self, succeeded: int, failed: int, recorded: int = 0) -> None:
        for result, count in (("succeeded", succeeded), ("failed", failed), ("recorded", recorded)):
            if count:
                self.charges.labels(result=result).inc(count)

    def watch_queue(self, depth: Callable[[], int], oldest_age: Callable[[], float]) -> None:
        """Read the spool's depth and oldest age at scrape time."""
        self.queue_depth.set_function(lambda: float(depth()))
        self.queue_oldest.set_function(oldest_age)

    def watch_upstreams(self, snapshot: Callable[[], list[UpstreamStatus]]) -> None:
        """Each upstream's health (relay/upstreams.py), read at scrape time: only the
        configured upstreams appear, so a reload that drops one drops its series."""
        self.registry.register(_UpstreamCollector(snapshot))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _UpstreamCollector(Collector):
    """mailmeter_upstream_up, _failures_total and _last_change_timestamp_seconds per upstream."""

    def __init__(self, snapshot: Callable[[], list[UpstreamStatus]]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "mailmeter_upstream_up",
            "1 while delivery tries this upstream, 0 while it is skipped after a failure",
            labels=["upstream"],
        )
        failures = CounterMetricFamily(
            "mailmeter_upstream_failures",
            "Attempts this upstream failed as a server (connection, timeout, 421, not SMTP, AUTH refused)",
            labels=["upstream"],
        )
        changed = GaugeMetricFamily(
            "mailmeter_upstream_last_change_timestamp_seconds",
            "When this upstream last went down or came back up (0: never)",
            labels=["upstream"],
        )
        for status in self.snapshot():
            up.add_metric([status.upstream], 1.0 if status.up else 0.0)
            failures.add_metric([status.upstream], float(status.failures))
            changed.add_metric([status.upstream], status.last_change)
        yield up
        yield failures
        yield changed
