"""Drive mailmeter, Postfix, Postfix + policyd-rate-limit and Haraka with the same load; compare.

Called by bench/run, which installs the Debian packages and Haraka, makes the work
directory and cleans up after us. Per target:

1. start a fresh smtp-sink (the upstream, and the delivery counter), then the server;
2. throughput pass: smtp-source -s SESSIONS -l SIZE -m MESSAGES, timed:
   accepted/s = messages / smtp-source wall time,
   delivered/s = messages / time until the sink has counted all of them;
3. latency pass, once everything was delivered: bench/smtpload.py with the same
   sessions and size times each end-of-DATA reply (p50, p99);
4. peak RSS of the server's processes over both passes (bench/procmem.py).

Before the targets, both clients run against a bare smtp-sink, so their own
ceilings are printed beside the results: a target near a ceiling is measuring
the client, not the server.

Settings come from the environment (BENCH_*), see Settings.from_env.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

sys.path.insert(0, str(Path(__file__).resolve().parent))

from procmem import PeakRss, cpu_seconds, machine_busy_seconds  # noqa: E402
from profiling import PySpy  # noqa: E402
from services import (  # noqa: E402
    RECIPIENT,
    SENDER,
    HarakaInstance,
    MailmeterServer,
    PolicydRateLimit,
    PortAllocator,
    PostfixInstance,
    ProcessLedger,
    ServiceError,
    SmtpSink,
)

BENCH_DIR = Path(__file__).resolve().parent
TARGETS = ("mailmeter", "postfix", "postfix+policyd", "haraka", "haraka+queue")


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


@dataclass(frozen=True)
class Settings:
    """One run's knobs. Every one can be set from the environment."""

    workdir: Path
    python: str
    src: Path
    messages: int = 20000
    sessions: int = 20
    size: int = 1024
    latency_messages: int = 5000
    targets: tuple[str, ...] = TARGETS
    delivery_timeout: int = 900
    port_base: int = 24000
    mailmeter_workers: int = 4
    mailmeter_log_level: str = "info"
    profile: bool = False
    out: Path | None = None
    prefill_accounts: int = 0
    prefill_events: int = 0
    store_fixture: str = ""  # BENCH_STORE_FIXTURE: "big" or ACCOUNTSxEVENTS (bench/big_store.py)
    pipelining: str = ""  # BENCH_PIPELINING: "" (smtp-source, lockstep), "on" or "auto" (smtpload.py pipelining)
    mailmeter_processes: int = 1
    # BENCH_MAILMETER_INLINE: 1 spool.inline on, 0 off (issue 19 item 3; a revision that has it); unset: its default
    mailmeter_inline: bool | None = None
    haraka_home: Path | None = None  # where bench/run installed Haraka (BENCH_HARAKA_HOME)
    haraka_nodes: int = 1
    haraka_log_level: str = "notice"
    redis_host: str = "127.0.0.1"
    redis_port: int = 6379
    haraka_redis_db: int = 4

    @classmethod
    def from_env(cls) -> Settings:
        messages = env_int("BENCH_MESSAGES", 20000)
        targets = tuple(t.strip() for t in os.environ.get("BENCH_TARGETS", ",".join(TARGETS)).split(",") if t.strip())
        unknown = set(targets) - set(TARGETS)
        if unknown:
            raise SystemExit(f"BENCH_TARGETS: unknown {sorted(unknown)}; known: {', '.join(TARGETS)}")
        out = os.environ.get("BENCH_OUT", "")
        haraka_home = os.environ.get("BENCH_HARAKA_HOME", "")
        redis_host, _, redis_port = os.environ.get("BENCH_REDIS", "127.0.0.1:6379").rpartition(":")
        return cls(
            workdir=Path(os.environ["BENCH_WORKDIR"]),
            python=os.environ.get("BENCH_PYTHON", sys.executable),
            src=Path(os.environ.get("BENCH_SRC_DIR", str(BENCH_DIR.parent))),
            messages=messages,
            sessions=env_int("BENCH_SESSIONS", 20),
            size=env_int("BENCH_SIZE", 1024),
            latency_messages=env_int("BENCH_LATENCY_MESSAGES", min(messages, 5000)),
            targets=targets,
            delivery_timeout=env_int("BENCH_DELIVERY_TIMEOUT", 900),
            port_base=env_int("BENCH_PORT_BASE", 24000),
            mailmeter_workers=env_int("BENCH_MAILMETER_WORKERS", 4),
            mailmeter_log_level=os.environ.get("BENCH_MAILMETER_LOG_LEVEL", "info"),
            profile=os.environ.get("BENCH_PROFILE", "") not in ("", "0"),
            out=Path(out) if out else None,
            prefill_accounts=env_int("BENCH_PREFILL_ACCOUNTS", 0),
            prefill_events=env_int("BENCH_PREFILL_EVENTS", 0),
            store_fixture=os.environ.get("BENCH_STORE_FIXTURE", "").strip(),
            pipelining=pipelining_mode(os.environ.get("BENCH_PIPELINING", "")),
            mailmeter_processes=env_int("BENCH_MAILMETER_PROCESSES", os.cpu_count() or 1),
            mailmeter_inline=(
                None if os.environ.get("BENCH_MAILMETER_INLINE", "") == "" else env_int("BENCH_MAILMETER_INLINE", 0) > 0
            ),
            haraka_home=Path(haraka_home) if haraka_home else None,
            haraka_nodes=max(1, env_int("BENCH_HARAKA_NODES", os.cpu_count() or 1)),
            haraka_log_level=os.environ.get("BENCH_HARAKA_LOG_LEVEL", "notice"),
            redis_host=redis_host or "127.0.0.1",
            redis_port=int(redis_port),
            haraka_redis_db=env_int("BENCH_HARAKA_REDIS_DB", 4),
        )


