"""Micro-benchmark: one pass of the billing job on a store with many accounts (issue 6 item 3).

The billing job runs every `billing.interval` seconds (default 60) on relay
worker 0, the same event loop that answers SMTP. On a store with 10,000 accounts
whose ended periods are all invoiced (a running system's steady state), a pass
finds nothing to close, yet it must look at every account: what it costs is time
the loop's SMTP sessions wait. This prints that cost, and the longest time the
pass kept the loop from running anything else (measured by a ticker task that
wakes every millisecond), against a store holding only the bench account.

    .venv/bin/python bench/billing_pass.py --accounts 10000 --events 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import uvloop  # the loop `mailmeter serve` runs on

sys.path.insert(0, str(Path(__file__).resolve().parent))

from code_under_test import module  # noqa: E402
from meter_latency import open_meter, prefill  # noqa: E402

Billing = module("metering.billing").Billing
NoGateway = module("metering.gateway").NoGateway


async def longest_stall(stop: asyncio.Event) -> float:
    """The longest gap between wake-ups of a task asking to run every millisecond."""
    worst = 0.0
    last = time.perf_counter()
    while not stop.is_set():
        await asyncio.sleep(0.001)
        now = time.perf_counter()
        worst = max(worst, now - last - 0.001)
        last = now
    return worst


async def timed_passes(directory: Path, accounts: int, events: int, passes: int) -> tuple[list[float], float]:
    store, meter = await open_meter(directory)
    if accounts or events:
        await store.close()
        prefill(directory / "meter.db", max(accounts, 1), events)
        await store.open()
    billing = Billing(meter, NoGateway())
    try:
        stop = asyncio.Event()
        ticker = asyncio.create_task(longest_stall(stop))
        times = []
        for _ in range(passes):
            started = time.perf_counter()
            run = await billing.run_once()
            times.append(time.perf_counter() - started)
            if run.invoices:
                print(f"  (a pass closed {len(run.invoices)} periods: the prefill left ended periods open)")
        stop.set()
        return times, await ticker
    finally:
        await store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--passes", type=int, default=5)
    args = parser.parse_args(argv)
    results = {}
    for label, accounts, events in (("empty store", 0, 0), ("prefilled", args.accounts, args.events)):
        with tempfile.TemporaryDirectory(prefix="billing-pass.") as directory:
            times, stall = uvloop.run(timed_passes(Path(directory), accounts, events, args.passes))
        ordered = sorted(times)
        results[label] = ordered[len(ordered) // 2]
        print(
            f"{label:<12} {accounts:>7,} other accounts:"
            f" billing pass median {ordered[len(ordered) // 2] * 1000:9.1f} ms"
            f" (min {ordered[0] * 1000:.1f}, max {ordered[-1] * 1000:.1f}),"
            f" loop blocked at most {stall * 1000:.1f} ms"
        )
    print(f"prefilled / empty: {results['prefilled'] / results['empty store']:.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
