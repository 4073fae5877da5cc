"""Pipelining out (RFC 2920): aiosmtplib's client, able to send a transaction's commands in one write.

Theory of operation. aiosmtplib pairs every command it writes with one reply it reads:
its protocol parses one reply per read and drops whatever arrives while no command
waits, so a group of commands written at once loses every reply but the first.
`ReplyQueue`, a subclass of aiosmtplib's `SMTPProtocol`, counts the replies the server
owes (one per command written), parses every complete reply a read brings (a reply may
come split over several reads, several replies in one read) into a queue, and hands
them out in order. Bytes nobody asked for are still dropped, as aiosmtplib drops them,
so a stray line (an idle server's goodbye) is never taken for the next command's reply.
aiosmtplib's own commands (EHLO, STARTTLS, AUTH, RSET, QUIT) work on it unchanged.

`PipeliningSMTP` is aiosmtplib's `SMTP` client on that protocol, plus
`execute_pipelined`. aiosmtplib builds its protocol inside `connect()` with no hook to
choose the class, so once connected the transport is handed to a `ReplyQueue` with
asyncio's `set_protocol` (the transport's own API for switching protocols).

`pipelined_transaction` is one message when the server offers PIPELINING: MAIL, every
RCPT and DATA in one write, the replies read in order, then the message and its reply:
two round trips whatever the number of recipients, against 3 + recipients one command
at a time. RFC 2920 3.1's rules: DATA ends the group; every reply is checked, since a
server may accept DATA although it refused every recipient, in which case the client
sends the end of data alone (a lone ".") and the transaction has failed; a refused MAIL
makes every later reply of the group an error.

Results are per recipient, as one command at a time gives them: each refused recipient
keeps its own RCPT reply; the recipients the server took share the reply that failed
the transaction (MAIL, DATA or the end of data); a recipient absent from the result
was delivered.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from typing import Any

import aiosmtplib
from aiosmtplib.email import quote_address
from aiosmtplib.protocol import COMMAND_INJECTION_REGEX, MAX_RESPONSE_LENGTH, SMTPProtocol
from aiosmtplib.response import SMTPResponse
from aiosmtplib.typing import SMTPStatus

_WOKEN = SMTPResponse(0, "a reply is queued")  # what ReplyQueue's waiter carries: only a wake-up


class ReplyQueue(SMTPProtocol):
    """aiosmtplib's protocol with a queue of parsed replies: several commands may be
    written before their replies are read, and the replies come back in order.

    `_owed` counts the replies the server owes and that have not arrived whole yet;
    `_replies` holds the arrived ones not read yet, `_failure` a reply that was not SMTP
    (the connection is of no further use). aiosmtplib's waiter future is kept only as
    the wake-up (its result is _WOKEN) and the carrier of aiosmtplib's connection-lost errors.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None, connection_lost_callback: Any = None) -> None:
        super().__init__(loop=loop, connection_lost_callback=connection_lost_callback)
        self._owed = 0
        self._replies: deque[SMTPResponse] = deque()
        self._failure: aiosmtplib.SMTPResponseException | None = None  # a reply that was not SMTP

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._owed = 1  # the greeting
        self._replies.clear()
        self._failure = None

    def take_over(self, transport: asyncio.BaseTransport) -> None:
        """Become the protocol of a connection whose greeting another protocol read."""
        self.connection_made(transport)
        self._owed = 0
        transport.set_protocol(self)

    def data_received(self, data: bytes) -> None:
        waiter = self._response_waiter
        if waiter is None or self._owed == 0:
            return  # no connection, or no command waiting: dropped, as aiosmtplib drops it
        self._buffer.extend(data)
        try:
            while self._owed:
                reply = self._read_response_from_buffer()
                if reply is None:
                    break
                self._owed -= 1
                self._replies.append(reply)
            if self._owed == 0:
                del self._buffer[:]  # past the last reply owed: nothing anybody asked for
            elif len(self._buffer) > MAX_RESPONSE_LENGTH:
                raise aiosmtplib.SMTPResponseException(SMTPStatus.invalid_response.value, "Response too long")
        except aiosmtplib.SMTPResponseException as error:  # not SMTP: every later read fails the same way
            self._failure = error
            self._owed = 0
            del self._buffer[:]
        if (self._replies or self._failure is not None) and not waiter.done():
            waiter.set_result(_WOKEN)

    async def read_response(self, timeout: float | None = None) -> SMTPResponse:
        """The next reply, in the order the commands were written (each read waits up to `timeout`).

        aiosmtplib calls this right after writing one command (nothing runs in between),
        so a read with nothing owed and nothing queued is owed one reply.
        """
        while not self._replies:
            if self._failure is not None:
                raise self._failure
            waiter = self._response_waiter
            if waiter is None:
                raise aiosmtplib.SMTPServerDisconnected("Connection lost")
            if self._owed == 0:
                self._owed = 1
            try:
                result = await asyncio.wait_for(waiter, timeout)  # at once if woken before this read
            except TimeoutError as error:
                raise aiosmtplib.SMTPReadTimeoutError("Timed out waiting for server response") from error
            finally:
                self._response_waiter = None if self.transport is None else self._loop.create_future()
            if result is not _WOKEN:
                return result  # aiosmtplib's own: the "221" of a connection closed after QUIT
        return self._replies.popleft()

    async def execute_pipelined(
        self, commands: Sequence[Sequence[bytes]], timeout: float | None = None
    ) -> list[SMTPResponse]:
        """Write the commands (each a sequence of arguments) in one write; one reply each.

        A 421 (the server is closing the connection) stands for itself and every later
        command of the group: the server answers nothing after it.
        """
        lines = []
        for args in commands:
            if any(COMMAND_INJECTION_REGEX.search(arg) for arg in args):
                raise ValueError("Command arg contains a prohibited control character")
            lines.append(b" ".join(args) + b"\r\n")
        if self._command_lock is None:
            raise aiosmtplib.SMTPServerDisconnected("Server not connected")
        async with self._command_lock:
            self._owed += len(lines)
            self.write(b"".join(lines))
            replies: list[SMTPResponse] = []
            while len(replies) < len(lines):
                reply = await self.read_response(timeout=timeout)
                replies.append(reply)
                if reply.code == SMTPStatus.domain_unavailable:
                    replies.extend([reply] * (len(lines) - len(replies)))
            return replies