def pipelining_mode(value: str) -> str:
    """BENCH_PIPELINING: empty or 0: smtp-source (lockstep); 1 or on: smtpload.py always pipelining;
    auto: where the server offers it; lockstep: smtpload.py without pipelining (the A/B partner of 1:
    the same client, only the command pattern differs)."""
    value = value.strip().lower()
    if value in ("", "0", "off", "no"):
        return ""
    if value in ("1", "on", "yes"):
        return "on"
    if value == "auto":
        return "auto"
    if value == "lockstep":
        return "off"
    raise SystemExit(f"BENCH_PIPELINING={value!r}: use 1 (always), auto (where offered), lockstep or 0")


@dataclass
class Measurement:
    """What one target scored. Rates per second; latencies in ms; memory in MiB."""

    target: str
    accepted_per_s: float | None = None
    delivered_per_s: float | None = None
    delivered: int = 0
    accept_seconds: float | None = None
    deliver_seconds: float | None = None
    server_cpu_seconds: float | None = None
    machine_busy_seconds: float | None = None
    latency: dict[str, Any] = field(default_factory=dict)
    peak_rss_mib: float | None = None
    peak_pss_mib: float | None = None
    rss_processes: int = 0
    rss_by_name_mib: dict[str, float] = field(default_factory=dict)
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def cpu_ms_per_message(self) -> float | None:
        """The server's CPU time over the throughput pass, per message delivered."""
        if self.server_cpu_seconds is None or not self.delivered:
            return None
        return 1000 * self.server_cpu_seconds / self.delivered


class Server(Protocol):
    """What the harness needs of a target."""

    name: str

    def roots(self) -> list[int]: ...
    def check_alive(self) -> None: ...


# -- the two drivers ---------------------------------------------------------


def smtp_source(port: int, messages: int, settings: Settings, timeout: float) -> float:
    """Run smtp-source against 127.0.0.1:port; its wall time in seconds. Raises if it failed.

    smtp-source exits non-zero on the first reply it does not expect, so a zero
    exit status means every message was accepted with a 2xx.
    """
    argv = [
        "smtp-source",
        "-s",
        str(settings.sessions),
        "-l",
        str(settings.size),
        "-m",
        str(messages),
        "-M",
        "client.bench.test",
        "-f",
        SENDER,
        "-t",
        RECIPIENT,
        f"127.0.0.1:{port}",
    ]
    started = time.monotonic()
    done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=timeout)
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise ServiceError(f"smtp-source failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-500:]}")
    return wall


