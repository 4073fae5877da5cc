"""Micro-benchmark: the meter's reserve + commit, in process, against a SQLite file.

The relay pays one reserve per RCPT and one commit per message before it can
answer; the issue's target is p99 < 1 ms for the pair. This uses the real
`mailmeter.metering.meter.Meter` over the real `mailmeter.metering.sqlite.SqliteStore`
(WAL, synchronous=FULL, on a file: the fsyncs are part of what is measured),
built the way mailmeter/factory.py builds them, with no SMTP around it.

Two passes: one caller at a time (the latency of the pair itself, which is
what the target is about), then `--concurrency` callers at once, as many SMTP
sessions would (adds the wait for the store's single connection).

    .venv/bin/python bench/meter_latency.py --iterations 5000   # the checkout's venv (pip install -e .)

bench/run runs it on the code under test (BENCH_SRC), by PYTHONPATH.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import uvloop  # the loop `mailmeter serve` runs on

sys.path.insert(0, str(Path(__file__).resolve().parent))

from code_under_test import module  # noqa: E402

Meter = module("metering.meter").Meter
SqliteStore = module("metering.sqlite").SqliteStore
parse_plan = module("policies.plans").parse_plan

TARGET_P99_MS = 1.0


@dataclass
class Timings:
    """Seconds per call, kept separately for reserve, commit and the pair."""

    reserve: list[float] = field(default_factory=list)
    commit: list[float] = field(default_factory=list)
    pair: list[float] = field(default_factory=list)


def percentile_ms(samples: list[float], pct: float) -> float:
    """Nearest-rank percentile in milliseconds."""
    ordered = sorted(samples)
    rank = max(1, -(-len(ordered) * pct // 100))
    return ordered[int(rank) - 1] * 1000


def describe(label: str, samples: list[float]) -> str:
    return (
        f"  {label:<16} p50 {percentile_ms(samples, 50):7.3f} ms   p99 {percentile_ms(samples, 99):7.3f} ms"
        f"   max {max(samples) * 1000:8.3f} ms"
    )


async def open_meter(directory: Path) -> tuple[SqliteStore, Meter]:
    """A store on a file and a meter with one account whose quota is never reached."""
    store = SqliteStore(directory / "meter.db")
    plans = {"bench": parse_plan("bench", {"email_quota": 1_000_000_000})}
    meter = Meter(store, plans, node="bench")
    await store.open()
    await meter.add_account("bench", None, "bench", ["bench.test"], ["127.0.0.0/8"])
    return store, meter


async def reserve_commit(meter: Meter, number: int, timings: Timings | None) -> None:
    """One message's metering: reserve 1 email, commit it under a fresh queue id."""
    started = time.perf_counter()
    grant = await meter.reserve("bench", None, 1)
    reserved = time.perf_counter()
    if grant.granted != 1:
        raise RuntimeError(f"reserve refused ({grant.refusal}): the bench plan should never refuse")
    await meter.commit(grant.hold_id, f"BENCH{number:012d}", 1)
    done = time.perf_counter()
    if timings is not None:
        timings.reserve.append(reserved - started)
        timings.commit.append(done - reserved)
        timings.pair.append(done - started)


async def sequential(meter: Meter, iterations: int, start: int) -> Timings:
    timings = Timings()
    for number in range(start, start + iterations):
        await reserve_commit(meter, number, timings)
    return timings


async def concurrent(meter: Meter, iterations: int, start: int, callers: int) -> tuple[Timings, float]:
    """`callers` tasks sharing the work; returns the timings and the wall time."""
    timings = Timings()
    numbers = iter(range(start, start + iterations))

    async def caller() -> None:
        for number in numbers:
            await reserve_commit(meter, number, timings)

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    return timings, time.perf_counter() - started


