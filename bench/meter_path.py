"""The meter's work for one message, in process, on an empty store or a store with history (issue 19 item 5).

Per message, the calls the relay makes of the meter, in its order: the account
bound to the client's address (each connection: smtp-source opens one per
message), MAIL's account check, the hold at RCPT, the commit at the end of DATA,
and delivery's result for the recipient; over the real Meter and SqliteStore
(WAL, synchronous=FULL, on a file), as mailmeter/factory.py builds them.

Whole-relay figures on a 2-core machine shared with other work are too noisy to
tell a few percent apart, so this gives figures that do not depend on the
machine's load:

- `--callgrind`: the instructions the process executes per message, counted by
  valgrind's callgrind (user space: Python, SQLite, libc). Two runs per store,
  one with only the warm-up and one with `--messages` more; the difference,
  divided by the messages, is the meter path's cost without start-up. Equal
  inputs give equal counts (to a fraction of a percent: thread scheduling).
- always: the process's read and write system calls and bytes per message
  (/proc/self/io), which is where a bigger store would cost the kernel (SQLite
  reading pages its cache does not hold), and CPU time per message.

    .venv/bin/python bench/meter_path.py                    # empty vs big store, native: syscalls and CPU per message
    .venv/bin/python bench/meter_path.py --callgrind        # plus instruction counts under callgrind (a few minutes)
    .venv/bin/python bench/meter_path.py --store big --messages 3000 --one   # one measurement, JSON

The big store is bench/big_store.py's fixture (built on first use), copied for each run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import big_store  # noqa: E402
from code_under_test import module  # noqa: E402

BENCH = Path(__file__).resolve()
CLIENT = "127.0.0.1"
NETWORKS_TTL = 2.0  # metering/meter.py's: a relay process reads the bound networks at most this often


def proc_io() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/self/io").read_text().splitlines():
        name, value = line.split(":")
        fields[name] = int(value)
    return fields


async def one_run(
    directory: Path, warmup: int, messages: int, reloads: int = 0, frozen: bool = False
) -> dict[str, float]:
    """Open the store in `directory` (a fixture copy or nothing), run warm-up and measured messages.

    `reloads`: after the messages, read the bound networks again that many times (each as
    a connection after NETWORKS_TTL would). `frozen`: no reload while the messages run
    (under callgrind a message takes 50 times as long, so the every-2-seconds reload would
    land 50 times as often per message as in real time; it is counted apart instead).
    """
    import uvloop  # noqa: F401  (the loop the relay runs on; asyncio.run below is given it)

    Meter = module("metering.meter").Meter
    SqliteStore = module("metering.sqlite").SqliteStore
    parse_plan = module("policies.plans").parse_plan
    new_queue_id = module("relay.delivery").new_queue_id

    meter_module = module("metering.meter")
    if frozen:
        meter_module.NETWORKS_TTL = 1e9
    store = SqliteStore(directory / "meter.db")
    meter = Meter(store, {"bench": parse_plan("bench", {"email_quota": 1_000_000_000})}, node="bench")
    await store.open()
    try:
        if await store.get_account("bench") is None:
            await meter.add_account("bench", None, "bench", ["bench.test"], ["127.0.0.0/8"])

        async def message(number: int) -> None:
            name = await meter.account_for_client(CLIENT)
            assert name == "bench", name
            _, refusal = await meter.mail_check(name)
            assert refusal is None, refusal
            grant = await meter.reserve(name, None, 1)
            assert grant.granted == 1, grant
            queue_id = new_queue_id()
            await meter.commit(grant.hold_id, queue_id, 1, account=name)
            recorded = await meter.record_result(queue_id, f"r{number}@sink.bench.test", "delivered", "250 ok", 250)
            assert recorded

        for number in range(warmup):
            await message(number)
        io_before, cpu_before, wall_before = proc_io(), time.process_time(), time.perf_counter()
        for number in range(warmup, warmup + messages):
            await message(number)
        io_after, cpu_after, wall_after = proc_io(), time.process_time(), time.perf_counter()
        for _ in range(reloads):
            meter._networks = (meter._networks[0] - 1e10, *meter._networks[1:])  # as if NETWORKS_TTL had passed
            assert await meter.account_for_client(CLIENT) == "bench"
    finally:
        await store.close()
    per = max(messages, 1)
    return {
        "messages": messages,
        "read_syscalls": (io_after["syscr"] - io_before["syscr"]) / per,
        "write_syscalls": (io_after["syscw"] - io_before["syscw"]) / per,
        "read_bytes": (io_after["rchar"] - io_before["rchar"]) / per,
        "written_bytes": (io_after["wchar"] - io_before["wchar"]) / per,
        "cpu_ms": 1000 * (cpu_after - cpu_before) / per,
        "wall_ms": 1000 * (wall_after - wall_before) / per,
    }


def prepare(kind: str, directory: Path, accounts: int, events: int) -> None:
    """An empty directory (the store is created at open), or a private copy of the big fixture."""
    for leftover in directory.glob("meter.db*"):
        leftover.unlink()
    if kind == "big":
        fixture = big_store.build(big_store.DEFAULT_CACHE, accounts, events)
        big_store.copy_fixture(fixture, directory / "meter.db")


def child(args: argparse.Namespace, extra: list[str], callgrind_out: Path | None = None) -> dict[str, float]:
    """One measurement in a fresh process (under callgrind if asked); its JSON."""
    argv = [sys.executable, str(BENCH), "--one", "--dir", str(args.dir), *extra]
    if callgrind_out is not None:
        argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={callgrind_out}", *argv]
    env = dict(os.environ, PYTHONHASHSEED="0")
    done = subprocess.run(argv, check=False, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"measurement failed ({done.returncode}): {done.stderr[-2000:]}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    if callgrind_out is not None:
        match = re.search(r"Collected : (\d+)", done.stderr)
        if match is None:
            raise SystemExit(f"no instruction count in callgrind's output: {done.stderr[-1000:]}")
        result["instructions"] = int(match.group(1))
    return result


def compare(args: argparse.Namespace) -> None:
    stores = ("empty", "big")
    native: dict[str, list[dict[str, float]]] = {kind: [] for kind in stores}
    for round_ in range(args.rounds):
        for kind in stores if round_ % 2 == 0 else reversed(stores):  # alternating: ABBA...
            prepare(kind, args.dir, args.accounts, args.events)
            native[kind].append(child(args, ["--messages", str(args.messages), "--warmup", str(args.warmup)]))
            print(f"  round {round_ + 1} {kind}: {native[kind][-1]}", flush=True)
    if args.rounds > 0:
        print_native(args, native)
    if args.callgrind:
        count_instructions(args)


def print_native(args: argparse.Namespace, native: dict[str, list[dict[str, float]]]) -> None:
    print(f"\n== meter path per message, native, {args.messages} messages after {args.warmup} warm-up, in process")
    print(f"{'':<24}{'empty':>12}{'big':>12}{'big/empty':>11}")
    for key in ("read_syscalls", "write_syscalls", "read_bytes", "written_bytes", "cpu_ms", "wall_ms"):
        empty = [run[key] for run in native["empty"]]
        big = [run[key] for run in native["big"]]
        ratios = [b / e if e else float("nan") for e, b in zip(empty, big)]
        best = min(big) / min(empty) if min(empty) else float("nan")
        print(
            f"{key:<24}{min(empty):>12.3f}{min(big):>12.3f}{best:>10.3f}x"
            f"   pairs: {', '.join(f'{r:.3f}' for r in ratios)}"
        )


def count_instructions(args: argparse.Namespace) -> None:
    stores = ("empty", "big")
    counts: dict[str, float] = {}
    reload_counts: dict[str, float] = {}
    runs = {"base": (0, 0), "messages": (args.callgrind_messages, 0), "reloads": (0, args.callgrind_reloads)}
    for kind in stores:
        totals = {}
        for label, (messages, reloads) in runs.items():
            prepare(kind, args.dir, args.accounts, args.events)
            out = args.dir / f"callgrind.{kind}.{label}.out"
            extra = ["--messages", str(messages), "--warmup", str(args.warmup), "--reloads", str(reloads), "--frozen"]
            run = child(args, extra, out)
            totals[label] = run["instructions"]
            print(
                f"  callgrind {kind}, {messages} messages, {reloads} reloads:"
                f" {run['instructions']:,} instructions ({out})",
                flush=True,
            )
        counts[kind] = (totals["messages"] - totals["base"]) / args.callgrind_messages
        reload_counts[kind] = (totals["reloads"] - totals["base"]) / args.callgrind_reloads
    print(f"\n== instructions (callgrind; differences of runs with and without {args.callgrind_messages} messages)")
    print(f"{'':<34}{'empty':>14}{'big':>14}{'big/empty':>11}")
    print(
        f"{'per message':<34}{counts['empty']:>14,.0f}{counts['big']:>14,.0f}{counts['big'] / counts['empty']:>10.3f}x"
    )
    print(f"{'per reload of the bound networks':<34}{reload_counts['empty']:>14,.0f}{reload_counts['big']:>14,.0f}")
    for rate in (100, 300):
        share = {kind: reload_counts[kind] / (rate * NETWORKS_TTL) for kind in stores}
        total = {kind: counts[kind] + share[kind] for kind in stores}
        print(
            f"{f'per message with reloads, {rate}/s':<34}{total['empty']:>14,.0f}{total['big']:>14,.0f}"
            f"{total['big'] / total['empty']:>10.3f}x   (a reload every {NETWORKS_TTL:g} s per relay process)"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=4, help="native runs per store, alternating")
    parser.add_argument("--callgrind", action="store_true", help="also count instructions under callgrind")
    parser.add_argument("--callgrind-messages", type=int, default=300)
    parser.add_argument("--callgrind-reloads", type=int, default=20)
    parser.add_argument("--reloads", type=int, default=0, help="with --one: reloads of the bound networks after")
    parser.add_argument("--frozen", action="store_true", help="with --one: no reload while the messages run")
    parser.add_argument("--accounts", type=int, default=big_store.DEFAULT_ACCOUNTS)
    parser.add_argument("--events", type=int, default=big_store.DEFAULT_EVENTS)
    parser.add_argument("--dir", type=Path, help="work directory (default: a temporary one)")
    parser.add_argument("--store", choices=("empty", "big"), help="with --one: prepare this store first")
    parser.add_argument("--one", action="store_true", help="one measurement in this process, printed as JSON")
    args = parser.parse_args(argv)
    if args.one:
        if args.store is not None:
            prepare(args.store, args.dir, args.accounts, args.events)
        import uvloop

        print(json.dumps(uvloop.run(one_run(args.dir, args.warmup, args.messages, args.reloads, args.frozen))))
        return 0
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
        compare(args)
        return 0
    with tempfile.TemporaryDirectory(prefix="meter-path.") as directory:
        args.dir = Path(directory)
        compare(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