def smtpload(port: int, messages: int, settings: Settings, timeout: float) -> dict[str, Any]:
    """Run the latency client in its own process (its CPU must not slow the sink reader here)."""
    argv = [
        settings.python,
        str(BENCH_DIR / "smtpload.py"),
        "--port",
        str(port),
        "--messages",
        str(messages),
        "--sessions",
        str(settings.sessions),
        "--size",
        str(settings.size),
        "--from",
        SENDER,
        "--to",
        RECIPIENT,
    ]
    if settings.pipelining:
        argv += ["--pipelining", settings.pipelining]
    done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=timeout)
    try:
        summary: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise ServiceError(f"smtpload.py failed ({done.returncode}): {done.stderr.strip()[-500:]}") from None
    return summary


# -- one target ----------------------------------------------------------------


def throughput_pass(server: Server, sink: SmtpSink, port: int, settings: Settings, result: Measurement) -> None:
    """smtp-source for accepted/s; the sink's count for delivered/s; the server's CPU time."""
    cpu_before, busy_before = cpu_seconds(server.roots()), machine_busy_seconds()
    started = time.monotonic()
    if settings.pipelining:
        # smtp-source cannot pipeline: the pipelining client drives this pass too.
        load = smtpload(port, settings.messages, settings, settings.delivery_timeout)
        if load.get("errors"):
            raise ServiceError(f"smtpload.py (pipelining) failed: {load.get('first_errors')}")
        result.accept_seconds = float(load["wall_s"])
        result.notes.append(f"throughput pass by smtpload.py, {load.get('pipelined')} messages pipelined")
    else:
        result.accept_seconds = smtp_source(port, settings.messages, settings, settings.delivery_timeout)
    result.accepted_per_s = settings.messages / result.accept_seconds
    server.check_alive()
    arrived = sink.wait_for(settings.messages, settings.delivery_timeout)
    result.delivered = sink.count
    result.server_cpu_seconds = cpu_seconds(server.roots()) - cpu_before
    result.machine_busy_seconds = machine_busy_seconds() - busy_before
    if arrived is None:
        elapsed = time.monotonic() - started
        result.notes.append(f"only {sink.count} of {settings.messages} delivered after {elapsed:.0f} s")
        result.delivered_per_s = sink.count / elapsed
        return
    result.deliver_seconds = arrived - started
    result.delivered_per_s = settings.messages / result.deliver_seconds


def latency_pass(server: Server, sink: SmtpSink, port: int, settings: Settings, result: Measurement) -> None:
    """Same concurrency, measured per message from '.' to the reply; then wait for delivery."""
    if settings.latency_messages <= 0:
        return
    already = sink.count
    result.latency = smtpload(port, settings.latency_messages, settings, settings.delivery_timeout)
    if result.latency.get("errors"):
        result.notes.append(f"latency pass errors: {result.latency.get('first_errors')}")
    server.check_alive()
    expected = already + int(result.latency.get("messages", 0))
    if sink.wait_for(expected, settings.delivery_timeout) is None:
        result.notes.append(f"latency pass: {sink.count - already} of {expected - already} delivered")


