"""SMTP load client that times the reply to the end of DATA.

smtp-source drives throughput but cannot say how long a server takes to answer
the final "." (the moment a relay fsyncs, meters and queues the message), which
is the latency an application feels per message. This client does the same
load as `smtp-source -s S -l L -m M`: S concurrent sessions, one connection per
message, plain lockstep SMTP (EHLO, MAIL, RCPT, DATA, ".", QUIT), and records
the time from writing ".\\r\\n" to reading the complete reply.

Lockstep by default: smtp-source does not pipeline ("No SMTP command
pipelining support", its manual says), so both drivers put the same command
pattern on the server. `--pipelining` makes a pipelining client (RFC 2920), as
Postfix's smtp client is when the server offers PIPELINING: MAIL, RCPT and DATA
in one write, their replies read in order, then the message; `auto` pipelines
only where EHLO's reply offers PIPELINING, `on` always does (a server that reads
its input in order, as aiosmtpd does, answers a pipelined group correctly without
offering it). bench/run's BENCH_PIPELINING uses this client for both passes.

Run standalone: python bench/smtpload.py --port 2525 --messages 5000 [--pipelining auto|on]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from email.utils import formatdate


class SmtpError(RuntimeError):
    """The server answered something other than the expected reply class."""


@dataclass(frozen=True)
class LoadSpec:
    """What to send, where: the same knobs smtp-source has."""

    host: str
    port: int
    messages: int
    sessions: int
    size: int
    sender: str
    recipient: str
    helo: str = "client.bench.test"
    timeout: float = 60.0
    pipelining: str = "off"  # off: lockstep; auto: when the server offers PIPELINING; on: always


@dataclass
class LoadResult:
    """Per-message latencies (seconds) and failures of one load run."""

    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    wall: float = 0.0
    pipelined: int = 0  # messages whose MAIL, RCPT and DATA went in one write

    def summary(self) -> dict[str, object]:
        """Percentiles in milliseconds; rates per second of wall time."""
        ordered = sorted(self.latencies)
        sent = len(ordered)
        return {
            "messages": sent,
            "errors": len(self.errors),
            "first_errors": self.errors[:5],
            "wall_s": round(self.wall, 3),
            "accepted_per_s": round(sent / self.wall, 1) if self.wall > 0 else 0.0,
            "p50_ms": round(percentile(ordered, 50) * 1000, 3),
            "p99_ms": round(percentile(ordered, 99) * 1000, 3),
            "max_ms": round(ordered[-1] * 1000, 3) if ordered else 0.0,
            "pipelined": self.pipelined,
        }


def percentile(ordered: list[float], pct: float) -> float:
    """Nearest-rank percentile of an already sorted list (0.0 for an empty one)."""
    if not ordered:
        return 0.0
    rank = max(1, -(-len(ordered) * pct // 100))  # ceil without floats drifting
    return ordered[int(rank) - 1]


def message_bytes(spec: LoadSpec, number: int) -> bytes:
    """Headers like smtp-source's, `size` bytes of body in CRLF lines, then the final ".".

    No body line starts with ".", so no dot-stuffing is needed.
    """
    headers = (
        f"From: <{spec.sender}>\r\n"
        f"To: <{spec.recipient}>\r\n"
        f"Date: {formatdate(localtime=False)}\r\n"
        f"Message-Id: <{number}.{time.time_ns()}@{spec.helo}>\r\n"
        f"Subject: bench {number}\r\n\r\n"
    ).encode()
    line = b"x" * 76 + b"\r\n"
    body = (line * (spec.size // len(line) + 1))[: max(spec.size - 2, 0)] + b"\r\n"
    return headers + body + b".\r\n"


async def read_reply(reader: asyncio.StreamReader, lines: list[str] | None = None) -> tuple[int, str]:
    """One (possibly multi-line) SMTP reply: its code and its last line (every line into `lines`)."""
    while True:
        line = await reader.readline()
        if not line:
            raise SmtpError("connection closed by the server")
        text = line.decode("ascii", "replace").rstrip("\r\n")
        if lines is not None:
            lines.append(text)
        if len(text) < 4 or text[3] != "-":
            return int(text[:3]), text


async def command(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: str, expect: int) -> None:
    """Send one command and require a reply of the expected class (2 or 3)."""
    writer.write(line.encode() + b"\r\n")
    code, text = await read_reply(reader)
    if code // 100 != expect:
        raise SmtpError(f"{line.split(':')[0]} -> {text}")


async def pipelined_envelope(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, spec: LoadSpec) -> None:
    """RFC 2920: MAIL, RCPT and DATA in one write, then their three replies in order."""
    writer.write(f"MAIL FROM:<{spec.sender}>\r\nRCPT TO:<{spec.recipient}>\r\nDATA\r\n".encode())
    replies = [await read_reply(reader) for _ in range(3)]
    for (code, text), name, expect in zip(replies, ("MAIL", "RCPT", "DATA"), (2, 2, 3)):
        if code // 100 != expect:
            if replies[2][0] == 354:  # DATA was taken though MAIL or RCPT was not: end it empty
                writer.write(b".\r\n")
                await read_reply(reader)
            raise SmtpError(f"{name} (pipelined) -> {text}")


async def send_one(spec: LoadSpec, number: int) -> tuple[float, bool]:
    """One connection, one message; returns seconds from '.' to the server's reply, and
    whether the envelope went pipelined."""
    reader, writer = await asyncio.open_connection(spec.host, spec.port)
    try:
        code, text = await read_reply(reader)
        if code != 220:
            raise SmtpError(f"banner -> {text}")
        writer.write(f"EHLO {spec.helo}\r\n".encode())
        ehlo: list[str] = []
        code, text = await read_reply(reader, ehlo)
        if code // 100 != 2:
            raise SmtpError(f"EHLO -> {text}")
        offered = any(line[4:].strip().upper() == "PIPELINING" for line in ehlo)
        pipelined = spec.pipelining == "on" or (spec.pipelining == "auto" and offered)
        if pipelined:
            await pipelined_envelope(reader, writer, spec)
        else:
            await command(reader, writer, f"MAIL FROM:<{spec.sender}>", 2)
            await command(reader, writer, f"RCPT TO:<{spec.recipient}>", 2)
            await command(reader, writer, "DATA", 3)
        writer.write(message_bytes(spec, number))
        sent_at = time.perf_counter()
        code, text = await read_reply(reader)
        replied_at = time.perf_counter()
        if code // 100 != 2:
            raise SmtpError(f"end of DATA -> {text}")
        await command(reader, writer, "QUIT", 2)
        return replied_at - sent_at, pipelined
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, OSError):
            pass


async def session(spec: LoadSpec, numbers: asyncio.Queue[int], result: LoadResult) -> None:
    """One of `sessions` concurrent senders, taking message numbers until none are left."""
    while True:
        try:
            number = numbers.get_nowait()
        except asyncio.QueueEmpty:
            return
        try:
            latency, pipelined = await asyncio.wait_for(send_one(spec, number), spec.timeout)
            result.latencies.append(latency)
            result.pipelined += pipelined
        except (TimeoutError, SmtpError, OSError) as error:
            result.errors.append(f"message {number}: {error!r}")


async def run_load(spec: LoadSpec) -> LoadResult:
    """Send `messages` messages over `sessions` concurrent sessions."""
    numbers: asyncio.Queue[int] = asyncio.Queue()
    for number in range(spec.messages):
        numbers.put_nowait(number)
    result = LoadResult()
    started = time.perf_counter()
    await asyncio.gather(*(session(spec, numbers, result) for _ in range(spec.sessions)))
    result.wall = time.perf_counter() - started
    return result


def parse_args(argv: list[str] | None) -> LoadSpec:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--messages", "-m", type=int, default=1000)
    parser.add_argument("--sessions", "-s", type=int, default=20)
    parser.add_argument("--size", "-l", type=int, default=1024)
    parser.add_argument("--from", dest="sender", default="sender@bench.test")
    parser.add_argument("--to", dest="recipient", default="rcpt@sink.bench.test")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument(
        "--pipelining",
        choices=("off", "auto", "on"),
        default="off",
        help="send MAIL, RCPT and DATA in one write: never (default), when offered, always",
    )
    args = parser.parse_args(argv)
    return LoadSpec(
        host=args.host,
        port=args.port,
        messages=args.messages,
        sessions=args.sessions,
        size=args.size,
        sender=args.sender,
        recipient=args.recipient,
        timeout=args.timeout,
        pipelining=args.pipelining,
    )


def main(argv: list[str] | None = None) -> int:
    """Print the summary as one JSON object; exit 1 if any message failed."""
    spec = parse_args(argv)
    result = asyncio.run(run_load(spec))
    json.dump(result.summary(), sys.stdout)
    sys.stdout.write("\n")
    return 1 if result.errors else 0


if __name__ == "__main__":
    sys.exit(main())
