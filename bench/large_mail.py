"""Issue 6 item 4: do ten 10 MB messages in flight stall the other sessions?

Starts `mailmeter serve` (SQLite, spool, delivery to smtp-sink; bench/services.py's
MailmeterServer) and measures small messages' reply time after DATA (from the
final "." to the reply, bench/smtpload.py's send_one) twice, under the same small
load (SESSIONS concurrent sessions of 1 KB messages for SECONDS seconds):

  (a) alone;
  (b) while LARGE concurrent sessions keep sending 10 MB messages, one after the
      other, so that ten are in flight (being received, spooled, metered or
      delivered) the whole time. They come from smtp-source in its own process, so
      this process's event loop times only the small messages.

It prints p50/p99/max and messages/s of the small messages for both passes, the
ratio of their p99, and how many large messages reached the sink meanwhile.

    .venv/bin/python bench/large_mail.py [--seconds 20] [--sessions 10] [--large 10] [--large-mb 10] [--processes 1]

Needs smtp-sink (Debian's postfix package). Everything listens on 127.0.0.1; every
process started is stopped and the temporary directory deleted on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

from services import (  # noqa: E402
    LOOPBACK,
    RECIPIENT,
    SENDER,
    MailmeterServer,
    PortAllocator,
    ProcessLedger,
    ServiceError,
    SmtpSink,
    stop_group,
)
from smtpload import LoadResult, LoadSpec, SmtpError, send_one  # noqa: E402


async def keep_sending(spec: LoadSpec, until: float, result: LoadResult, first: int) -> None:
    """One session after another until `until`, each one message; record reply times after DATA."""
    number = first
    while time.monotonic() < until:
        number += 1
        try:
            result.latencies.append(await asyncio.wait_for(send_one(spec, number), spec.timeout))
        except (TimeoutError, SmtpError, OSError) as error:
            result.errors.append(f"message {number}: {error!r}")


async def measure(port: int, seconds: float, sessions: int) -> LoadResult:
    """The small load for `seconds`: SESSIONS senders, one message per connection."""
    small_spec = LoadSpec(LOOPBACK, port, 0, sessions, 1024, SENDER, RECIPIENT)
    small = LoadResult()
    started = time.monotonic()
    await asyncio.gather(*(keep_sending(small_spec, started + seconds, small, 10_000 * n) for n in range(sessions)))
    small.wall = time.monotonic() - started
    return small


def settle(sink: SmtpSink, quiet: float = 3.0, timeout: float = 120.0) -> None:
    """Wait until the sink's count has not moved for `quiet` seconds (or `timeout`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and time.monotonic() - sink.changed_at < quiet:
        time.sleep(0.2)


def large_load(port: int, sessions: int, size: int) -> subprocess.Popen[bytes]:
    """smtp-source in its own process (so this process's event loop times only the small
    messages): SESSIONS concurrent sessions of SIZE-byte messages, more than will finish."""
    argv = [
        "smtp-source",
        "-s",
        str(sessions),
        "-l",
        str(size),
        "-m",
        "100000",
        "-M",
        "large.bench.test",
        "-f",
        SENDER,
        "-t",
        RECIPIENT,
        f"{LOOPBACK}:{port}",
    ]
    return subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )


def line(label: str, result: LoadResult) -> str:
    summary = result.summary()
    return (
        f"  {label:<34} {summary['messages']:>6} msgs  {summary['accepted_per_s']:>7} /s"
        f"  p50 {summary['p50_ms']:>8} ms  p99 {summary['p99_ms']:>8} ms  max {summary['max_ms']:>8} ms"
        f"  errors {summary['errors']}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--sessions", type=int, default=10, help="concurrent small-message sessions")
    parser.add_argument("--large", type=int, default=10, help="concurrent large-message sessions")
    parser.add_argument("--large-mb", type=float, default=10)
    parser.add_argument("--processes", type=int, default=1, help="mailmeter's listen.processes")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--port-base", type=int, default=25500)
    args = parser.parse_args(argv)
    if shutil.which("smtp-sink") is None:
        raise SystemExit("smtp-sink not found: apt-get install postfix (see bench/README.md)")
    workdir = Path(tempfile.mkdtemp(prefix="large-mail."))
    ledger = ProcessLedger(workdir)
    ports = PortAllocator(args.port_base)
    sink = SmtpSink(ledger, ports.take(), workdir / "sink.log")
    server = MailmeterServer(
        ledger, workdir / "mailmeter", args.python, REPO_DIR, ports.take(), processes=args.processes
    )
    large_bytes = int(args.large_mb * 1024 * 1024)
    try:
        sink.start()
        server.start(sink.port)
        print(
            f"large_mail: {args.sessions} sessions of 1 KB messages for {args.seconds:.0f} s, alone and beside"
            f" {args.large} sessions of {args.large_mb:g} MB messages; mailmeter on {LOOPBACK}:{server.port}",
            flush=True,
        )
        alone = asyncio.run(measure(server.port, args.seconds, args.sessions))
        server.check_alive()
        # The small messages of the first pass reach the sink first (delivery may lag
        # acceptance): counted in, they would hide large messages from the count below.
        sink.wait_for(len(alone.latencies), timeout=120)
        before = sink.count
        large = large_load(server.port, args.large, large_bytes)
        try:
            time.sleep(3)  # the large messages get going first
            beside = asyncio.run(measure(server.port, args.seconds, args.sessions))
            large_seconds = args.seconds + 3
        finally:
            stop_group(large, signal.SIGTERM, grace=5)
        server.check_alive()
        settle(sink)  # what was accepted meanwhile, small and large, reaches the sink
        large_done = max(sink.count - before - len(beside.latencies), 0)
    except ServiceError as error:
        print(f"large_mail: ERROR {error}", file=sys.stderr)
        return 1
    finally:
        server.stop()
        sink.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print()
    print("== results (small messages: reply time after DATA)")
    print(line("alone", alone))
    print(line(f"beside {args.large} x {args.large_mb:g} MB in flight", beside))
    p99_alone, p99_beside = alone.summary()["p99_ms"], beside.summary()["p99_ms"]
    assert isinstance(p99_alone, float) and isinstance(p99_beside, float)
    megabytes = large_done * args.large_mb
    print(
        f"p99 beside / alone: {p99_beside / p99_alone if p99_alone else float('nan'):.2f}x;"
        f" large messages relayed to the sink meanwhile: {large_done} ({megabytes:,.0f} MB in"
        f" {large_seconds:.0f} s, {megabytes / large_seconds:.1f} MB/s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