def measure(
    name: str,
    start: Callable[[int], Server],
    stop: Callable[[], None],
    ports: PortAllocator,
    settings: Settings,
    ledger: ProcessLedger,
    port: int,
) -> Measurement:
    """Start sink and server, run both passes, stop them; errors become part of the result."""
    result = Measurement(target=name, load_before=os.getloadavg())
    sink = SmtpSink(ledger, ports.take(), settings.workdir / f"sink-{slug(name)}.log")
    sampler: PeakRss | None = None
    profiler: PySpy | None = None
    try:
        sink.start()
        server = start(sink.port)
        sampler = PeakRss(server.roots)
        sampler.start()
        if settings.profile and name == "mailmeter" and settings.out is not None:
            profiler = PySpy(settings.python, server.roots()[0], settings.out / "mailmeter-profile")
            profiler.start()
        throughput_pass(server, sink, port, settings, result)
        if profiler is not None:
            result.notes.append("profiled with py-spy: this target's throughput figures are lowered by it")
            result.notes.extend(profiler.stop_and_summarize())
            profiler = None
        latency_pass(server, sink, port, settings, result)
    except (ServiceError, subprocess.TimeoutExpired, OSError) as error:
        result.error = str(error)
    finally:
        if profiler is not None:
            profiler.stop_and_summarize()
        if sampler is not None:
            sampler.stop()
            result.peak_rss_mib = round(sampler.peak_mib, 1)
            result.peak_pss_mib = round(sampler.peak_pss_mib, 1)
            result.rss_processes = sampler.peak_processes
            result.rss_by_name_mib = {k: round(v / 1024, 1) for k, v in sorted(sampler.by_name_kib.items())}
        stop()
        sink.stop()
    return result


def slug(name: str) -> str:
    return name.replace("+", "-")


def run_mailmeter(settings: Settings, ports: PortAllocator, ledger: ProcessLedger) -> Measurement:
    server = MailmeterServer(
        ledger,
        settings.workdir / "mailmeter",
        settings.python,
        settings.src,
        ports.take(),
        workers=settings.mailmeter_workers,
        log_level=settings.mailmeter_log_level,
        prefill_accounts=settings.prefill_accounts,
        prefill_events=settings.prefill_events,
        processes=settings.mailmeter_processes,
        inline_spool=settings.mailmeter_inline,
        store_fixture=settings.store_fixture,
    )

    def start(sink_port: int) -> Server:
        server.start(sink_port)
        return server

    return measure("mailmeter", start, server.stop, ports, settings, ledger, server.port)


def run_postfix(settings: Settings, ports: PortAllocator, ledger: ProcessLedger, with_policyd: bool) -> Measurement:
    name = "postfix+policyd" if with_policyd else "postfix"
    policyd = PolicydRateLimit(ledger, settings.workdir / "policyd") if with_policyd else None
    instance = PostfixInstance(
        ledger,
        settings.workdir / slug(name),
        ports.take(),
        policy_socket=policyd.socket_path if policyd else None,
        name=name,
    )

    def start(sink_port: int) -> Server:
        if policyd is not None:
            policyd.start()
            instance.extra_roots.append(policyd.pid or 0)
        instance.start(sink_port)
        return instance

    def stop() -> None:
        instance.stop()
        if policyd is not None:
            policyd.stop()

    result = measure(name, start, stop, ports, settings, ledger, instance.port)
    if policyd is not None and result.error is None:
        result.notes.append(f"policyd-rate-limit recorded {policyd.rows()} mails")
    return result


def run_haraka(settings: Settings, ports: PortAllocator, ledger: ProcessLedger, queue: bool) -> Measurement:
    """Haraka forwarding inline (queue=False) or through its own outbound queue; then its Redis counter."""
    name = "haraka+queue" if queue else "haraka"
    if settings.haraka_home is None:
        return Measurement(target=name, error="BENCH_HARAKA_HOME is not set: run bench/run, which installs Haraka")
    instance = HarakaInstance(
        ledger,
        settings.workdir / slug(name),
        settings.haraka_home,
        ports.take(),
        nodes=settings.haraka_nodes,
        queue=queue,
        log_level=settings.haraka_log_level,
        redis_host=settings.redis_host,
        redis_port=settings.redis_port,
        redis_db=settings.haraka_redis_db,
        name=name,
    )

    def start(sink_port: int) -> Server:
        instance.start(sink_port)
        return instance

    result = measure(name, start, instance.stop, ports, settings, ledger, instance.port)
    result.notes.append(f"{instance.nodes} Haraka worker process(es) (smtp.ini nodes) and the cluster master")
    if result.error is None:
        check_limit_counter(instance, settings, result)
    if queue and instance.queued_files():
        result.notes.append(f"{instance.queued_files()} files left in Haraka's outbound queue after the passes")
    return result