class PipeliningSMTP(aiosmtplib.SMTP):
    """aiosmtplib's SMTP client on a ReplyQueue, with `execute_pipelined`."""

    async def connect(self, **kwargs: Any) -> SMTPResponse:
        greeting = await super().connect(**kwargs)
        if self.protocol is not None and self.transport is not None and not isinstance(self.protocol, ReplyQueue):
            protocol = ReplyQueue(loop=self.loop, connection_lost_callback=self._on_connection_lost)
            protocol.take_over(self.transport)
            self.protocol = protocol
        return greeting

    @property
    def pipelining(self) -> bool:
        """The server offers PIPELINING (as of its last EHLO) and this client can use it."""
        return isinstance(self.protocol, ReplyQueue) and self.supports_extension("pipelining")

    async def execute_pipelined(self, commands: Sequence[Sequence[bytes]]) -> list[SMTPResponse]:
        """The commands in one write and their replies, as aiosmtplib's execute_command does
        for one: a lost connection, a timeout or a reply that is not SMTP closes the client
        (a reply given up on would be paired with a later command), and so does a 421."""
        protocol = self.protocol
        if not isinstance(protocol, ReplyQueue):
            raise aiosmtplib.SMTPServerDisconnected("Server not connected")
        try:
            replies = await protocol.execute_pipelined(commands, timeout=self.timeout)
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, aiosmtplib.SMTPResponseException):
            self.close()  # SMTPResponseException: a reply that was not SMTP
            raise
        if any(reply.code == SMTPStatus.domain_unavailable for reply in replies):
            self.close()
        return replies


async def pipelined_transaction(
    client: PipeliningSMTP,
    sender: str,
    recipients: list[str],
    body: bytes,
    mail_options: list[str],
    encoding: str,
) -> dict[str, SMTPResponse]:
    """One message in two round trips; the replies of the recipients it was not delivered
    to (see the module's docstring). `body` is ready to send: CRLF line ends, ending with
    CRLF, dots not doubled. Raises only what the connection raises (lost, timed out)."""
    mail = [b"MAIL", b"FROM:" + quote_address(sender).encode(encoding), *(o.encode("ascii") for o in mail_options)]
    rcpts = [[b"RCPT", b"TO:" + quote_address(r).encode(encoding)] for r in recipients]
    replies = await client.execute_pipelined([mail, *rcpts, [b"DATA"]])
    mail_reply, rcpt_replies, data_reply = replies[0], replies[1:-1], replies[-1]
    if not positive(mail_reply):
        if data_reply.code == SMTPStatus.start_input:
            await send_message_data(client, b"")  # see below
        return {r: refusal(mail_reply, "MAIL") for r in recipients}
    refused = {r: refusal(reply, "RCPT") for r, reply in zip(recipients, rcpt_replies) if not positive(reply)}
    taken = [r for r in recipients if r not in refused]
    if data_reply.code != SMTPStatus.start_input:
        return refused | {r: refusal(data_reply, "DATA") for r in taken}
    # With nobody to send to, the server should have refused DATA. It did not: the data
    # is closed at once with a lone "." (RFC 2920 3.1) and the transaction has failed.
    end_reply = await send_message_data(client, body if taken else b"")
    if positive(end_reply) or not taken:
        return refused
    return refused | {r: refusal(end_reply, "the end of data") for r in taken}


def positive(reply: SMTPResponse) -> bool:
    """A 2yz reply: the command succeeded (RFC 5321 4.2.1)."""
    return 200 <= reply.code < 300


def refusal(reply: SMTPResponse, command: str) -> SMTPResponse:
    """The reply that failed `command`, as a recipient's result. A reply that is no refusal
    (DATA answered 250, MAIL 354: the server broke the protocol) becomes a temporary
    failure naming it, so the message is tried again and never counted delivered."""
    if 400 <= reply.code < 600:
        return reply
    return SMTPResponse(451, f"4.5.0 the upstream answered {command} with {reply.code} {reply.message}".rstrip())


async def send_message_data(client: aiosmtplib.SMTP, body: bytes) -> SMTPResponse:
    """After a 354: the message with its leading dots doubled, the end of data, and its reply.

    `body` as pipelined_transaction takes it; an empty body sends the end of data alone.
    """
    protocol = client.protocol
    if protocol is None:
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    try:
        protocol.write((b"." if body.startswith(b".") else b"") + body.replace(b"\r\n.", b"\r\n.."))
        protocol.write(b".\r\n")
        return await protocol.read_response(timeout=client.timeout)  # nothing was awaited since the write
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
        client.close()  # as aiosmtplib does: a reply it gave up on would be paired with the next command
        raise


__all__ = ["PipeliningSMTP", "ReplyQueue", "pipelined_transaction", "positive", "refusal", "send_message_data"]
