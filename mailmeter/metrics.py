"""Prometheus metrics of one relay node, in their own registry (no process-global state).

Components get the `Metrics` object they update; the admin API serves
`render()` at /metrics. Gauges that are cheaper to read than to keep in step
(queue depth, oldest message age, leases) are computed when scraped.

Per-account series are bounded: the first ACCOUNT_LABELS accounts this process sees get a
label of their own, every later one is counted under `account="other"` (a Prometheus
series per account of a large relay would swamp the server). docs/operating.md lists them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from mailmeter.metering.leases import LeaseBook
from mailmeter.relay.upstreams import UpstreamStatus

CONTENT_TYPE = CONTENT_TYPE_LATEST
ACCOUNT_LABELS = 100  # accounts with series of their own; the rest are account="other"
OTHER = "other"
# The commands a refusal is counted under; anything else (a bogus verb) is "other".
COMMANDS = frozenset({"-", "HELO", "EHLO", "STARTTLS", "AUTH", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "VRFY"})


@dataclass
class BoundedLabels:
    """At most `limit` distinct label values; later ones are `other`."""

    limit: int = ACCOUNT_LABELS
    seen: set[str] = field(default_factory=set)

    def __call__(self, value: str) -> str:
        if value in self.seen:
            return value
        if len(self.seen) < self.limit and value != OTHER:
            self.seen.add(value)
            return value
        return OTHER


@dataclass(eq=False)  # the registry keys collectors by identity
class LeaseCollector(Collector):
    """The node's allowance leases (PostgreSQL, metering/leases.py), read when scraped."""

    book: Callable[[], LeaseBook | None]

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        book = self.book()
        if book is None:
            return
        leases = book.leases()
        yield GaugeMetricFamily("mailmeter_leases_open", "Allowance leases this node holds", value=len(leases))
        emails = GaugeMetricFamily(
            "mailmeter_lease_emails",
            "Emails of this node's leases: free (borrowed) or carved (held by sessions)",
            labels=["state"],
        )
        emails.add_metric(["free"], sum(lease.free for lease in leases))
        emails.add_metric(["carved"], sum(lease.carved for lease in leases))
        yield emails
        yield CounterMetricFamily(
            "mailmeter_lease_renewals", "Lease transactions (borrow, renew) this node made", value=book.renewals
        )


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
        self.refusals = Counter(
            "mailmeter_smtp_refused_total",
            "SMTP commands refused (4xx or 5xx), by command and reply code; command '-': before a whole command",
            ["command", "code"],
            registry=r,
        )
        self.auths = Counter(
            "mailmeter_smtp_auth_total", "AUTH attempts by result: ok, failed, locked, tempfail", ["result"], registry=r
        )
        self.auth_lockouts = Counter(
            "mailmeter_smtp_auth_lockouts_total", "AUTH lockouts begun, of a client or a login", ["scope"], registry=r
        )
        self.account_accepted = Counter(
            "mailmeter_account_recipients_accepted_total",
            f"Recipients accepted with a 250, per account (the first {ACCOUNT_LABELS}; then account=other)",
            ["account"],
            registry=r,
        )
        self.account_refused = Counter(
            "mailmeter_account_refused_total",
            f"Commands refused (4xx, 5xx) in sessions of an account, per account (the first {ACCOUNT_LABELS};"
            " then account=other) and command",
            ["account", "command"],
            registry=r,
        )
        self.account_label = BoundedLabels()
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

    def accepted(self, recipients: int, account: str | None = None) -> None:
        self.emails_accepted.inc(recipients)
        if account is not None:
            self.account_accepted.labels(account=self.account_label(account)).inc(recipients)

    def refused(self, command: str, code: str, account: str | None) -> None:
        command = command if command in COMMANDS else OTHER
        self.refusals.labels(command=command, code=code if code.isdigit() else OTHER).inc()
        if account is not None:
            self.account_refused.labels(account=self.account_label(account), command=command).inc()

    def auth(self, result: str) -> None:
        self.auths.labels(result=result).inc()

    def auth_lockout(self, scope: str) -> None:
        self.auth_lockouts.labels(scope=scope).inc()

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

    def watch_leases(self, book: Callable[[], LeaseBook | None]) -> None:
        """Report the node's allowance leases at scrape time (PostgreSQL with leasing)."""
        self.registry.register(LeaseCollector(book))

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