def check_limit_counter(instance: HarakaInstance, settings: Settings, result: Measurement) -> None:
    """haraka-plugin-limit fails open without Redis: prove it counted every recipient of both passes."""
    expected = settings.messages + int(result.latency.get("messages", 0))
    where = (
        f"Redis {settings.redis_host}:{settings.redis_port} db {settings.haraka_redis_db}, key {instance.counter_key}"
    )
    try:
        counted = instance.counted()
        instance.clear_counter()
    except ServiceError as error:
        result.error = f"could not read haraka-plugin-limit's counter: {error}"
        return
    result.notes.append(
        f"haraka-plugin-limit counted {counted} recipients from {SENDER} ({where}); {expected} were accepted"
    )
    if counted is None or counted < expected:
        result.error = "haraka-plugin-limit did not count every recipient in Redis: this peer ran unmetered"


# -- client ceilings -------------------------------------------------------------


@dataclass
class Ceilings:
    """Each client against a bare smtp-sink: the most it can measure on this machine."""

    smtp_source_per_s: float | None = None
    smtpload: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def measure_ceilings(settings: Settings, ports: PortAllocator, ledger: ProcessLedger) -> Ceilings:
    ceilings = Ceilings()
    sink = SmtpSink(ledger, ports.take(), settings.workdir / "sink-ceiling.log")
    try:
        sink.start()
        if settings.pipelining:
            wall = float(smtpload(sink.port, settings.messages, settings, settings.delivery_timeout)["wall_s"])
        else:
            wall = smtp_source(sink.port, settings.messages, settings, settings.delivery_timeout)
        ceilings.smtp_source_per_s = settings.messages / wall
        if settings.latency_messages > 0:
            ceilings.smtpload = smtpload(sink.port, settings.latency_messages, settings, settings.delivery_timeout)
    except (ServiceError, subprocess.TimeoutExpired, OSError) as error:
        ceilings.error = str(error)
    finally:
        sink.stop()
    return ceilings


# -- report --------------------------------------------------------------------------


def fmt(value: object, digits: int = 0) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, (int, float)):
        return f"{value:,.{digits}f}"
    return str(value)


def results_table(ceilings: Ceilings, results: Sequence[Measurement]) -> list[str]:
    header = (
        f"{'target':<22}{'accepted/s':>12}{'delivered/s':>13}{'p50 DATA ms':>13}{'p99 DATA ms':>13}"
        f"{'CPU ms/msg':>12}{'peak RSS MiB':>14}{'peak PSS MiB':>14}"
    )
    lines = [header, "-" * len(header)]
    lat = ceilings.smtpload
    lines.append(
        f"{'(clients -> sink)':<22}{fmt(ceilings.smtp_source_per_s):>12}{'':>13}"
        f"{fmt(lat.get('p50_ms'), 2):>13}{fmt(lat.get('p99_ms'), 2):>13}"
    )
    for r in results:
        lines.append(
            f"{r.target:<22}{fmt(r.accepted_per_s):>12}{fmt(r.delivered_per_s):>13}"
            f"{fmt(r.latency.get('p50_ms'), 2):>13}{fmt(r.latency.get('p99_ms'), 2):>13}"
            f"{fmt(r.cpu_ms_per_message, 2):>12}{fmt(r.peak_rss_mib, 1):>14}{fmt(r.peak_pss_mib, 1):>14}"
        )
    return lines


def details(ceilings: Ceilings, results: Sequence[Measurement]) -> list[str]:
    lines = []
    if ceilings.error:
        lines.append(f"client ceilings: ERROR {ceilings.error}")
    elif ceilings.smtpload:
        lines.append(
            f"latency client alone: {fmt(ceilings.smtpload.get('accepted_per_s'))} msg/s into smtp-sink "
            "(its p50/p99 above are its own floor)"
        )
    for result in results:
        lines.extend(target_details(result))
    return lines


