"""Shared fixtures: a real upstream SMTP server and a real relay on loopback sockets."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiosmtpd.smtp import SMTP, Envelope, Session
from hypothesis import settings

from mailmeter.config import load_config
from mailmeter.node import Relay
from mailmeter.serve import build_relay

# CI runs the property tests derandomized (the same examples every run: no flaky red);
# locally they explore new examples each run.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI") == "true":
    settings.load_profile("ci")

PASSWORD = "correct horse battery staple"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    mail_options: list[str] = field(default_factory=list)


@dataclass
class UpstreamHandler:
    """An upstream MTA that records what it gets; rcpt_replies forces a reply per address.

    It offers PIPELINING, as Postfix does (aiosmtpd reads commands in order from its
    stream, so it can; it does not say so itself): delivery sends each transaction's
    commands in one write. pipelining=False: the upstream of one command at a time.
    """

    messages: list[Received] = field(default_factory=list)
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    data_reply: str = "250 2.0.0 Ok: queued upstream"
    pipelining: bool = True

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        if self.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = self.rcpt_replies.get(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.messages.append(
            Received(
                envelope.mail_from or "",
                list(envelope.rcpt_tos),
                envelope.original_content or b"",
                list(envelope.mail_options),
            )
        )
        self.arrived.set()
        return self.data_reply

    def delivered_to(self) -> list[str]:
        return [r for m in self.messages for r in m.rcpt_tos]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 15.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate():
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timed out; upstream has {len(self.messages)} messages")
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), 0.1)
            except TimeoutError:
                pass


@dataclass
class Upstream:
    port: int
    handler: UpstreamHandler
    server: asyncio.Server | None = None
    connections: int = 0

    def _session(self) -> SMTP:
        self.connections += 1
        return SMTP(self.handler, hostname="upstream.test", ident="upstream")

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            self._session,
            host="127.0.0.1",
            port=self.port,
            reuse_address=True,
        )

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = Upstream(port=free_port(), handler=UpstreamHandler())
    await up.start()
    yield up
    await up.stop()


def write_config(directory: Path, upstream_port: int, **overrides: Any) -> Path:
    """A test config: fast retries, listen on a free loopback port, plaintext AUTH allowed."""
    config: dict[str, Any] = {
        "node": {"name": "test-node", "region": "test"},
        "hostname": "relay.test",
        "listen": {"address": "127.0.0.1", "port": 0},
        "auth": {"allow_plaintext_on_loopback": True},
        "limits": {"message_size": 1_000_000, "recipients_per_message": 50},
        # Tests open many sessions from 127.0.0.1 and fail AUTH on purpose: keep the abuse
        # limits out of their way (tests/test_abuse.py sets its own).
        "abuse": {"max_connections_per_client": 1000, "auth_failure_delay": 0},
        "upstream": {"host": "127.0.0.1", "port": upstream_port, "tls": "none", "timeout": 5},
        "delivery": {
            "workers": 4,
            "retry_first_delay": 0.2,
            "retry_factor": 2,
            "retry_max_delay": 0.5,
            "max_age": 3600,
        },
        "database": {"path": "meter.db"},
        "spool": {"path": "spool"},
        "log": {"level": "warning"},
        "plans": {"small": {"email_quota": 1000}, "tiny": {"email_quota": 3}},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@dataclass
class RelayHarness:
    directory: Path
    upstream_port: int
    overrides: dict[str, Any]
    relay: Relay | None = None

    async def start(self) -> Relay:
        path = write_config(self.directory, self.upstream_port, **self.overrides)
        relay = build_relay(load_config(path))
        await relay.start()
        self.relay = relay
        return relay

    async def stop(self) -> None:
        if self.relay is not None:
            await self.relay.stop()
            self.relay = None

    @property
    def port(self) -> int:
        assert self.relay is not None
        return self.relay.port


@pytest.fixture
async def make_relay(tmp_path: Path) -> AsyncIterator[Callable[..., RelayHarness]]:
    harnesses: list[RelayHarness] = []

    def factory(upstream_port: int, **overrides: Any) -> RelayHarness:
        harness = RelayHarness(tmp_path, upstream_port, overrides)
        harnesses.append(harness)
        return harness

    yield factory
    for harness in harnesses:
        await harness.stop()


@pytest.fixture
async def relay(make_relay: Callable[..., RelayHarness], upstream: Upstream) -> AsyncIterator[RelayHarness]:
    harness = make_relay(upstream.port)
    await harness.start()
    yield harness


async def add_account(
    harness: RelayHarness,
    name: str = "app",
    plan: str = "small",
    domains: tuple[str, ...] = ("example.com",),
    networks: tuple[str, ...] = (),
    password: str | None = PASSWORD,
) -> None:
    assert harness.relay is not None
    await harness.relay.meter.add_account(name, password, plan, list(domains), list(networks))


# -- raw SMTP over a socket: for input a client library refuses to send ----------------

_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -])([^\r\n]*)")


class MalformedReply(AssertionError):
    """The server sent something that is not a well-formed SMTP reply (RFC 5321 4.2)."""


@dataclass
class Reply:
    code: int
    lines: list[bytes]

    @property
    def text(self) -> str:
        """The text after the code, lines joined by a newline."""
        return "\n".join(line[4:].decode("utf-8", "replace") for line in self.lines)


@dataclass
class RawSmtp:
    """One client connection that writes exactly the bytes it is given, and checks every
    reply line: three digits, then a space (last line) or a dash, the same code on every
    line of a multi-line reply, CRLF at the end and no other CR or LF."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    @classmethod
    async def open(cls, port: int, source: str | None = None) -> RawSmtp:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, local_addr=(source, 0) if source else None, limit=1 << 20
        )
        return cls(reader, writer)

    async def reply(self, timeout: float = 10.0) -> Reply:
        """One whole reply; EOFError if the server closed before sending one."""
        lines: list[bytes] = []
        while True:
            line = await asyncio.wait_for(self.reader.readuntil(b"\r\n"), timeout)
            match = _REPLY_LINE.fullmatch(line[:-2])
            if match is None:
                raise MalformedReply(f"not a reply line: {line!r}")
            if lines and int(match.group(1)) != int(lines[0][:3]):
                raise MalformedReply(f"code changes inside a multi-line reply: {lines + [line]!r}")
            lines.append(line[:-2])
            if match.group(2) == b" ":
                return Reply(int(match.group(1)), lines)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def command(self, line: str | bytes, timeout: float = 10.0) -> Reply:
        await self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return await self.reply(timeout)

    async def closed_by_server(self, timeout: float = 5.0) -> bool:
        """True when the server closes the connection within `timeout` (data before EOF is ignored)."""
        try:
            while await asyncio.wait_for(self.reader.read(65536), timeout):
                pass
        except (TimeoutError, ConnectionError):
            return False
        return True

    def close(self) -> None:
        self.writer.close()


async def settled_usage(meter: Any, account: str = "app", timeout: float = 5.0) -> Any:
    """The account's usage once the holds its sessions gave up are released.

    A session's RSET, QUIT or disconnect answers first and releases its hold after, in
    the background; the meter's reads see that release once it has committed."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        usage = (await meter.usage(account)).usage
        if usage.reserved == 0 or asyncio.get_running_loop().time() > deadline:
            return usage
        await asyncio.sleep(0.02)


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """In-process tests run on uvloop, the loop `mailmeter serve` runs on (mailmeter/cli.py):
    its transports are not asyncio's classes, and a relay bug of that kind showed only there."""
    import uvloop

    return {"uvloop": uvloop.new_event_loop}


async def eventually(check, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    """Wait until `check()` (a value or a coroutine) is true; AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)