def prefill(database: Path, accounts: int, events: int) -> None:
    """Issue 6 item 3's scale of state: `accounts` other accounts and `events` earlier
    accepted messages (with their results) spread over them and over past periods."""
    import os
    import sqlite3
    import time
    from datetime import datetime, timedelta, timezone

    periods = module("policies.periods")
    PeriodSpec, period_containing = periods.PeriodSpec, periods.period_containing

    started = time.monotonic()
    with sqlite3.connect(database) as db:
        db.execute(
            "INSERT INTO accounts (name, plan, subscribed_on, created_at)"
            " WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)"
            " SELECT 'filler' || i, 'bench', '2020-01-01', '2020-01-01T00:00:00+00:00' FROM n",
            (accounts,),
        )
        db.execute(
            "INSERT INTO messages (queue_id, account_id, period_key, recipients, node, accepted_at, region)"
            " WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)"
            " SELECT printf('OLD%012d', i), 2 + (i % ?), printf('2025-%02d-01T00:00:00Z', 1 + i % 12), 1,"
            " 'bench', '2025-01-01T00:00:00+00:00', 'bench' FROM n",
            (events, accounts),
        )
        db.execute(
            "INSERT INTO recipient_results (queue_id, recipient, result, period_key, detail, updated_at)"
            " SELECT queue_id, 'r@old.test', 'delivered', period_key, '', accepted_at FROM messages"
            " WHERE queue_id LIKE 'OLD%'"
        )
        db.execute(
            "INSERT OR IGNORE INTO period_usage (account_id, period_key, accepted, delivered)"
            " SELECT account_id, period_key, COUNT(*), COUNT(*) FROM messages WHERE queue_id LIKE 'OLD%'"
            " GROUP BY account_id, period_key"
        )
        # A running system invoiced every ended period as it ended: each filler account's
        # last invoice is for the previous month, so the billing job (calendar months, UTC)
        # finds nothing left to close, as in steady state. Without it, the job's first pass
        # would close 10,000 accounts' periods since 2020 (about 70 per second) while measured.
        current = period_containing(PeriodSpec(), datetime.now(timezone.utc))
        last = period_containing(PeriodSpec(), current.start - timedelta(seconds=1))
        stamp = last.end.isoformat()
        db.execute(
            "INSERT INTO invoices (id, account_id, period_key, period_end, issued_at, invoice_date, due_date,"
            " statement_date, total, amount_due, prepaid_applied, status, statement_sent, body)"
            " SELECT 'INV-' || name || '-last', id, ?, ?, ?, ?, ?, ?, 0, 0, 0, 'paid', 1, '{}'"
            " FROM accounts WHERE name LIKE 'filler%'",
            (last.key, stamp, stamp, stamp, stamp, stamp),
        )
        db.commit()
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # measure the store, not a 1 GB checkpoint
    os.sync()  # and not the kernel writing the prefill's gigabytes back while it is measured
    print(
        f"prefilled {accounts:,} accounts and {events:,} earlier messages with results"
        f" in {time.monotonic() - started:.0f} s"
    )


async def run(
    iterations: int, warmup: int, callers: int, directory: Path, prefill_accounts: int = 0, prefill_events: int = 0
) -> bool:
    """Print both passes; True if the sequential p99 of the pair meets the target."""
    store, meter = await open_meter(directory)
    if prefill_accounts or prefill_events:
        await store.close()
        prefill(directory / "meter.db", max(prefill_accounts, 1), prefill_events)
        await store.open()
    try:
        for number in range(warmup):
            await reserve_commit(meter, number, None)
        alone = await sequential(meter, iterations, warmup)
        together, wall = await concurrent(meter, iterations, warmup + iterations, callers)
    finally:
        await store.close()
    p99 = percentile_ms(alone.pair, 99)
    met = p99 < TARGET_P99_MS
    print(f"== meter reserve + commit, in process, SQLite file {directory / 'meter.db'}")
    print(f"one caller at a time, {iterations} messages:")
    print(describe("reserve", alone.reserve))
    print(describe("commit", alone.commit))
    print(describe("reserve+commit", alone.pair))
    print(f"{callers} concurrent callers, {iterations} messages, {iterations / wall:,.0f} messages/s:")
    print(describe("reserve+commit", together.pair))
    print(f"meter reserve+commit p99 {p99:.3f} ms (target < {TARGET_P99_MS:g} ms): {'MET' if met else 'MISSED'}")
    return met


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=5000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--dir", type=Path, help="directory for the database (default: a temporary one)")
    parser.add_argument("--prefill-accounts", type=int, default=0, help="other accounts in the store first")
    parser.add_argument("--prefill-events", type=int, default=0, help="earlier usage events in the store first")
    args = parser.parse_args(argv)
    fill = (args.prefill_accounts, args.prefill_events)
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
        uvloop.run(run(args.iterations, args.warmup, args.concurrency, args.dir, *fill))
        return 0
    with tempfile.TemporaryDirectory(prefix="meter-latency.") as directory:
        uvloop.run(run(args.iterations, args.warmup, args.concurrency, Path(directory), *fill))
    return 0


if __name__ == "__main__":
    sys.exit(main())