def target_details(r: Measurement) -> list[str]:
    """How each figure of one target came about, and what else was going on."""
    lines = [f"{r.target}: load average before {r.load_before[0]:.2f}"]
    if r.error:
        lines.append(f"  ERROR: {r.error}")
    if r.accept_seconds is not None:
        lines.append(
            f"  throughput pass: accepted in {r.accept_seconds:.2f} s, "
            f"delivered in {fmt(r.deliver_seconds, 2)} s ({r.delivered} at the sink)"
        )
    if r.server_cpu_seconds is not None and r.deliver_seconds:
        lines.append(
            f"  server CPU over that pass: {r.server_cpu_seconds:.1f} s = "
            f"{100 * r.server_cpu_seconds / r.deliver_seconds:.0f}% of one core, "
            f"{1000 * r.server_cpu_seconds / max(r.delivered, 1):.2f} ms per message"
        )
    if r.machine_busy_seconds is not None and r.deliver_seconds:
        cores = os.cpu_count() or 1
        busy = 100 * r.machine_busy_seconds / r.deliver_seconds / cores
        lines.append(
            f"  whole machine over that pass: {busy:.0f}% of {cores} cores busy "
            "(server, client, sink, and anything else running)"
        )
    if r.latency:
        lines.append(
            f"  latency pass: {r.latency.get('messages')} messages, "
            f"{fmt(r.latency.get('accepted_per_s'))}/s, max {fmt(r.latency.get('max_ms'), 1)} ms, "
            f"{r.latency.get('errors')} errors"
        )
    if r.peak_rss_mib is not None:
        names = ", ".join(f"{k} {v}" for k, v in r.rss_by_name_mib.items())
        lines.append(
            f"  peak RSS: largest sum of VmHWM over the live processes ({r.rss_processes} then; "
            f"shared pages counted in each); PSS splits them. VmHWM by name (MiB): {names}"
        )
    lines.extend(f"  {note}" for note in r.notes)
    return lines


def verdicts(results: Sequence[Measurement]) -> list[str]:
    """Issue 19's targets, each against a peer measured in this run.

    delivered/s >= 1.0x Postfix, >= 2.0x Postfix + policyd-rate-limit, ahead of
    Haraka (both configurations); p99 after DATA no worse than Postfix's; server
    CPU per message no more than Postfix's.
    """
    by_name = {r.target: r for r in results}
    mm = by_name.get("mailmeter")
    lines = []

    def ratio_line(other: str, goal: float, ahead: bool = False) -> None:
        """`ahead`: the ratio must exceed the goal, not just reach it."""
        target = f"{'>' if ahead else '>='} {goal}x"
        theirs = by_name.get(other)
        if mm is None or theirs is None or not mm.delivered_per_s or not theirs.delivered_per_s:
            lines.append(f"delivered/s mailmeter/{other}: not measured (target {target})")
            return
        ratio = mm.delivered_per_s / theirs.delivered_per_s
        met = ratio > goal if ahead else ratio >= goal
        lines.append(f"delivered/s mailmeter/{other}: {ratio:.2f}x (target {target}): {'MET' if met else 'MISSED'}")

    def at_most_postfix(what: str, unit: str, value: Callable[[Measurement], float | None]) -> None:
        pf = by_name.get("postfix")
        ours, theirs = (value(mm) if mm else None), (value(pf) if pf else None)
        if ours is None or theirs is None:
            lines.append(f"mailmeter {what}: not measured (target <= Postfix's in the same run)")
            return
        verdict = "MET" if ours <= theirs else "MISSED"
        lines.append(
            f"mailmeter {what}: {ours:.2f} {unit}, Postfix {theirs:.2f} {unit} (target <= Postfix's): {verdict}"
        )

    ratio_line("postfix", 1.0)
    ratio_line("postfix+policyd", 2.0)
    ratio_line("haraka", 1.0, ahead=True)
    ratio_line("haraka+queue", 1.0, ahead=True)
    at_most_postfix("p99 reply after DATA", "ms", lambda r: as_float(r.latency.get("p99_ms")))
    at_most_postfix("server CPU per message", "ms", lambda r: r.cpu_ms_per_message)
    return lines


