"""Pipelining out (relay/pipelining.py): one transaction's commands in one write, over real sockets.

Upstreams: aiosmtpd (told to offer PIPELINING, and without it: the fallback), a
hand-written server for what a correct server never does (354 with nobody to send to,
replies cut into pieces or all in one packet, a connection dropped mid-group, a reply
that is not SMTP), Postfix's smtp-sink (with and without PIPELINING, without ESMTP,
dropping or closing with 421 mid-group), and a private Postfix instance refusing
senders, recipients and DATA from access tables, relaying what it takes to smtp-sink.

`WireTap`, a TCP proxy in front of an upstream, records what passes read by read:
a "turn" is what the client sends before it waits for the server, so the turns of a
transaction are its round trips, and the group is seen arriving in one read.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiosmtplib
import pytest
from aiosmtpd.smtp import SMTP

from bench.services import PostfixInstance, ProcessLedger
from mailmeter.relay.delivery import Outcome, UpstreamConfig, connect, converse, transaction
from mailmeter.relay.pipelining import PipeliningSMTP
from tests.conftest import PASSWORD, Upstream, UpstreamHandler, add_account, free_port

MESSAGE = (
    b"From: app@example.com\r\nTo: a@dest.test\r\nSubject: pipelined\r\nMessage-ID: <p1@example.com>\r\n"
    b"\r\n.dot\r\nhello\r\n"
)
SENDER = "app@example.com"
STUFFED = MESSAGE.replace(b"\r\n.dot", b"\r\n..dot") + b".\r\n"  # as it goes on the wire


# -- a tap on the wire ---------------------------------------------------------------


@dataclass
class WireTap:
    """A TCP proxy to 127.0.0.1:target recording, per connection, each read in each direction."""

    target: int
    port: int = field(default_factory=free_port)
    connections: list[list[tuple[str, bytes]]] = field(default_factory=list)
    server: asyncio.Server | None = None
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def stop(self) -> None:
        for writer in self._writers:
            writer.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target)
        self._writers += [client_writer, server_writer]
        log: list[tuple[str, bytes]] = []
        self.connections.append(log)

        async def pump(side: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while data := await reader.read(1 << 20):
                    log.append((side, data))
                    writer.write(data)
                    await writer.drain()
            except ConnectionError:
                pass
            finally:
                writer.close()

        await asyncio.gather(pump("client", client_reader, server_writer), pump("server", server_reader, client_writer))

    def client_reads(self, connection: int = -1) -> list[bytes]:
        return [data for side, data in self.connections[connection] if side == "client"]

    def turns(self, connection: int = -1) -> list[bytes]:
        """What the client sent between two waits for the server, in order."""
        turns: list[bytes] = []
        previous = ""
        for side, data in self.connections[connection]:
            if side == "client":
                if previous == "client":
                    turns[-1] += data
                else:
                    turns.append(data)
            previous = side
        return turns

    def forget(self) -> None:
        """Start counting afresh on every connection (after a session's EHLO, say)."""
        for log in self.connections:
            log.clear()


TapTo = Callable[[int], Awaitable[WireTap]]


@pytest.fixture
async def tap_to() -> AsyncIterator[TapTo]:
    """Starts WireTaps in front of ports; stops them after the test."""
    started: list[WireTap] = []

    async def start(port: int) -> WireTap:
        tap = WireTap(port)
        await tap.start()
        started.append(tap)
        return tap

    yield start
    for tap in started:
        await tap.stop()


@pytest.fixture
async def tapped(tap_to: TapTo) -> AsyncIterator[tuple[RefusingUpstream, WireTap]]:
    """aiosmtpd offering PIPELINING, behind a WireTap."""
    upstream = RefusingUpstream(port=free_port(), handler=UpstreamHandler())
    await upstream.start()
    yield upstream, await tap_to(upstream.port)
    await upstream.stop()


class RefusingSession(SMTP):
    """aiosmtpd refusing MAIL, or the DATA command itself (a handler sees DATA only at the
    end of data), as its upstream says."""

    def __init__(self, upstream: RefusingUpstream, handler: UpstreamHandler) -> None:
        super().__init__(handler, hostname="upstream.test", ident="upstream")
        self.upstream = upstream

    async def smtp_MAIL(self, arg: str) -> None:
        if self.upstream.mail_reply is not None:
            await self.push(self.upstream.mail_reply)
            return
        await super().smtp_MAIL(arg)

    async def smtp_DATA(self, arg: str) -> None:
        if self.upstream.data_command_reply is not None and self.envelope is not None and self.envelope.rcpt_tos:
            await self.push(self.upstream.data_command_reply)
            return
        await super().smtp_DATA(arg)


@dataclass
class RefusingUpstream(Upstream):
    """conftest's upstream that can also refuse MAIL and the DATA command."""

    mail_reply: str | None = None
    data_command_reply: str | None = None

    def _session(self) -> SMTP:
        self.connections += 1
        return RefusingSession(self, self.handler)


async def session(port: int) -> PipeliningSMTP:
    """delivery's own connection (relay/delivery.connect), EHLO done."""
    client = await connect(UpstreamConfig(host="127.0.0.1", port=port, timeout=5), "relay.test")
    assert isinstance(client, PipeliningSMTP)
    await client.ehlo()
    return client


def replies(errors: dict[str, aiosmtplib.SMTPResponse]) -> dict[str, str]:
    return {r: str(reply) for r, reply in errors.items()}


def group(recipients: list[str], size: int = len(MESSAGE)) -> bytes:
    lines = [f"MAIL FROM:<{SENDER}> SIZE={size}"] + [f"RCPT TO:<{r}>" for r in recipients] + ["DATA"]
    return "".join(line + "\r\n" for line in lines).encode()


# -- aiosmtpd ----------------------------------------------------------------------------


async def test_all_accepted_in_one_write_and_two_round_trips(tapped: tuple[RefusingUpstream, WireTap]) -> None:
    upstream, tap = tapped
    client = await session(tap.port)
    tap.forget()
    recipients = ["a@dest.test", "b@dest.test", "c@dest.test"]
    assert await transaction(client, SENDER, recipients, MESSAGE, False) == {}
    assert tap.client_reads()[0] == group(recipients)  # MAIL, every RCPT and DATA: one read upstream
    assert tap.turns() == [group(recipients), STUFFED]  # two round trips: the group, then the message
    (received,) = upstream.handler.messages
    assert received.rcpt_tos == recipients and received.content == MESSAGE
    assert await transaction(client, SENDER, ["d@dest.test"], MESSAGE, False) == {}  # the connection goes on
    assert len(tap.turns()) == 4
    client.close()


async def test_without_pipelining_one_command_at_a_time(tapped: tuple[RefusingUpstream, WireTap]) -> None:
    upstream, tap = tapped
    upstream.handler.pipelining = False
    upstream.handler.rcpt_replies["b@dest.test"] = "550 5.1.1 No such user here"
    client = await session(tap.port)
    assert not client.pipelining
    tap.forget()
    recipients = ["a@dest.test", "b@dest.test", "c@dest.test"]
    errors = await transaction(client, SENDER, recipients, MESSAGE, False)
    assert replies(errors) == {"b@dest.test": "550 5.1.1 No such user here"}
    assert [t.split(b" ")[0] for t in tap.turns()[:5]] == [b"MAIL", b"RCPT", b"RCPT", b"RCPT", b"DATA\r\n"]
    assert len(tap.turns()) == 6  # 3 + recipients: the body is the last
    assert upstream.handler.messages[0].rcpt_tos == ["a@dest.test", "c@dest.test"]
    client.close()


async def test_refused_recipients_in_the_group_keep_their_own_replies(tapped: tuple[RefusingUpstream, WireTap]) -> None:
    upstream, tap = tapped
    upstream.handler.rcpt_replies["later@dest.test"] = "450 4.2.1 Mailbox busy, try later"
    upstream.handler.rcpt_replies["gone@dest.test"] = "550 5.1.1 No such user here"
    upstream.handler.rcpt_replies["full@dest.test"] = "452 4.2.2 Mailbox full"
    client = await session(tap.port)
    tap.forget()
    recipients = ["later@dest.test", "ok@dest.test", "gone@dest.test", "full@dest.test", "fine@dest.test"]
    errors = await transaction(client, SENDER, recipients, MESSAGE, False)
    assert replies(errors) == {
        "later@dest.test": "450 4.2.1 Mailbox busy, try later",
        "gone@dest.test": "550 5.1.1 No such user here",
        "full@dest.test": "452 4.2.2 Mailbox full",
    }
    assert len(tap.turns()) == 2 and tap.turns()[0] == group(recipients)
    assert upstream.handler.messages[0].rcpt_tos == ["ok@dest.test", "fine@dest.test"]
    client.close()


async def test_all_refused_the_body_is_never_sent(tapped: tuple[RefusingUpstream, WireTap]) -> None:
    """Every RCPT refused: aiosmtpd refuses the DATA (503); the client sends no message,
    each recipient keeps its reply, and after converse's RSET the connection carries the next."""
    upstream, tap = tapped
    upstream.handler.rcpt_replies["gone@dest.test"] = "550 5.1.1 No such user here"
    upstream.handler.rcpt_replies["later@dest.test"] = "450 4.2.1 Try later"
    client = await session(tap.port)
    tap.forget()
    connection: list[aiosmtplib.SMTP | None] = [client]
    upstream_config = UpstreamConfig(host="127.0.0.1", port=tap.port, timeout=5)
    outcomes = await converse(
        upstream_config, "relay.test", SENDER, ["gone@dest.test", "later@dest.test"], MESSAGE, connection, False
    )
    assert outcomes == {
        "gone@dest.test": Outcome("hard_bounced", "550 5.1.1 No such user here"),
        "later@dest.test": Outcome("deferred", "450 4.2.1 Try later"),
    }
    assert tap.turns() == [group(["gone@dest.test", "later@dest.test"]), b"RSET\r\n"]  # no message data
    assert upstream.handler.messages == []
    outcomes = await converse(upstream_config, "relay.test", SENDER, ["ok@dest.test"], MESSAGE, connection, False)
    assert outcomes == {"ok@dest.test": Outcome("delivered", "250")} and connection[0] is client
    client.close()


async def test_refused_mail_fails_every_recipient_with_its_reply(tapped: tuple[RefusingUpstream, WireTap]) -> None:
    upstream, tap = tapped
    upstream.mail_reply = "553 5.7.1 Sender refused here"
    client = await session(tap.port)
    tap.forget()
    errors = await transaction(client, SENDER, ["a@dest.test", "b@dest.test"], MESSAGE, False)
    # aiosmtpd answered each RCPT and the DATA "503 need MAIL/RCPT": those are consequences
    assert replies(errors) == {
        "a@dest.test": "553 5.7.1 Sender refused here",
        "b@dest.test": "553 5.7.1 Sender refused here",
    }
    assert len(tap.turns()) == 1 and upstream.handler.messages == []
    client.close()


async def test_refused_data_command_is_the_result_of_the_accepted_recipients_only(
    tapped: tuple[RefusingUpstream, WireTap],
) -> None:
    upstream, tap = tapped
    upstream.data_command_reply = "451 4.3.0 Not now"
    upstream.handler.rcpt_replies["gone@dest.test"] = "550 5.1.1 No such user here"
    client = await session(tap.port)
    tap.forget()
    errors = await transaction(client, SENDER, ["a@dest.test", "gone@dest.test", "b@dest.test"], MESSAGE, False)
    assert replies(errors) == {
        "a@dest.test": "451 4.3.0 Not now",
        "b@dest.test": "451 4.3.0 Not now",
        "gone@dest.test": "550 5.1.1 No such user here",
    }
    assert len(tap.turns()) == 1 and upstream.handler.messages == []
    client.close()


async def test_refused_end_of_data_is_the_result_of_the_accepted_recipients_only(
    tapped: tuple[RefusingUpstream, WireTap],
) -> None:
    upstream, tap = tapped
    upstream.handler.data_reply = "554 5.7.1 Message content refused"
    upstream.handler.rcpt_replies["later@dest.test"] = "450 4.2.1 Try later"
    client = await session(tap.port)
    errors = await transaction(client, SENDER, ["a@dest.test", "later@dest.test"], MESSAGE, False)
    assert replies(errors) == {
        "a@dest.test": "554 5.7.1 Message content refused",
        "later@dest.test": "450 4.2.1 Try later",
    }
    client.close()


async def test_the_same_results_one_command_at_a_time(tapped: tuple[RefusingUpstream, WireTap]) -> None:
    """The fallback gives each recipient the same outcome as the pipelined group, a refused
    DATA included. (Before, a refused DATA was every recipient's result: the one refused
    450 at RCPT came out hard-bounced with the DATA's 554.)"""
    upstream, tap = tapped
    upstream.data_command_reply = "554 5.7.1 Not from you"
    upstream.handler.rcpt_replies["later@dest.test"] = "450 4.2.1 Try later"
    config = UpstreamConfig(host="127.0.0.1", port=tap.port, timeout=5)
    results = []
    for pipelining in (True, False):
        upstream.handler.pipelining = pipelining
        connection: list[aiosmtplib.SMTP | None] = [None]
        results.append(
            await converse(config, "relay.test", SENDER, ["a@dest.test", "later@dest.test"], MESSAGE, connection, False)
        )
        assert isinstance(connection[0], PipeliningSMTP) and connection[0].pipelining is pipelining
        connection[0].close()
    assert (
        results[0]
        == results[1]
        == {
            "a@dest.test": Outcome("hard_bounced", "554 5.7.1 Not from you"),
            "later@dest.test": Outcome("deferred", "450 4.2.1 Try later"),
        }
    )


# -- a hand-written server, for what correct servers do not do -----------------------------


@dataclass
class ScriptedUpstream:
    """An SMTP server offering PIPELINING that answers each command from its fields.

    rcpt: reply per address (default 250); mail/data: the MAIL and DATA replies (DATA 354
    even with no recipient taken, unless told otherwise); end: the reply to the end of data;
    drop_at: close the connection, unanswered, on reaching a command that starts so (in
    the first drop_sessions sessions); a 421 reply closes it too; piece: write the
    replies in pieces of this many bytes, each its own TCP segment (default: the replies
    to all the commands of one read in one write). Records the commands and message data.
    """

    port: int = field(default_factory=free_port)
    mail: bytes = b"250 2.1.0 Ok"
    rcpt: dict[str, bytes] = field(default_factory=dict)
    data: bytes = b"354 End data with <CR><LF>.<CR><LF>"
    end: bytes = b"250 2.0.0 Ok: queued"
    drop_at: bytes | None = None
    drop_sessions: int = 1 << 30
    piece: int | None = None
    sessions: int = 0
    commands: list[bytes] = field(default_factory=list)
    messages: list[bytes] = field(default_factory=list)
    server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    def answer(self, line: bytes) -> bytes | None:
        verb = line[:4].upper()
        if verb == b"EHLO":
            return b"250-scripted.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 10000000"
        if verb == b"MAIL":
            return self.mail
        if verb == b"RCPT":
            return self.rcpt.get(line.split(b":", 1)[1].strip(b"<> ").decode(), b"250 2.1.5 Ok")
        if verb == b"DATA":
            return self.data
        if verb == b"QUIT":
            return b"221 2.0.0 Bye"
        return b"250 2.0.0 Ok"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.sessions += 1
        drop_at = self.drop_at if self.sessions <= self.drop_sessions else None
        try:
            writer.write(b"220 scripted.test ESMTP\r\n")
            buffered = b""
            while chunk := await reader.read(65536):
                buffered += chunk
                out = b""
                while b"\r\n" in buffered:
                    line, buffered = buffered.split(b"\r\n", 1)
                    self.commands.append(line)
                    if drop_at is not None and line.upper().startswith(drop_at):
                        await self._write(writer, out)
                        return
                    reply = self.answer(line)
                    out += reply + b"\r\n"
                    if reply.startswith(b"421") or line.upper() == b"QUIT":
                        await self._write(writer, out)
                        return
                    if line.upper() == b"DATA" and reply.startswith(b"354"):
                        await self._write(writer, out)
                        while b"\r\n.\r\n" not in b"\r\n" + buffered:
                            more = await reader.read(65536)
                            if not more:
                                return
                            buffered += more
                        end = (b"\r\n" + buffered).index(b"\r\n.\r\n") + 3  # just past the ".\r\n"
                        self.messages.append(buffered[:end])
                        buffered = buffered[end:]
                        out = self.end + b"\r\n"
                await self._write(writer, out)
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _write(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        if self.piece is None:
            writer.write(data)
            await writer.drain()
            return
        for start in range(0, len(data), self.piece):
            writer.write(data[start : start + self.piece])
            await writer.drain()
            await asyncio.sleep(0.005)  # each piece its own segment


@pytest.fixture
async def scripted() -> AsyncIterator[ScriptedUpstream]:
    upstream = ScriptedUpstream()
    await upstream.start()
    yield upstream
    await upstream.stop()


async def test_354_with_no_recipient_taken_gets_a_lone_dot(scripted: ScriptedUpstream) -> None:
    """RFC 2920 3.1: a server may accept DATA although it refused every RCPT; the client
    then sends the end of data alone, no message, and the transaction has failed."""
    scripted.rcpt = {"gone@dest.test": b"550 5.1.1 No such user", "later@dest.test": b"451 4.3.0 Later"}
    client = await session(scripted.port)
    errors = await transaction(client, SENDER, ["gone@dest.test", "later@dest.test"], MESSAGE, False)
    assert replies(errors) == {"gone@dest.test": "550 5.1.1 No such user", "later@dest.test": "451 4.3.0 Later"}
    assert scripted.messages == [b".\r\n"]
    client.close()


async def test_354_after_a_refused_mail_gets_a_lone_dot(scripted: ScriptedUpstream) -> None:
    scripted.mail = b"451 4.3.0 Sender check unavailable"
    client = await session(scripted.port)
    errors = await transaction(client, SENDER, ["a@dest.test"], MESSAGE, False)
    assert replies(errors) == {"a@dest.test": "451 4.3.0 Sender check unavailable"}
    assert scripted.messages == [b".\r\n"]
    client.close()


async def test_replies_cut_into_pieces(scripted: ScriptedUpstream, tap_to: TapTo) -> None:
    """Every reply (a multi-line EHLO, the group's, the end of data's) arrives 3 bytes at a time."""
    scripted.piece = 3
    scripted.rcpt = {"gone@dest.test": b"550-5.1.1 No such user\r\n550 5.1.1 Really"}
    tap = await tap_to(scripted.port)
    client = await session(tap.port)
    assert client.pipelining
    tap.forget()
    errors = await transaction(client, SENDER, ["a@dest.test", "gone@dest.test"], MESSAGE, False)
    assert replies(errors) == {"gone@dest.test": "550 5.1.1 No such user\n5.1.1 Really"}
    assert scripted.messages == [STUFFED]
    server_reads = [data for side, data in tap.connections[-1] if side == "server"]
    assert len(server_reads) > 10  # the five replies (six lines) came in many pieces
    client.close()


async def test_replies_all_in_one_packet(scripted: ScriptedUpstream, tap_to: TapTo) -> None:
    """The group's replies (multi-line ones among them) come in one segment: all are taken, in order."""
    scripted.rcpt = {"b@dest.test": b"452-4.5.3 Too many\r\n452 4.5.3 recipients", "d@dest.test": b"550 5.1.1 Gone"}
    tap = await tap_to(scripted.port)
    client = await session(tap.port)
    tap.forget()
    recipients = ["a@dest.test", "b@dest.test", "c@dest.test", "d@dest.test"]
    errors = await transaction(client, SENDER, recipients, MESSAGE, False)
    assert replies(errors) == {"b@dest.test": "452 4.5.3 Too many\n4.5.3 recipients", "d@dest.test": "550 5.1.1 Gone"}
    server_reads = [data for side, data in tap.connections[-1] if side == "server"]
    assert server_reads[0].count(b"\r\n") == 7  # MAIL, four RCPT (two lines for one) and DATA: one read
    client.close()


async def test_connection_dropped_mid_group(scripted: ScriptedUpstream) -> None:
    """The server closes on reading the second RCPT: nothing was sent, every recipient is
    deferred and the connection dropped. On a reused connection (an upstream that closed
    it while idle, say) the message is tried once more on a new one."""
    scripted.drop_at, scripted.drop_sessions = b"RCPT TO:<B@", 2
    config = UpstreamConfig(host="127.0.0.1", port=scripted.port, timeout=5)
    connection: list[aiosmtplib.SMTP | None] = [None]
    outcomes = await converse(config, "relay.test", SENDER, ["a@dest.test", "b@dest.test"], MESSAGE, connection, False)
    assert {o.status for o in outcomes.values()} == {"deferred"} and "failed" in outcomes["a@dest.test"].reply
    assert connection[0] is None and scripted.messages == []
    reused = await session(scripted.port)  # the second session, dropped in its turn
    connection = [reused]
    outcomes = await converse(config, "relay.test", SENDER, ["a@dest.test", "b@dest.test"], MESSAGE, connection, False)
    assert outcomes == {r: Outcome("delivered", "250") for r in ("a@dest.test", "b@dest.test")}
    assert connection[0] is not reused and not reused.is_connected and scripted.sessions == 3
    assert scripted.messages == [STUFFED]
    connection[0].close()  # type: ignore[union-attr]


async def test_421_mid_group_defers_everyone_and_closes(scripted: ScriptedUpstream) -> None:
    scripted.rcpt = {"b@dest.test": b"421 4.3.2 Shutting down"}
    client = await session(scripted.port)
    errors = await transaction(client, SENDER, ["a@dest.test", "b@dest.test", "c@dest.test"], MESSAGE, False)
    assert replies(errors) == {r: "421 4.3.2 Shutting down" for r in ("a@dest.test", "b@dest.test", "c@dest.test")}
    assert not client.is_connected and scripted.messages == []


async def test_a_reply_that_is_not_smtp_defers(scripted: ScriptedUpstream) -> None:
    """A garbled reply is the connection's fault, not the recipient's: deferred, never a
    hard bounce (it was one before: the reply code -1 classified as permanent)."""
    scripted.rcpt = {"a@dest.test": b"hello there"}
    config = UpstreamConfig(host="127.0.0.1", port=scripted.port, timeout=5)
    connection: list[aiosmtplib.SMTP | None] = [None]
    outcomes = await converse(config, "relay.test", SENDER, ["a@dest.test", "b@dest.test"], MESSAGE, connection, False)
    assert {o.status for o in outcomes.values()} == {"deferred"}, outcomes
    assert "not SMTP" in outcomes["a@dest.test"].reply and connection[0] is None


async def test_a_success_where_none_can_be_is_never_delivered(scripted: ScriptedUpstream) -> None:
    scripted.data = b"250 2.0.0 Sure"  # DATA must be answered 354 or refused
    client = await session(scripted.port)
    errors = await transaction(client, SENDER, ["a@dest.test"], MESSAGE, False)
    assert replies(errors) == {"a@dest.test": "451 4.5.0 the upstream answered DATA with 250 2.0.0 Sure"}
    client.close()


# -- Postfix's smtp-sink ---------------------------------------------------------------------


def require(program: str, root: bool = False) -> None:
    """Skip without it (fail with CI=true: .ci/run installs Postfix, and runs as root)."""
    missing = shutil.which(program) is None
    if missing or (root and os.geteuid() != 0):
        reason = f"{program} is not installed (Debian package postfix)" if missing else f"{program} needs root"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI=true: pipelining against Postfix must be proven, not skipped", pytrace=False)
        pytest.skip(reason)


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    """A directory Postfix's and smtp-sink's unprivileged processes can traverse."""
    path = Path(tempfile.mkdtemp(prefix="mailmeter-pipelining-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class SmtpSink:
    """smtp-sink with `options`, dumping each message into its own file under `dumps`."""

    options: list[str]
    dumps: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.dumps.mkdir(parents=True, exist_ok=True)
        self.dumps.chmod(0o777)
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        argv = ["smtp-sink", *user, *self.options, "-d", f"{self.dumps}/%H%M%S.", f"127.0.0.1:{self.port}", "64"]
        self.process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        wait_for_listener(self.port, 10)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(5)

    def messages(self) -> list[bytes]:
        return [path.read_bytes() for path in sorted(self.dumps.iterdir()) if path.is_file()]

    def wait_for(self, marker: bytes, timeout: float = 20.0) -> bytes:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [m for m in self.messages() if marker in m]
            if found:
                return found[0]
            time.sleep(0.05)
        raise AssertionError(f"no message with {marker!r} in {self.dumps}")


def wait_for_listener(port: int, timeout: float) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")


@pytest.fixture
def sinks(scratch: Path) -> Iterator[list[SmtpSink]]:
    started: list[SmtpSink] = []
    yield started
    for sink in started:
        sink.stop()


async def start_sink(sinks: list[SmtpSink], scratch: Path, *options: str) -> SmtpSink:
    require("smtp-sink")
    sink = SmtpSink(list(options), Path(tempfile.mkdtemp(dir=scratch)))
    await asyncio.to_thread(sink.start)
    sinks.append(sink)
    return sink


def marked(marker: str) -> bytes:
    return MESSAGE.replace(b"<p1@example.com>", f"<{marker}@example.com>".encode())


async def test_smtp_sink_pipelined(sinks: list[SmtpSink], scratch: Path, tap_to: TapTo) -> None:
    sink = await start_sink(sinks, scratch)
    tap = await tap_to(sink.port)
    client = await session(tap.port)
    assert client.pipelining
    tap.forget()
    recipients = ["a@dest.test", "b@dest.test"]
    assert await transaction(client, SENDER, recipients, marked("sink1"), False) == {}
    assert (
        len(tap.turns()) == 2
        and tap.client_reads()[0].startswith(b"MAIL")
        and tap.client_reads()[0].endswith(b"RCPT TO:<b@dest.test>\r\nDATA\r\n")
    )
    dumped = await asyncio.to_thread(sink.wait_for, b"<sink1@example.com>")
    assert b"X-Rcpt-Args: <a@dest.test>\nX-Rcpt-Args: <b@dest.test>\n" in dumped.replace(b"\r\n", b"\n")
    assert b"\n..dot" not in dumped.replace(b"\r\n", b"\n")  # the dots went out doubled, and came back single
    client.close()


@pytest.mark.parametrize("option", ["-p", "-P"])
async def test_smtp_sink_without_pipelining(sinks: list[SmtpSink], scratch: Path, tap_to: TapTo, option: str) -> None:
    """-p: ESMTP without PIPELINING; -P: a Cisco PIX greeting and no ESMTP at all (HELO)."""
    sink = await start_sink(sinks, scratch, option)
    tap = await tap_to(sink.port)
    client = (
        await session(tap.port)
        if option == "-p"
        else await connect(UpstreamConfig(host="127.0.0.1", port=tap.port, timeout=5), "relay.test")
    )
    tap.forget()
    assert await transaction(client, SENDER, ["a@dest.test", "b@dest.test"], marked(f"sink{option}"), False) == {}
    assert not client.pipelining
    assert [t.split(b" ")[0] for t in tap.turns()][-5:] == [b"MAIL", b"RCPT", b"RCPT", b"DATA\r\n", b"From:"]
    await asyncio.to_thread(sink.wait_for, f"<sink{option}@example.com>".encode())
    client.close()


@pytest.mark.parametrize(("option", "reply"), [("-q", "failed"), ("-Q", "421 ")])
async def test_smtp_sink_gone_mid_group(sinks: list[SmtpSink], scratch: Path, option: str, reply: str) -> None:
    """-q RCPT: smtp-sink drops the connection on the RCPT, unanswered; -Q RCPT: answers 421 and closes."""
    sink = await start_sink(sinks, scratch, option, "RCPT")
    config = UpstreamConfig(host="127.0.0.1", port=sink.port, timeout=5)
    connection: list[aiosmtplib.SMTP | None] = [None]
    outcomes = await converse(config, "relay.test", SENDER, ["a@dest.test", "b@dest.test"], MESSAGE, connection, False)
    assert {o.status for o in outcomes.values()} == {"deferred"} and reply in outcomes["b@dest.test"].reply, outcomes
    assert not any(b"Subject: pipelined" in dump for dump in sink.messages())  # it opens a dump file at MAIL


# -- a private Postfix ----------------------------------------------------------------------


GONE = "550 5.1.1 <gone@dest.test>: Recipient address rejected: No such user here"
LATER = "450 4.2.1 <later@dest.test>: Recipient address rejected: Mailbox busy"


@dataclass
class RefusingPostfix(PostfixInstance):
    """bench's private Postfix instance, refusing from access tables (a sender at MAIL,
    recipients at RCPT, a sender's DATA) and relaying what it takes to smtp-sink."""

    def main_cf(self, relay_port: int) -> str:
        tables = self.root / "tables"
        return super().main_cf(relay_port) + "\n".join(
            [
                "smtpd_delay_reject = no",  # refuse a sender at MAIL, not at its first RCPT
                f"smtpd_sender_restrictions = check_sender_access texthash:{tables}/senders",
                f"smtpd_recipient_restrictions = check_recipient_access texthash:{tables}/recipients,"
                " permit_mynetworks, reject",
                f"smtpd_data_restrictions = check_sender_access texthash:{tables}/data",
                "smtpd_error_sleep_time = 0",  # no 1 s pause after each refusal: these tests refuse a lot
                "",
            ]
        )

    def write_tables(self) -> None:
        tables = self.root / "tables"
        tables.mkdir(parents=True, exist_ok=True)
        (tables / "senders").write_text("refused@example.com 553 5.7.1 Sender refused here\n")
        (tables / "recipients").write_text(
            "later@dest.test 450 4.2.1 Mailbox busy\ngone@dest.test 550 5.1.1 No such user here\n"
        )
        (tables / "data").write_text("datarefused@example.com 554 5.7.1 Not at DATA\n")


@pytest.fixture(scope="module")
def postfix(scratch: Path) -> Iterator[tuple[RefusingPostfix, SmtpSink]]:
    require("postfix", root=True)
    require("smtp-sink")
    sink = SmtpSink([], scratch / "postfix-sink")
    sink.start()
    instance = RefusingPostfix(ledger=ProcessLedger(scratch), root=scratch / "postfix", port=free_port())
    instance.write_tables()
    try:
        instance.start(sink.port)
        yield instance, sink
    finally:
        instance.stop()
        sink.stop()


async def postfix_session(postfix: tuple[RefusingPostfix, SmtpSink], tap_to: TapTo) -> tuple[PipeliningSMTP, WireTap]:
    tap = await tap_to(postfix[0].port)
    client = await session(tap.port)
    assert client.pipelining
    tap.forget()
    return client, tap


async def test_postfix_all_accepted(postfix: tuple[RefusingPostfix, SmtpSink], tap_to: TapTo) -> None:
    client, tap = await postfix_session(postfix, tap_to)
    recipients = ["a@dest.test", "b@dest.test"]
    assert await transaction(client, SENDER, recipients, marked("pf1"), False) == {}
    assert len(tap.turns()) == 2 and tap.client_reads()[0] == group(recipients, len(marked("pf1")))
    relayed = await asyncio.to_thread(postfix[1].wait_for, b"<pf1@example.com>")
    assert b".dot\r\nhello" in relayed or b".dot\nhello" in relayed
    client.close()


async def test_postfix_refusals_in_the_group(postfix: tuple[RefusingPostfix, SmtpSink], tap_to: TapTo) -> None:
    """450 and 550 among accepted recipients; then every recipient refused (Postfix
    refuses the DATA: no valid recipients), and the body is not sent."""
    client, tap = await postfix_session(postfix, tap_to)
    recipients = ["later@dest.test", "ok@dest.test", "gone@dest.test"]
    errors = await transaction(client, SENDER, recipients, marked("pf2"), False)
    assert replies(errors) == {"later@dest.test": LATER, "gone@dest.test": GONE}
    assert len(tap.turns()) == 2
    relayed = await asyncio.to_thread(postfix[1].wait_for, b"<pf2@example.com>")
    assert b"X-Rcpt-Args: <ok@dest.test>" in relayed and b"gone@dest.test>" not in relayed.split(b"Received:")[0]
    tap.forget()
    errors = await transaction(client, SENDER, ["gone@dest.test", "later@dest.test"], marked("pf3"), False)
    assert replies(errors) == {"gone@dest.test": GONE, "later@dest.test": LATER}
    assert tap.turns() == [group(["gone@dest.test", "later@dest.test"], len(marked("pf3")))]  # no body
    assert [data for side, data in tap.connections[-1] if side == "server"][-1].endswith(
        b"554 5.5.1 Error: no valid recipients\r\n"
    )
    client.close()


async def test_postfix_refused_mail(postfix: tuple[RefusingPostfix, SmtpSink], tap_to: TapTo) -> None:
    client, tap = await postfix_session(postfix, tap_to)
    errors = await transaction(client, "refused@example.com", ["a@dest.test", "b@dest.test"], MESSAGE, False)
    assert replies(errors) == {
        r: "553 5.7.1 <refused@example.com>: Sender address rejected: Sender refused here"
        for r in ("a@dest.test", "b@dest.test")
    }
    assert len(tap.turns()) == 1
    await client.rset()
    assert await transaction(client, SENDER, ["a@dest.test"], marked("pf4"), False) == {}  # the session goes on
    client.close()


async def test_postfix_refused_data_with_recipients_taken(
    postfix: tuple[RefusingPostfix, SmtpSink], tap_to: TapTo
) -> None:
    client, tap = await postfix_session(postfix, tap_to)
    errors = await transaction(client, "datarefused@example.com", ["a@dest.test", "gone@dest.test"], MESSAGE, False)
    assert replies(errors) == {
        "a@dest.test": "554 5.7.1 <datarefused@example.com>: Sender address rejected: Not at DATA",
        "gone@dest.test": GONE,
    }
    assert len(tap.turns()) == 1
    client.close()


# -- the whole relay -------------------------------------------------------------------------


async def test_relay_large_message_from_a_sender_process_is_pipelined(make_relay, tapped) -> None:  # type: ignore[no-untyped-def]
    """A message over delivery.LARGE_MESSAGE goes out from a sender process, through the
    same pipelined transaction: one group, exact results in the meter."""
    upstream, tap = tapped
    upstream.handler.rcpt_replies["gone@dest.test"] = "550 5.1.1 No such user here"
    upstream.handler.rcpt_replies["later@dest.test"] = "450 4.2.1 Try later"
    harness = make_relay(tap.port, limits={"message_size": 10 * 1024 * 1024})
    await harness.start()
    await add_account(harness)
    body = b"Subject: big\r\nMessage-ID: <big@example.com>\r\n\r\n" + (b"." + b"x" * 77 + b"\r\n") * 20_000
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=harness.port, start_tls=False, timeout=30)
    await client.connect()
    await client.login("app", PASSWORD)
    recipients = ["ok@dest.test", "gone@dest.test", "later@dest.test"]
    await client.sendmail(SENDER, recipients, body)
    client.close()
    await upstream.handler.wait_for(lambda: len(upstream.handler.messages) >= 1, timeout=60)
    assert upstream.handler.messages[0].rcpt_tos == ["ok@dest.test"]
    assert harness.relay is not None
    deadline = time.monotonic() + 20
    while True:
        usage = await harness.relay.meter.usage("app")
        if (usage.usage.delivered, usage.deferred, usage.usage.hard_bounced) == (
            1,
            1,
            1,
        ) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert (usage.usage.delivered, usage.deferred, usage.usage.hard_bounced) == (1, 1, 1)
    (large,) = [n for n, log in enumerate(tap.connections) if any(len(d) > 100_000 for s, d in log if s == "client")]
    group_line = [t for t in tap.turns(large) if t.startswith(b"MAIL")][0]
    assert group_line.endswith(
        b"RCPT TO:<ok@dest.test>\r\nRCPT TO:<gone@dest.test>\r\nRCPT TO:<later@dest.test>\r\nDATA\r\n"
    )
    await harness.stop()
