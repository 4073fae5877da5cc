"""Two mailmeter nodes on one PostgreSQL meter against one node on SQLite (issue 7 item 5).

Measurement only. Under the same total load (smtp-source, SESSIONS concurrent
sessions of SIZE-byte messages, MESSAGES in all; split half/half across the two
nodes), delivered/s = messages / time until smtp-sink counted all of them, for:

  (a) one `mailmeter serve` on SQLite (as bench/run's mailmeter target);
  (b) two `mailmeter serve` processes (nodes n1, n2, each its own spool) sharing
      one fresh PostgreSQL schema, created here and dropped at the end: first with
      allowance leasing off (database.lease_emails: 0, every recipient decided in the
      database), then on (--lease-emails, the config default 50).

Then the meter's reserve + commit in process against PostgreSQL (mailmeter.metering.postgres.PgStore
+ mailmeter.metering.meter.Meter, as bench/meter_latency.py does for SQLite): one caller
(p50/p99), and CONCURRENCY callers (messages/s, p50/p99), without and with leasing.
Issue 7 wants two/one >= 1.6x.

    .venv/bin/python bench/two_nodes.py [--messages 3000] [--pg-url postgresql://postgres@127.0.0.1:5432/test]

Needs smtp-sink and smtp-source (Debian's postfix package) and a PostgreSQL server.
Everything listens on 127.0.0.1; every process started is stopped and the
temporary directory deleted on exit, failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

import asyncpg  # noqa: E402
from code_under_test import module  # noqa: E402
from meter_latency import Timings, percentile_ms, reserve_commit  # noqa: E402
from services import (  # noqa: E402
    LOOPBACK,
    RECIPIENT,
    SENDER,
    SENDER_DOMAIN,
    PortAllocator,
    ProcessLedger,
    ServiceError,
    SmtpSink,
    stop_group,
)

LeaseSettings = module("metering.leases").LeaseSettings
Meter = module("metering.meter").Meter
PgStore = module("metering.postgres").PgStore
parse_plan = module("policies.plans").parse_plan

TARGET_RATIO = 1.6
DEFAULT_PG_URL = os.environ.get("MAILMETER_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


def with_search_path(url: str, schema: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}search_path={schema}"


# -- a mailmeter node -------------------------------------------------------------


@dataclass
class Node:
    """`mailmeter serve` on port 0; the port comes from its relay.started log line."""

    name: str
    root: Path
    python: str
    upstream_port: int
    database: dict[str, object]
    workers: int = 4
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    _drain: threading.Thread | None = None
    _lines: list[str] = field(default_factory=list)

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_DIR), env.get("PYTHONPATH", "")]))
        return env

    def write_config(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        config = {  # JSON is YAML
            "node": {"name": self.name, "region": self.name},
            "hostname": f"{self.name}.bench.test",
            "listen": {"address": LOOPBACK, "port": 0},
            "auth": {"allow_plaintext_on_loopback": True},
            "abuse": {"max_connections_per_client": 10_000},
            "upstream": {"host": LOOPBACK, "port": self.upstream_port, "tls": "none", "timeout": 30},
            "delivery": {"workers": self.workers},
            "database": self.database,
            "spool": {"path": "spool"},
            "log": {"level": "info"},
            "plans": {"bench": {"email_quota": 1_000_000_000}},
        }
        self.config.write_text(json.dumps(config, indent=2))

    def cli(self, *args: str, timeout: float = 60) -> None:
        argv = [self.python, "-m", "mailmeter.cli", "--config", str(self.config), *args]
        done = subprocess.run(
            argv, check=False, cwd=self.root, env=self.env(), capture_output=True, text=True, timeout=timeout
        )
        if done.returncode != 0:
            raise ServiceError(f"mailmeter {' '.join(args)} failed: {(done.stderr or done.stdout).strip()[-800:]}")

    def start(self, ledger: ProcessLedger) -> None:
        argv = [self.python, "-m", "mailmeter.cli", "serve", "--config", str(self.config)]
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=self.root,
            env=self.env(),
            start_new_session=True,
        )
        ledger.record_group(self.process.pid)
        assert self.process.stderr is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            raw = self.process.stderr.readline()
            if not raw:
                raise ServiceError(f"{self.name} exited during start-up: {''.join(self._lines[-10:])}")
            line = raw.decode(errors="replace")
            self._lines.append(line)
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("event") == "relay.started":
                self.port = int(str(record["listen"]).rsplit(":", 1)[1])
                break
        else:
            raise ServiceError(f"{self.name}: no relay.started within 60 s")
        self._drain = threading.Thread(target=self._drain_stderr, name=f"drain-{self.name}", daemon=True)
        self._drain.start()

    def _drain_stderr(self) -> None:
        """Keep the pipe flowing (a full pipe would block the relay); the log goes to a file."""
        assert self.process is not None and self.process.stderr is not None
        with open(self.root / "serve.log", "ab") as log:
            for chunk in iter(lambda: self.process.stderr.read1(65536), b""):  # type: ignore[union-attr]
                log.write(chunk)

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise ServiceError(f"{self.name} exited with status {self.process.returncode}")

    def stop(self) -> None:
        if self.process is not None:
            stop_group(self.process, signal.SIGTERM, grace=20)
        if self._drain is not None:
            self._drain.join(5)


# -- load and delivery ----------------------------------------------------------------


def smtp_source(port: int, sessions: int, size: int, messages: int, timeout: float) -> subprocess.Popen[str]:
    argv = [
        "smtp-source",
        "-s",
        str(sessions),
        "-l",
        str(size),
        "-m",
        str(messages),
        "-M",
        "client.bench.test",
        "-f",
        SENDER,
        "-t",
        RECIPIENT,
        f"{LOOPBACK}:{port}",
    ]
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat's first line."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of one process and its waited-for children, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(value) for value in fields[11:15]) / os.sysconf("SC_CLK_TCK")


@dataclass
class Pass:
    label: str
    messages: int
    accept_seconds: float = 0.0
    deliver_seconds: float | None = None
    delivered: int = 0
    machine_busy: float = 0.0  # share of all CPUs busy during the pass (0..1)
    relay_cpu_ms: float = 0.0  # mailmeter processes' CPU per message

    @property
    def other_cpu_ms(self) -> float:
        """CPU per message of everything else on the machine (PostgreSQL, smtp-source, smtp-sink)."""
        if not self.deliver_seconds:
            return 0.0
        total_ms = self.machine_busy * (os.cpu_count() or 1) * self.deliver_seconds * 1000 / self.messages
        return total_ms - self.relay_cpu_ms

    @property
    def delivered_per_s(self) -> float | None:
        return self.messages / self.deliver_seconds if self.deliver_seconds else None


def drive(
    label: str, nodes: list[Node], sink: SmtpSink, messages: int, sessions: int, size: int, timeout: float
) -> Pass:
    """Split sessions and messages evenly over the nodes; time acceptance and delivery."""
    result = Pass(label, messages)
    base = sink.count
    shares = [messages // len(nodes) + (1 if i < messages % len(nodes) else 0) for i in range(len(nodes))]
    per_node_sessions = max(1, sessions // len(nodes))
    busy_before, total_before = cpu_ticks()
    relay_before = sum(process_cpu_seconds(node.process.pid) for node in nodes if node.process is not None)
    started = time.monotonic()
    sources = [
        smtp_source(node.port, per_node_sessions, size, share, timeout)
        for node, share in zip(nodes, shares, strict=True)
    ]
    for source in sources:
        try:
            _, err = source.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            source.kill()
            source.wait()
            raise ServiceError("smtp-source timed out") from None
        if source.returncode != 0:
            raise ServiceError(f"smtp-source failed ({source.returncode}): {err.strip()[-500:]}")
    result.accept_seconds = time.monotonic() - started
    for node in nodes:
        node.check_alive()
    arrived = sink.wait_for(base + messages, timeout)
    result.delivered = sink.count - base
    if arrived is not None:
        result.deliver_seconds = arrived - started
    busy_after, total_after = cpu_ticks()
    result.machine_busy = (busy_after - busy_before) / max(total_after - total_before, 1)
    relay_after = sum(process_cpu_seconds(node.process.pid) for node in nodes if node.process is not None)
    result.relay_cpu_ms = (relay_after - relay_before) * 1000 / messages
    return result


# -- the meter in process on PostgreSQL ---------------------------------------------------


@dataclass
class MeterFigures:
    alone: Timings
    together: Timings
    together_wall: float
    iterations: int
    callers: int


async def meter_on_pg(
    url: str, schema: str, iterations: int, warmup: int, callers: int, lease_emails: int
) -> MeterFigures:
    store = PgStore(url, pool_size=max(10, callers), server_settings={"search_path": schema})
    plans = {"bench": parse_plan("bench", {"email_quota": 1_000_000_000})}
    leasing = LeaseSettings(emails=lease_emails) if lease_emails else None
    meter = Meter(store, plans, node="meterbench", leasing=leasing)
    await store.open()
    try:
        await meter.add_account("bench", None, "bench", [SENDER_DOMAIN], ["127.0.0.0/8"])
        for number in range(warmup):
            await reserve_commit(meter, number, None)
        alone = Timings()
        for number in range(warmup, warmup + iterations):
            await reserve_commit(meter, number, alone)
        together = Timings()
        numbers = iter(range(warmup + iterations, warmup + 2 * iterations))

        async def caller() -> None:
            for number in numbers:
                await reserve_commit(meter, number, together)

        started = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(callers)))
        wall = time.perf_counter() - started
    finally:
        await store.close()
    return MeterFigures(alone, together, wall, iterations, callers)


async def create_schema(url: str, schema: str) -> None:
    conn = await asyncpg.connect(url, timeout=5)
    try:
        await conn.execute(f'CREATE SCHEMA "{schema}"')
    finally:
        await conn.close()


async def drop_schema(url: str, schema: str) -> None:
    conn = await asyncpg.connect(url, timeout=5)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


# -- main ------------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def describe(label: str, samples: list[float]) -> str:
    return (
        f"  {label:<16} p50 {percentile_ms(samples, 50):7.3f} ms   p99 {percentile_ms(samples, 99):7.3f} ms"
        f"   max {max(samples) * 1000:8.3f} ms"
    )


def run(args: argparse.Namespace, workdir: Path, schema: str, stack: list[Node], sinks: list[SmtpSink]) -> int:
    ledger = ProcessLedger(workdir)
    ports = PortAllocator(args.port_base)
    sink = SmtpSink(ledger, ports.take(), workdir / "sink.log")
    sinks.append(sink)
    sink.start()
    print(
        f"two_nodes: {args.messages} messages of {args.size} B over {args.sessions} sessions per pass; "
        f"sink on {LOOPBACK}:{sink.port}; PostgreSQL schema {schema}; {os.cpu_count()} CPUs",
        flush=True,
    )

    # (a) one node, SQLite
    single = Node("n1", workdir / "sqlite-n1", args.python, sink.port, {"path": "meter.db"}, args.workers)
    stack.append(single)
    single.write_config()
    single.cli(
        "account", "add", "bench", "--plan", "bench", "--sender-domain", SENDER_DOMAIN, "--network", "127.0.0.0/8"
    )
    single.start(ledger)
    one = drive("one node, SQLite", [single], sink, args.messages, args.sessions, args.size, args.timeout)
    single.stop()
    stack.remove(single)
    print(
        f"  one node SQLite: accepted in {one.accept_seconds:.2f} s, delivered {one.delivered} in "
        f"{fmt(one.deliver_seconds, 2)} s",
        flush=True,
    )

    # (b) two nodes, one PostgreSQL schema: every recipient decided in the database, then with leasing
    passes: dict[int, Pass] = {}
    for lease_emails in (0, args.lease_emails):
        database = {
            "url": with_search_path(args.pg_url, schema),
            "pool_size": args.pool_size,
            "lease_emails": lease_emails,
        }
        label = f"lease-{lease_emails}"
        nodes = [
            Node(name, workdir / f"pg-{label}-{name}", args.python, sink.port, database, args.workers)
            for name in ("n1", "n2")
        ]
        for node in nodes:
            node.write_config()
        if not passes:
            nodes[0].cli("db", "upgrade")
            nodes[0].cli(
                "account",
                "add",
                "bench",
                "--plan",
                "bench",
                "--sender-domain",
                SENDER_DOMAIN,
                "--network",
                "127.0.0.0/8",
            )
        for node in nodes:
            stack.append(node)
            node.start(ledger)
        two = drive(
            f"two nodes, PostgreSQL, {label}", nodes, sink, args.messages, args.sessions, args.size, args.timeout
        )
        for node in nodes:
            node.stop()
            stack.remove(node)
        passes[lease_emails] = two
        print(
            f"  two nodes PostgreSQL, lease_emails {lease_emails}: accepted in {two.accept_seconds:.2f} s,"
            f" delivered {two.delivered} in {fmt(two.deliver_seconds, 2)} s",
            flush=True,
        )

    # meter micro-benchmark on PostgreSQL (its own schema-local account: nodes are stopped by now)
    meters: dict[int, MeterFigures] = {}
    for lease_emails in (0, args.lease_emails):
        meter_schema = f"{schema}_meter{lease_emails}"
        asyncio.run(create_schema(args.pg_url, meter_schema))
        try:
            meters[lease_emails] = asyncio.run(
                meter_on_pg(args.pg_url, meter_schema, args.meter_iterations, 200, args.sessions, lease_emails)
            )
        finally:
            asyncio.run(drop_schema(args.pg_url, meter_schema))

    print()
    print("== results")
    print(
        f"one node,  SQLite     delivered/s: {fmt(one.delivered_per_s)}"
        f"   (accepted/s {fmt(one.messages / one.accept_seconds)})"
    )
    for run_ in (one, *passes.values()):
        print(
            f"  {run_.label:<34} machine busy {run_.machine_busy:6.1%} of {os.cpu_count()} CPUs;"
            f" CPU per message: mailmeter {run_.relay_cpu_ms:5.2f} ms,"
            f" everything else (PostgreSQL, smtp-source, smtp-sink) {run_.other_cpu_ms:5.2f} ms"
        )
    for lease_emails, two in passes.items():
        ratio = two.delivered_per_s / one.delivered_per_s if two.delivered_per_s and one.delivered_per_s else None
        verdict = "-" if ratio is None else ("MET" if ratio >= TARGET_RATIO else "MISSED")
        print(
            f"two nodes, PostgreSQL, lease_emails {lease_emails:>4}: delivered/s {fmt(two.delivered_per_s)}"
            f"   (accepted/s {fmt(two.messages / two.accept_seconds)});"
            f" two/one {fmt(ratio, 2)}x (issue 7 wants >= {TARGET_RATIO}x): {verdict}"
        )
    for lease_emails, figures in meters.items():
        print(
            f"meter reserve+commit in process on PostgreSQL, lease_emails {lease_emails},"
            f" one caller, {figures.iterations} messages:"
        )
        print(describe("reserve", figures.alone.reserve))
        print(describe("commit", figures.alone.commit))
        print(describe("reserve+commit", figures.alone.pair))
        print(
            f"  {figures.callers} concurrent callers, {figures.iterations} messages, "
            f"{figures.iterations / figures.together_wall:,.0f} messages/s:"
        )
        print(describe("reserve+commit", figures.together.pair))
    if one.deliver_seconds is None or any(two.deliver_seconds is None for two in passes.values()):
        print("note: not every message was delivered within the timeout; the rate is missing")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=4, help="delivery.workers per node")
    parser.add_argument("--pool-size", type=int, default=10, help="database.pool_size per node")
    parser.add_argument("--lease-emails", type=int, default=50, help="database.lease_emails of the leasing pass")
    parser.add_argument("--meter-iterations", type=int, default=2000)
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL)
    parser.add_argument("--python", default=sys.executable, help="Python that runs mailmeter serve")
    parser.add_argument("--port-base", type=int, default=24000, help="first loopback port tried for the sink")
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args(argv)
    for tool in ("smtp-sink", "smtp-source"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: apt-get install postfix (see bench/README.md)")

    def terminate(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGHUP, terminate)
    workdir = Path(tempfile.mkdtemp(prefix="two-nodes."))
    schema = f"mm_bench_{secrets.token_hex(6)}"
    stack: list[Node] = []
    sinks: list[SmtpSink] = []
    asyncio.run(create_schema(args.pg_url, schema))
    try:
        return run(args, workdir, schema, stack, sinks)
    except ServiceError as error:
        print(f"two_nodes: ERROR {error}", file=sys.stderr)
        return 1
    finally:
        for node in stack:
            node.stop()
        for sink in sinks:
            sink.stop()
        try:
            asyncio.run(drop_schema(args.pg_url, schema))
        except Exception as error:  # noqa: BLE001 - report, keep cleaning
            print(f"two_nodes: could not drop schema {schema}: {error}", file=sys.stderr)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