def as_float(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


def print_report(settings: Settings, ceilings: Ceilings, results: Sequence[Measurement]) -> None:
    print()
    print(
        f"== load: {settings.sessions} sessions, {settings.size}-byte messages, {settings.messages} messages "
        f"(latency pass: {settings.latency_messages}), loopback, {os.cpu_count()} CPUs"
    )
    if settings.pipelining:
        print(
            f"== pipelining clients (BENCH_PIPELINING={settings.pipelining}): smtpload.py drives both passes, "
            "MAIL, RCPT and DATA in one write; the first row is smtpload.py's ceiling, not smtp-source's"
        )
    if settings.store_fixture:
        print(f"== mailmeter's store starts as bench/big_store.py's fixture {settings.store_fixture!r}")
    print("\n".join(results_table(ceilings, results)))
    print()
    print("\n".join(details(ceilings, results)))
    print()
    print("\n".join(verdicts(results)))


def save_json(settings: Settings, ceilings: Ceilings, results: Sequence[Measurement]) -> None:
    if settings.out is None:
        return
    settings.out.mkdir(parents=True, exist_ok=True)
    data = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()},
        "ceilings": asdict(ceilings),
        "results": [asdict(r) for r in results],
    }
    (settings.out / "results.json").write_text(json.dumps(data, indent=2))
    print(f"\nresults: {settings.out / 'results.json'}")


def keep_logs(settings: Settings) -> None:
    """Copy the services' logs next to the results when something failed."""
    if settings.out is None:
        return
    target = settings.out / "logs"
    for path in settings.workdir.rglob("*"):
        if path.is_file() and (path.suffix == ".log" or path.name == "maillog"):
            dest = target / path.relative_to(settings.workdir)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)
    print(f"logs kept in {target}")


def raise_on_sigterm() -> None:
    """Turn SIGTERM/SIGHUP into an exception, so finally blocks stop what we started."""

    def handler(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)


def main() -> int:
    # Our own process group: bench/run's trap can then stop us together with the
    # smtp-source or smtpload.py we are running, even if we were killed first.
    os.setpgrp()
    raise_on_sigterm()
    settings = Settings.from_env()
    ledger = ProcessLedger(settings.workdir)
    ports = PortAllocator(settings.port_base)
    print(f"load: {os.getloadavg()[0]:.2f} (other work on this machine skews every figure)", flush=True)
    print("measuring the clients' own ceilings against a bare smtp-sink ...", flush=True)
    ceilings = measure_ceilings(settings, ports, ledger)
    results: list[Measurement] = []
    for name in settings.targets:
        print(f"measuring {name} ...", flush=True)
        if name == "mailmeter":
            results.append(run_mailmeter(settings, ports, ledger))
        elif name.startswith("haraka"):
            results.append(run_haraka(settings, ports, ledger, queue=name == "haraka+queue"))
        else:
            results.append(run_postfix(settings, ports, ledger, with_policyd=name == "postfix+policyd"))
        last = results[-1]
        print(
            f"  {name}: accepted/s {fmt(last.accepted_per_s)}, delivered/s {fmt(last.delivered_per_s)}, "
            f"p99 {fmt(last.latency.get('p99_ms'), 2)} ms" + (f", ERROR {last.error}" if last.error else ""),
            flush=True,
        )
    print_report(settings, ceilings, results)
    save_json(settings, ceilings, results)
    failed = ceilings.error is not None or any(r.error for r in results)
    if failed or os.environ.get("BENCH_KEEP_LOGS"):
        keep_logs(settings)
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench: interrupted; everything started was stopped", file=sys.stderr)
        sys.exit(130)
