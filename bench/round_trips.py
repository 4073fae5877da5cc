"""Round trips per message on delivery's path: `mailmeter serve` -> counting proxy -> smtp-sink.

Issue 19 item 1 (pipelining out): a round trip is what the relay sends upstream before
it waits for a reply (a "turn"). A TCP proxy between the relay and smtp-sink counts the
turns of every upstream connection; the greeting's EHLO/HELO and QUIT are counted apart
(they are per connection, not per message). smtp-sink offers PIPELINING (with
`--no-pipelining` it runs with -p and does not). smtp-source submits the messages, as
bench/run does; the figure is message turns / messages the sink received. The wall time
and rate are printed too, as an indication only (the throughput figures are bench/run's).

    .venv/bin/python bench/round_trips.py --messages 3000 --recipients 1
    .venv/bin/python bench/round_trips.py --messages 3000 --recipients 3 --no-pipelining
    .venv/bin/python bench/round_trips.py --src /tmp/main-export    # another checkout's code

Needs smtp-source and smtp-sink (Debian package postfix) and mailmeter's dependencies in
the Python running it (or --python); as root (smtp-sink runs as nobody, as in bench/run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from services import (  # noqa: E402  (bench/ is not a package: run as bench/run runs its helpers)
    LOOPBACK,
    RECIPIENT,
    SENDER,
    MailmeterServer,
    PortAllocator,
    ProcessLedger,
    SmtpSink,
)

_PER_CONNECTION = (b"EHLO", b"HELO", b"QUIT", b"STARTTLS", b"AUTH")


@dataclass
class TurnCounter:
    """A TCP proxy to the sink counting each connection's client turns."""

    target: int
    message_turns: int = 0
    connection_turns: int = 0
    connections: int = 0
    open: int = 0  # connections not closed yet

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        up_reader, up_writer = await asyncio.open_connection(LOOPBACK, self.target)
        waiting = [False]  # the client has sent and not yet been answered: more of its bytes are the same turn

        async def client_to_sink() -> None:
            while data := await reader.read(1 << 20):
                if not waiting[0]:
                    waiting[0] = True
                    if data[:8].upper().startswith(_PER_CONNECTION):
                        self.connection_turns += 1
                    else:
                        self.message_turns += 1
                up_writer.write(data)
                await up_writer.drain()
            up_writer.close()

        async def sink_to_client() -> None:
            while data := await up_reader.read(1 << 20):
                waiting[0] = False
                writer.write(data)
                await writer.drain()
            writer.close()

        try:
            await asyncio.gather(client_to_sink(), sink_to_client())
        except ConnectionError:
            pass
        finally:
            self.open -= 1


async def run(args: argparse.Namespace) -> dict[str, object]:
    workdir = Path(tempfile.mkdtemp(prefix="round-trips-"))
    workdir.chmod(0o755)
    ledger = ProcessLedger(workdir)
    ports = PortAllocator(args.port_base)
    sink = SmtpSink(ledger, ports.take(), workdir / "sink.log", ("-p",) if args.no_pipelining else ())
    counter = TurnCounter(sink.port)
    proxy_port = ports.take()
    proxy = await asyncio.start_server(counter.serve, LOOPBACK, proxy_port)
    relay = MailmeterServer(
        ledger,
        workdir / "mailmeter",
        args.python,
        Path(args.src).resolve(),
        ports.take(),
        processes=args.processes,
        log_level="warning",
    )
    try:
        await asyncio.to_thread(sink.start)
        await asyncio.to_thread(relay.start, proxy_port)
        started = time.monotonic()
        source = await asyncio.create_subprocess_exec(
            "smtp-source",
            "-s",
            str(args.sessions),
            "-l",
            str(args.size),
            "-m",
            str(args.messages),
            "-r",
            str(args.recipients),
            "-f",
            SENDER,
            "-t",
            RECIPIENT,
            f"{LOOPBACK}:{relay.port}",
        )
        await source.wait()
        delivered_at = await asyncio.to_thread(sink.wait_for, args.messages, 600)
        if delivered_at is None:
            raise SystemExit(f"the sink got {sink.count} of {args.messages} messages")
        wall = delivered_at - started
        return {
            "code": str(args.src),
            "upstream": "smtp-sink -p (no PIPELINING)" if args.no_pipelining else "smtp-sink (PIPELINING)",
            "messages": sink.count,
            "recipients_per_message": args.recipients,
            "round_trips_per_message": round(counter.message_turns / sink.count, 3),
            "connection_round_trips": counter.connection_turns,
            "upstream_connections": counter.connections,
            "wall_s": round(wall, 2),
            "delivered_per_s_indicative": round(sink.count / wall, 1),
        }
    finally:
        await asyncio.to_thread(relay.stop)  # the proxy keeps serving while the relay drains
        await asyncio.to_thread(sink.stop)
        proxy.close()
        for _ in range(100):
            if not counter.open:
                break
            await asyncio.sleep(0.05)
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--recipients", type=int, default=1, help="smtp-source -r: recipients per message")
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1, help="mailmeter's listen.processes")
    parser.add_argument("--no-pipelining", action="store_true", help="smtp-sink -p: the upstream offers no PIPELINING")
    parser.add_argument("--src", default=str(Path(__file__).resolve().parent.parent), help="the code under test")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--port-base", type=int, default=26000)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args)), indent=2))


if __name__ == "__main__":
    main()
