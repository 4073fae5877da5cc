"""SMTP in: aiosmtpd on the service's own event loop, with the metering hook.

The order of a transaction, which is the relay's core promise:

    RCPT   reserve one email per recipient in the meter (atomic; 452 when it does not fit,
           550 5.1.1 for a recipient on the account's suppression list: nothing held)
    DATA   write + fsync the message into spool/incoming
           commit the hold in the meter under the queue id   <- the commit point
           move the message to spool/active, answer 250 with the queue id

With the inline spool (spool.inline, SQLite; relay/spool.py) a message up to
spool.inline_max_bytes skips spool/incoming: the commit carries it, and the store
keeps it in the transaction that counts its usage, one fsync for both, before 250.
    RSET, QUIT, new EHLO, disconnect, any failure: release the hold

A transaction belongs to the account it began with: AUTH inside it gets 503 (RFC
4954 4), and the meter refuses a hold of another account anyway. A repeated recipient
(recipient_key) is answered 250 and dropped, like Postfix's cleanup does, so every
counted recipient is sent once and gets one result. MAIL FROM:<> is any account's.

aiosmtpd traps handled here (aiosmtpd 1.4.6): its `authenticator` is synchronous,
so AUTH PLAIN/LOGIN are finished asynchronously in `_finish_auth`; it answers
`555` to `MAIL FROM:<..> AUTH=<>`, so the AUTH parameter is stripped first.

Abuse limits (relay/abuse.py): AUTH failures are slowed, then locked out per
client and per login; each client has a connection cap; a session has an idle
timeout and a total deadline (a slow-drip client cannot hold a slot forever).
SMTP smuggling: DATA ends only at CRLF.CRLF, and a message with a bare CR or LF is
refused (or normalized to CRLF), so no upstream can see a line end the relay did not
see. DATA itself is read and checked in large pieces (relay/data.py), not aiosmtpd's
line by line: large messages must not stall the other sessions on the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import ipaddress
import re
import secrets
import ssl
import string
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import format_datetime
from typing import Any, Protocol, cast

import structlog
from aiosmtpd.smtp import MISSING, SMTP, AuthResult, LoginPassword, Session, syntax
from aiosmtpd.smtp import Envelope as SmtpEnvelope

from mailmeter.relay import replies
from mailmeter.relay.abuse import AuthGuard, AuthLimits, ConnectionCounter
from mailmeter.relay.data import DATA_CHUNK, crlf_line_ends, read_data
from mailmeter.relay.delivery import new_queue_id, sendable_address
from mailmeter.relay.domains import domain_allowed
from mailmeter.relay.observe import NoObserver, RelayObserver, reply_class
from mailmeter.relay.spool import Envelope, Spool, pack

_AUTH_PARAM = re.compile(r"\s+AUTH=\S*", re.IGNORECASE)
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
# <dot-atom@domain> and the parameters after it: what RelaySMTP._getaddr answers itself.
_PLAIN_ANGLE_ADDR = re.compile(
    rf"[ \t]*<({_ATOM}(?:\.{_ATOM})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>[ \t]*([^()\s][^()]*|)"
)
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
# The HELO name goes into our Received: header: a CR or LF in it would start a header
# of the client's choosing (aiosmtpd reads commands up to LF, so "EHLO a\rBcc: x" is one line).
_HELO_UNSAFE = re.compile(r"[^\x21-\x7e]")
# While a message is being committed, a deadline waits this long and looks again:
# the client must get the answer to a message that is already being accepted.
_COMMIT_GRACE = 0.5
CAMPAIGN_HEADER = "X-Mailmeter-Campaign"
NULL_SENDER = "<>"  # aiosmtpd's address for MAIL FROM:<>; spooled as "" (what delivery sends as <>)
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
_CAMPAIGN_NAME = CAMPAIGN_HEADER.lower().encode()
_CAMPAIGN_TAG = re.compile(r"[A-Za-z0-9._:/-]{1,64}")


class MeterPort(Protocol):
    """What SMTP-in needs from the meter. Any method may raise: the relay fails closed."""

    async def authenticate(self, name: str, password: bytes) -> Any | None: ...
    async def account_for_client(self, address: str) -> str | None: ...
    async def mail_check(self, name: str) -> tuple[tuple[str, ...], Any | None]: ...
    async def reserve(
        self, name: str, hold_id: str | None = None, emails: int = 1, recipient: str | None = None
    ) -> Any: ...
    async def commit(
        self,
        hold_id: str,
        queue_id: str,
        emails: int,
        campaign: str = "",
        account: str | None = None,
        spooled: bytes | None = None,
    ) -> None: ...
    async def release(self, hold_id: str) -> int: ...
    async def message_committed(self, queue_id: str) -> bool: ...


@dataclass(frozen=True)
class Listener:
    """How one listening socket treats its sessions (config `listen`, one entry each).

    mode: smtp (plain, STARTTLS offered when `tls` is set), submission (RFC 6409 on 587:
    every command but EHLO/HELO/NOOP/QUIT/STARTTLS needs STARTTLS first, so AUTH and mail
    go only over TLS), smtps (implicit TLS on 465, RFC 8314: TLS from the first byte, no
    STARTTLS). auth: optional (AUTH, or a network bound to an account), required (AUTH
    only; bound networks do not count here), none (bound networks only; AUTH is not offered).
    loopback: the socket's address is a loopback one (auth.allow_plaintext_on_loopback).
    """

    mode: str = "smtp"  # smtp | submission | smtps
    auth: str = "optional"  # optional | required | none
    loopback: bool = False
    name: str = "smtp"  # for logs: "MODE ADDRESS:PORT"


@dataclass
class SmtpSettings:
    hostname: str
    message_size_limit: int
    recipients_per_message: int
    tls_context: ssl.SSLContext | None
    plaintext_auth: bool  # allow AUTH before STARTTLS on a loopback listener of mode smtp
    timeout: float = 300.0  # idle: seconds without a complete command (DATA must finish within it)
    max_session_seconds: float = 900.0  # total: a session older than this gets 421 4.4.2
    bare_newlines: str = "reject"  # reject | normalize: a bare CR or LF in DATA
    max_connections_per_client: int = 20
    auth_limits: AuthLimits = field(default_factory=AuthLimits)


@dataclass
class RelayContext:
    """Everything a session needs; shared by all sessions of one server."""

    settings: SmtpSettings
    meter: MeterPort
    spool: Spool
    on_accepted: Callable[[str], None]
    # The inline spool: messages up to inline_max_bytes (as spool.pack lays them out) go
    # into the meter's commit and then to on_accepted_inline, not to spool files. 0: off.
    inline_max_bytes: int = 0
    on_accepted_inline: Callable[[str, bytes], None] | None = None
    background: set[asyncio.Task[Any]] = field(default_factory=set)
    observer: RelayObserver = field(default_factory=NoObserver)
    sessions: set[RelaySMTP] = field(default_factory=set)
    draining: bool = False
    auth_guard: AuthGuard = field(init=False)
    connections: ConnectionCounter = field(init=False)

    def __post_init__(self) -> None:
        self.auth_guard = AuthGuard(self.settings.auth_limits)
        self.connections = ConnectionCounter(self.settings.max_connections_per_client)

    def reconfigure(self, settings: SmtpSettings) -> None:
        """A reloaded config: new sessions use the new settings, open ones from their next command."""
        self.settings = settings
        self.auth_guard.limits = settings.auth_limits
        self.connections.limit = settings.max_connections_per_client

    def busy_sessions(self) -> int:
        """Sessions inside DATA or storing a message: a drain waits for them."""
        return sum(1 for session in self.sessions if session.in_data or session.storing)

    def drain(self) -> None:
        """Stop: every session not inside DATA gets 421 4.3.2 now; the rest after their reply."""
        self.draining = True
        for session in list(self.sessions):
            if not (session.in_data or session.storing):
                session.close_for_shutdown()

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        """Run work that must finish even if its session dies; Relay.stop waits for it."""
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task


@dataclass
class _Pending:
    login: bytes
    password: bytes


@functools.cache
def _protocol_names(cls: type, prefixes: tuple[str, ...]) -> list[str]:
    return sorted(name for name in dir(cls) if name.startswith(prefixes))


class RelaySMTP(SMTP):
    """One SMTP session. Holds the session's account and its open hold."""

    line_length_limit = DATA_CHUNK  # aiosmtpd sizes the stream with it; DATA lines: MAX_LINE

    def __dir__(self) -> list[str]:
        """Only the names aiosmtpd looks up with dir() and inspect.getmembers() when a
        session starts (auth_*, smtp_*): listing every attribute of every new session
        was a tenth of the relay's CPU at one message per connection."""
        return _protocol_names(type(self), ("auth_", "smtp_"))  # type: ignore[arg-type]  # classes hash

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's address parsing, with a fast path for the plain `<local@domain>` form.

        aiosmtpd defines a class and runs the email package's header parser for every
        MAIL and RCPT: a tenth of the relay's CPU. For a dot-atom address in angle
        brackets (nearly all mail) the result is the text itself; anything else (quoted
        local parts, domain literals, comments, UTF-8, <>) goes to aiosmtpd as before.
        """
        match = _PLAIN_ANGLE_ADDR.fullmatch(arg)
        if match is None:
            return SMTP._getaddr(self, arg)
        address = match.group(1)
        if self.local_part_limit and len(address.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return address, match.group(2)

    def __init__(self, context: RelayContext, listener: Listener | None = None) -> None:
        settings = context.settings
        listener = listener or Listener()
        implicit_tls = listener.mode == "smtps"
        plaintext_auth = settings.plaintext_auth and listener.loopback and listener.mode == "smtp"
        super().__init__(
            _Handler(context),
            data_size_limit=settings.message_size_limit,
            hostname=settings.hostname,
            ident="mailmeter",
            tls_context=None if implicit_tls else settings.tls_context,  # smtps: TLS already, no STARTTLS
            require_starttls=listener.mode == "submission",
            timeout=settings.timeout,
            auth_required=False,
            auth_require_tls=not (implicit_tls or plaintext_auth),
            enable_SMTPUTF8=True,
            loop=asyncio.get_running_loop(),
        )
        self.listener = listener
        self.context = context
        self.log = structlog.get_logger("mailmeter.smtp")
        self.account: str | None = None
        self.account_via: str = ""
        self.network_checked = False
        self.hold_id: str | None = None
        self.reserving: asyncio.Future[Any] | None = None  # a reserve in flight for hold_id
        self.storing = False  # a message is being spooled and committed
        self.in_data = False  # between DATA and its final reply
        self.bare_newline = False  # the message DATA just read has a bare CR or LF (relay/data.py)
        self.refused = 0
        self.duplicates = 0  # repeated recipients of the open transaction, accepted and dropped
        self._recipient_keys: tuple[SmtpEnvelope | None, set[str]] = (None, set())
        self.peer_address = ""
        self._counted = False  # holds a slot in context.connections
        self._turned_away = False  # over the connection cap: no SMTP session at all
        self._lost = False
        self._deadline: asyncio.TimerHandle | None = None
        self._greeted = False  # the banner (the first reply) is sent
        self._held = bytearray()  # replies of a pipelined group not sent yet (push)
        self._in_helo = False  # replying to EHLO or HELO
        self.command = "-"  # the command being answered ("-": none read whole yet), for refusal logs
        self._smtp_methods = {name: self._tracked(name, method) for name, method in self._smtp_methods.items()}

    def _tracked(self, name: str, method: Callable[[str | None], Any]) -> Callable[[str | None], Any]:
        """aiosmtpd's handler of `name`, noting the command while it runs: a refusal it
        sends is logged with the command it answers (see _Tracked)."""
        return _Tracked(self, name, method)

    # -- connection lifecycle: cap, deadline, STARTTLS ------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._original_transport is not None:
            # The TLS layer after STARTTLS. RFC 3207 4.2: forget everything learnt
            # before it, the account included (aiosmtpd only resets its own session).
            super().connection_made(transport)
            self._forget_client()
            return
        peer = transport.get_extra_info("peername")
        self.peer_address = peer[0] if isinstance(peer, tuple) else ""
        if not self.context.connections.acquire(self.peer_address):
            self._turned_away = True
            self.log.warning(
                "smtp.connection",
                client=self.peer_address,
                result="too_many_connections",
                limit=self.context.settings.max_connections_per_client,
            )
            # (cast, not isinstance: uvloop's transports do not subclass asyncio's)
            cast(asyncio.WriteTransport, transport).write(replies.TOO_MANY_CONNECTIONS.encode() + b"\r\n")
            transport.close()
            return
        self._counted = True
        self.context.sessions.add(self)
        self.context.observer.session_opened()
        super().connection_made(transport)
        if self.listener.mode == "smtps" and self.session is not None:
            # Implicit TLS (RFC 8314): the session is encrypted from its first byte; aiosmtpd
            # only knows STARTTLS, so say so (Received: ... with ESMTPS(A), eof handling).
            ssl_object = transport.get_extra_info("ssl_object")
            self.session.ssl = {"ssl_object": ssl_object, "cipher": transport.get_extra_info("cipher")}
        self._deadline = self.loop.call_later(self.context.settings.max_session_seconds, self._session_deadline)

    def data_received(self, data: bytes) -> None:
        if not self._turned_away:
            super().data_received(data)

    def eof_received(self) -> bool | None:
        if self._turned_away:
            return False
        self._flush_held()  # aiosmtpd ends the session at EOF: the replies already made still go out
        return super().eof_received()

    def _forget_client(self) -> None:
        self.account, self.account_via, self.network_checked = None, "", False

    def _session_deadline(self) -> None:
        """Slow-drip defence: however busy a client keeps it, a session ends at the deadline."""
        if self.storing:
            self._deadline = self.loop.call_later(_COMMIT_GRACE, self._session_deadline)
            return
        self._close_with(replies.SESSION_TIME_LIMIT.format(hostname=self.hostname), "session_time_limit")

    def _timeout_cb(self) -> None:
        """aiosmtpd's idle timeout closes silently; say why first (RFC 5321 4.5.3.2)."""
        if self.storing:
            self._reset_timeout(_COMMIT_GRACE)
            return
        self._close_with(replies.IDLE_TIMEOUT.format(hostname=self.hostname), "idle_timeout")

    def _close_with(self, reply: str, result: str) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self.log.info("smtp.session_closed", account=self.account, client=self._client(), result=result)
        self._flush_held()
        cast(asyncio.WriteTransport, transport).write(reply.encode() + b"\r\n")  # uvloop's is no subclass
        transport.close()

    def close_for_shutdown(self) -> None:
        self._close_with(replies.SHUTTING_DOWN.format(hostname=self.hostname), "shutdown")

    async def smtp_DATA(self, arg: str) -> None:
        """Mark the session busy for a drain until DATA's reply is sent, then honour the drain."""
        self.in_data = True
        try:
            await self._data(arg)
        finally:
            self.in_data = False
        if self.context.draining:
            self.close_for_shutdown()

    async def _data(self, arg: str) -> None:
        """aiosmtpd's DATA, reading the message in large pieces instead of line by line.

        aiosmtpd reads DATA one line at a time through a 1 KB stream limit: for a 10 MB
        message that is 130,000 awaits and thousands of transport pauses on the event
        loop, which stalled every other session (bench/large_mail.py). Here the stream
        limit is DATA_CHUNK and each piece is checked as it arrives (relay/data.py); the
        replies, limits and de-transparency are aiosmtpd's.
        """
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            # RFC 2920 3.1: a pipelining client sends DATA without waiting for its RCPT
            # replies; when none was taken, DATA gets 554 (503 when MAIL was not taken either).
            await self.push(replies.NO_VALID_RECIPIENTS if self.envelope.mail_from else replies.NEED_MAIL)
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            read = await read_data(self._reader, self.data_size_limit)
        except asyncio.IncompleteReadError:  # the client went away mid-message
            self._writer.close()
            return
        if read.problem is not None:
            await self.push(read.problem)
            self._set_post_data_state()
            return
        self.envelope.content = self.envelope.original_content = read.content
        self.bare_newline = read.bare_newline
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push(status)

    async def push(self, status: str | bytes) -> None:
        """Every reply on one line: client text echoed in a reply (a bad command, an
        address) may hold CR, LF, NUL or bytes that are not UTF-8. And every reply but
        the banner, EHLO/HELO's and the 334/354 prompts carries an enhanced status code
        (RFC 2034, advertised as ENHANCEDSTATUSCODES): aiosmtpd's own replies get one. Every
        refusal (4xx, 5xx) is logged, with the client and the session's account, and counted."""
        line = safe_reply(status)
        if self._greeted and not self._in_helo:
            line = with_enhanced_code(line)
        self._greeted = True
        if line[:1] in (b"4", b"5"):
            self._log_refusal(line.decode("utf-8", "replace"))
        if line[:3] not in _FLUSH_NOW and self._more_commands_waiting():
            # RFC 2920 3.2: with the client's next pipelined command already read, keep this
            # reply and send the group's replies together (one packet, not one per command).
            self._held += line + b"\r\n"
            return
        if self._held:
            line, self._held = bytes(self._held) + line, bytearray()
        await super().push(line)

    def _more_commands_waiting(self) -> bool:
        """A whole further command line is already in the stream's buffer (pipelining)."""
        buffered: bytearray | None = getattr(self._reader, "_buffer", None)  # StreamReader's; aiosmtpd uses it too
        return buffered is not None and b"\n" in buffered

    def _flush_held(self) -> None:
        """Write the replies held for a pipelined group now (before a reply that closes)."""
        transport = self.transport
        if self._held and transport is not None and not transport.is_closing():
            cast(asyncio.WriteTransport, transport).write(bytes(self._held))
        self._held = bytearray()

    async def smtp_EHLO(self, hostname: str) -> None:
        self._in_helo = True  # RFC 2034: no enhanced codes in the replies to EHLO and HELO
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._in_helo = False

    async def smtp_HELO(self, hostname: str) -> None:
        self._in_helo = True
        try:
            await super().smtp_HELO(hostname)
        finally:
            self._in_helo = False

    def _log_refusal(self, reply: str) -> None:
        code = reply[:3]
        self.log.info(
            "smtp.refused",
            command=self.command,
            client=self._client(),
            account=self.account,
            code=code,
            reply=reply[:200],
        )
        self.context.observer.refused(self.command, code, self.account)

    # -- account of the session ---------------------------------------------------

    async def _resolve_account(self) -> str | None:
        if self.account is None and not self.network_checked and self.listener.auth != "required":
            assert self.session is not None
            peer = self.session.peer
            address = peer[0] if isinstance(peer, tuple) else ""
            found = await self.context.meter.account_for_client(address)
            self.network_checked = True  # only once the meter answered: a failure is asked again
            if found is not None:
                self.account, self.account_via = found, "network"
        return self.account

    async def check_auth_needed(self, caller_method: str) -> bool:
        """No open relay: MAIL, RCPT and DATA need an account (AUTH or a bound network)."""
        if caller_method not in ("MAIL", "RCPT", "DATA"):
            return False
        try:
            account = await self._resolve_account()
        except Exception:
            await self.push(replies.METER_UNAVAILABLE)
            return True
        if account is None:
            await self.push(replies.NETWORK_NOT_BOUND if self.listener.auth == "none" else replies.AUTH_REQUIRED)
            return True
        return False

    # -- AUTH, checked without blocking the loop ------------------------------------

    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str) -> None:
        """RFC 4954 4: AUTH inside a mail transaction is refused with 503. The transaction's
        recipients are held under the account it began with; a new login must not move
        the rest of it (and its commit) to another account."""
        if self.listener.auth == "none":
            await self.push(replies.AUTH_NOT_OFFERED)
            return
        if self.envelope is not None and self.envelope.mail_from is not None:
            await self.push(replies.AUTH_IN_TRANSACTION)
            return
        await super().smtp_AUTH(arg)

    def _authenticate(self, mechanism: str, auth_data: Any) -> AuthResult:
        assert isinstance(auth_data, LoginPassword)
        return AuthResult(success=False, handled=False, auth_data=_Pending(auth_data.login, auth_data.password))

    async def challenge_auth(
        self, challenge: str | bytes, encode_to_b64: bool = True, log_client_response: bool = False
    ) -> Any:
        """aiosmtpd's AUTH challenge (334), reading the client's answer with a length limit:
        a line longer than the stream's limit is read to its end and answered `500 5.5.6`
        (RFC 4954 section 4), where aiosmtpd raised and the client got 451 Internal error."""
        raw = challenge.encode() if isinstance(challenge, str) else challenge
        await self.push(b"334 " + (base64.b64encode(raw) if encode_to_b64 else raw))
        try:
            line = await self._reader.readuntil()
        except asyncio.LimitOverrunError as error:
            await self._discard_line(error.consumed)
            await self.push(replies.AUTH_LINE_TOO_LONG)
            return MISSING
        except asyncio.IncompleteReadError:  # the client went away
            return MISSING
        blob = line.strip()
        if blob == b"*":
            await self.push("501 5.7.0 Auth aborted")
            return MISSING
        try:
            return base64.b64decode(blob, validate=True)
        except binascii.Error:
            await self.push("501 5.5.2 Can't decode base64")
            return MISSING

    async def _discard_line(self, consumed: int) -> None:
        """Skip the rest of a line that overran the stream's limit (as aiosmtpd does for commands)."""
        await self._reader.read(consumed)
        while True:
            try:
                await self._reader.readuntil()
                return
            except asyncio.LimitOverrunError as error:
                await self._reader.read(error.consumed)

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        return await self._finish_auth(await super().auth_PLAIN(_, args))

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        return await self._finish_auth(await super().auth_LOGIN(_, args))

    async def _finish_auth(self, result: AuthResult) -> AuthResult:
        """Check the credentials, unless the client or the login is locked out.

        A locked-out AUTH is refused before the password is looked at, so the right
        password does not get in either, and a brute force costs us no scrypt. The check
        runs on its own (a client that hangs up does not free its slot before the hash
        is done, nor escape the failure it would count); the delay is the session's.
        """
        pending = result.auth_data
        if not isinstance(pending, _Pending):
            # aiosmtpd already answered (a 501, an aborted or too long challenge): with
            # `handled` unset it would send a 535 as well, one reply too many.
            return AuthResult(success=False, handled=True) if not result.success else result
        name = pending.login.decode("utf-8", "replace")
        client = self._client()
        check = asyncio.ensure_future(self._check_password(client, name, pending.password))
        outcome, delay = await asyncio.shield(check)
        if delay > 0:
            await asyncio.sleep(delay)
        if outcome.success:
            self.account, self.account_via = outcome.auth_data, "auth"
            self.log.info("smtp.auth", account=outcome.auth_data, client=client, result="ok")
            self.context.observer.auth("ok")
        return outcome

    async def _check_password(self, client: str, name: str, password: bytes) -> tuple[AuthResult, float]:
        """(the AUTH's result, the delay before answering it): one password check, when the
        guard lets it start (relay/abuse.py: it counts from its start, within the caps)."""
        async with self.context.auth_guard.attempt(client, name) as attempt:
            locked = attempt.locked
            if locked is not None:
                self.log.warning("smtp.auth", account=name, client=client, result="locked", scope=locked.scope)
                self.context.observer.auth("locked")
                text = replies.AUTH_LOCKED_CLIENT if locked.scope == "client" else replies.AUTH_LOCKED_LOGIN
                seconds = max(1, round(locked.seconds_left))
                return AuthResult(success=False, handled=False, message=text.format(seconds=seconds)), 0.0
            try:
                account = await self.context.meter.authenticate(name, password)
            except Exception as error:
                self.log.warning("smtp.auth", account=name, client=client, result="tempfail", error=repr(error))
                self.context.observer.auth("tempfail")
                return AuthResult(success=False, handled=False, message=replies.AUTH_TEMPFAIL), 0.0
            if account is None:
                delay = attempt.failed()
                self.log.info("smtp.auth", account=name, client=client, result="failed", delay=delay)
                self.context.observer.auth("failed")
                for scope in attempt.began:
                    self.log.warning(
                        "smtp.auth_lockout",
                        account=name,
                        client=client,
                        scope=scope,
                        seconds=self.context.auth_guard.limits.lockout,
                        result="locked",
                    )
                    self.context.observer.auth_lockout(scope)
                return AuthResult(success=False, handled=False), delay
            attempt.succeeded()
            return AuthResult(success=True, auth_data=account.name), 0.0

    def _recipient_keys_of(self, envelope: SmtpEnvelope) -> set[str]:
        """The recipient keys of this envelope's transaction, rebuilt whenever aiosmtpd
        made a new envelope (RSET, EHLO, STARTTLS, after DATA)."""
        owner, keys = self._recipient_keys
        if owner is not envelope:
            keys = {recipient_key(known) for known in envelope.rcpt_tos}
            self._recipient_keys = (envelope, keys)
        return keys

    def recipient_seen(self, envelope: SmtpEnvelope, address: str) -> bool:
        """Is `address` already a recipient of this transaction (see recipient_key)?"""
        return recipient_key(address) in self._recipient_keys_of(envelope)

    def add_recipient(self, envelope: SmtpEnvelope, address: str, options: list[str]) -> None:
        self._recipient_keys_of(envelope).add(recipient_key(address))
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)

    # -- MAIL parameters ----------------------------------------------------------------

    async def smtp_MAIL(self, arg: str | None) -> None:
        """Accept (and drop) RFC 4954's AUTH= parameter, which aiosmtpd would answer 555."""
        if arg:
            arg = _AUTH_PARAM.sub("", arg)
        await super().smtp_MAIL(arg)

    # -- releasing holds ------------------------------------------------------------

    def _set_post_data_state(self) -> None:
        """aiosmtpd calls this on RSET, HELO/EHLO, STARTTLS and after any DATA: end the transaction."""
        self._end_transaction("abandoned")
        super()._set_post_data_state()  # type: ignore[no-untyped-call]

    def connection_lost(self, error: Exception | None) -> None:
        if self._turned_away or self._lost:
            return  # aiosmtpd calls this twice when a TLS handshake fails
        self._lost = True
        if self._deadline is not None:
            self._deadline.cancel()
        if self._counted:
            self.context.connections.release(self.peer_address)
            self.context.sessions.discard(self)
            self.context.observer.session_closed()
        self._end_transaction("disconnected")
        super().connection_lost(error)

    def _end_transaction(self, result: str) -> None:
        hold_id, self.hold_id = self.hold_id, None
        reserving, self.reserving = self.reserving, None
        envelope = self.envelope
        if hold_id is not None:
            self.context.spawn(self._release(hold_id, after=reserving))
        if envelope is not None and envelope.mail_from and result:
            self.context.observer.transaction("none", result)
            self.log.info(
                "smtp.transaction",
                queue_id=None,
                account=self.account,
                client=self._client(),
                recipients=len(envelope.rcpt_tos),
                refused=self.refused,
                duplicates=self.duplicates,
                result=result,
            )
        self.refused = self.duplicates = 0

    async def _release(self, hold_id: str, after: asyncio.Future[Any] | None = None) -> None:
        """Release a hold; after the reserve still in flight for it, if any, or that
        reserve would create the hold after the release and leak it."""
        if after is not None:
            await asyncio.wait([after])
        delay = 0.1
        while True:
            try:
                await self.context.meter.release(hold_id)
                return
            except Exception as error:
                # Keep trying while the store is down (locked, unreachable), so the account
                # gets its emails back as soon as it recovers. A node that stops meanwhile
                # releases the hold when it starts again.
                self.log.error("meter.release_failed", hold_id=hold_id, error=repr(error), retry_in=delay)
            if self.context.draining:
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    def _client(self) -> str:
        peer = self.session.peer if self.session else None
        return peer[0] if isinstance(peer, tuple) else str(peer)


class _Handler:
    """aiosmtpd hooks. Each returns the reply line verbatim."""

    def __dir__(self) -> list[str]:
        """What aiosmtpd looks for on a handler (see RelaySMTP.__dir__)."""
        return _protocol_names(type(self), ("auth_", "handle_"))  # type: ignore[arg-type]  # classes hash

    def __init__(self, context: RelayContext) -> None:
        self.context = context

    async def handle_EHLO(
        self, server: RelaySMTP, session: Session, envelope: SmtpEnvelope, hostname: str, responses: list[str]
    ) -> list[str]:
        """aiosmtpd's EHLO lines, plus PIPELINING (RFC 2920: commands are read and answered
        strictly in order, tests/relay/test_pipelining_in.py) and ENHANCEDSTATUSCODES
        (RFC 2034: RelaySMTP.push); without AUTH on a listener that takes no AUTH."""
        session.host_name = hostname
        if server.listener.auth == "none":
            responses = [line for line in responses if not line[4:].upper().startswith("AUTH")]
        return [*responses[:-1], "250-PIPELINING", "250-ENHANCEDSTATUSCODES", responses[-1]]

    async def handle_MAIL(
        self, server: RelaySMTP, session: Session, envelope: SmtpEnvelope, address: str, options: list[str]
    ) -> str:
        account = server.account
        assert account is not None  # check_auth_needed ran first
        problem = address_problem(address, envelope.smtp_utf8, sender=True)
        if problem is not None:
            return problem
        meter = self.context.meter
        try:
            domains, refusal = await meter.mail_check(account)
        except Exception as error:
            server.log.error("smtp.meter_unavailable", account=account, stage="MAIL", error=repr(error))
            return replies.METER_UNAVAILABLE
        # The null reverse-path (RFC 5321 4.5.5: bounces, DSNs, vacation replies) names no
        # domain: any account may send it, and it is counted and delivered like any email.
        if address != NULL_SENDER and ("@" not in address or not domain_allowed(address.rpartition("@")[2], domains)):
            server.context.observer.transaction("5xx", "sender_refused")
            server.log.info(
                "smtp.transaction",
                queue_id=None,
                account=account,
                client=server._client(),
                recipients=0,
                result="sender_refused",
            )
            return replies.sender_not_allowed(address, account)
        if refusal is not None:
            reason = str(getattr(refusal, "value", refusal))
            server.context.observer.transaction("4xx", reason)
            server.log.info(
                "smtp.transaction",
                queue_id=None,
                account=account,
                client=server._client(),
                recipients=0,
                result="deferred",
                reason=reason,
            )
            return replies.mail_refused(reason)
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return replies.SENDER_OK

    async def handle_RCPT(
        self, server: RelaySMTP, session: Session, envelope: SmtpEnvelope, address: str, options: list[str]
    ) -> str:
        account = server.account
        assert account is not None
        problem = address_problem(address, envelope.smtp_utf8)
        if problem is not None:
            server.refused += 1
            return problem
        if server.recipient_seen(envelope, address):
            # A repeated recipient (Postfix's cleanup drops them too): accepted, but neither
            # held nor counted nor sent again, so each counted recipient is sent once and
            # gets exactly one result.
            server.duplicates += 1
            return replies.RECIPIENT_OK
        limit = self.context.settings.recipients_per_message
        if len(envelope.rcpt_tos) >= limit:
            server.refused += 1
            return replies.TOO_MANY_RECIPIENTS.format(limit=limit)
        # The hold id is the session's before the reserve starts, and the reserve runs
        # shielded: a disconnect meanwhile releases the hold once the reserve is done.
        if server.hold_id is None:
            server.hold_id = secrets.token_hex(12)
        # (A client's EOF cancels this coroutine before connection_lost runs, so
        # `reserving` is cleared only once the reserve is over, never on cancellation.)
        reserve = asyncio.ensure_future(self.context.meter.reserve(account, server.hold_id, 1, recipient=address))
        server.reserving = reserve
        started = time.monotonic()
        try:
            grant = await asyncio.shield(reserve)
            self.context.observer.meter_call("reserve", time.monotonic() - started)
        except Exception as error:
            server.reserving = None
            server.log.error("smtp.meter_unavailable", account=account, stage="RCPT", error=repr(error))
            server.refused += 1
            return replies.METER_UNAVAILABLE
        server.reserving = None
        if grant.granted < 1:
            server.refused += 1
            if grant.refusal == "rate_limited" and grant.rate is not None:
                return replies.rate_reached(grant.rate, account, grant.retry_after or 1)
            if grant.refusal == replies.SUPPRESSED:
                # On the account's suppression list: refused for good, nothing held, nothing billed.
                entry = grant.suppressed
                server.log.info("smtp.recipient_suppressed", account=account, recipient=address, result="refused")
                return replies.recipient_suppressed(address, account, entry.created_at, entry.reason)
            return replies.rcpt_refused(grant.refusal or "quota_exhausted")
        server.add_recipient(envelope, address, options)
        return replies.RECIPIENT_OK

    async def handle_DATA(self, server: RelaySMTP, session: Session, envelope: SmtpEnvelope) -> str:
        context = self.context
        account = server.account
        assert account is not None and server.hold_id is not None
        queue_id = new_queue_id()
        started = time.monotonic()
        raw = envelope.original_content or b""
        recipients = len(envelope.rcpt_tos)

        def logged(result: str, reply: str) -> str:
            context.observer.transaction(reply_class(reply), result)
            if result == "accepted":
                context.observer.accepted(recipients, account)
            server.log.info(
                "smtp.transaction",
                queue_id=queue_id,
                account=account,
                client=server._client(),
                recipients=recipients,
                refused=server.refused,
                duplicates=server.duplicates,
                size=len(raw),
                result=result,
                reply=reply[:3],
                seconds=round(time.monotonic() - started, 4),
            )
            server.refused = server.duplicates = 0
            envelope.mail_from = None  # this transaction is logged; no "abandoned" line
            return reply

        if server.bare_newline:
            if context.settings.bare_newlines != "normalize":
                return logged("bare_newline", replies.BARE_NEWLINE)  # the hold goes at the reset after DATA
            raw = await crlf_line_ends(raw)
        spooled = Envelope(
            queue_id=queue_id,
            account=account,
            mail_from="" if envelope.mail_from == NULL_SENDER else envelope.mail_from or "",
            recipients=list(envelope.rcpt_tos),
            received_at=time.time(),
            client=server._client(),
        )
        received = _received_header(context.settings.hostname, session, server, queue_id)
        # Shielded: a client that disconnects now does not stop a message half way
        # between the spool and the meter; the pipeline finishes on its own.
        envelope.mail_from = None  # logged below, or by the pipeline if the client is gone
        server.storing = True
        # From here the store pipeline owns the hold: it commits or releases it.
        hold_id, server.hold_id = server.hold_id, None
        store = context.spawn(self._store(server, hold_id, spooled, received, raw))
        try:
            result, reply = await asyncio.shield(store)
        except asyncio.CancelledError:
            store.add_done_callback(lambda done: done.cancelled() or logged(*done.result()))
            raise
        finally:
            server.storing = False
        return logged(result, reply)

    async def _store(
        self, server: RelaySMTP, hold_id: str, spooled: Envelope, received: bytes, raw: bytes
    ) -> tuple[str, str]:
        """Spool (our Received header, then the message), commit, activate. Returns
        (result, reply); never raises, never leaks the hold."""
        context = self.context
        queue_id, account = spooled.queue_id, spooled.account
        inline: bytes | None = None
        limit = context.inline_max_bytes
        if limit and context.on_accepted_inline is not None and len(received) + len(raw) < limit:
            inline = pack(spooled, received, raw)
            if len(inline) > limit:
                inline = None
        try:
            if inline is None:
                await asyncio.to_thread(context.spool.write_incoming, spooled, received, raw)
        except Exception as error:
            server.log.error("spool.write_failed", queue_id=queue_id, account=account, error=repr(error))
            context.spawn(server._release(hold_id))  # in the background: it retries while the store is down
            if isinstance(error, OSError):
                return "deferred", replies.SPOOL_FULL if error.errno == 28 else replies.SPOOL_FAILED
            return "deferred", replies.INTERNAL_ERROR
        try:
            started = time.monotonic()
            await context.meter.commit(
                hold_id, queue_id, len(spooled.recipients), campaign_tag(raw), account=account, spooled=inline
            )
            context.observer.meter_call("commit", time.monotonic() - started)
        except Exception as error:
            server.log.error(
                "smtp.meter_unavailable", queue_id=queue_id, account=account, stage="DATA", error=repr(error)
            )
            if not await self._committed_after_all(queue_id):
                context.spawn(server._release(hold_id))  # in the background: it retries while the store is down
                return "deferred", replies.METER_UNAVAILABLE
        # Committed: the message is accepted. From here on it is delivered whatever happens.
        if inline is not None and context.on_accepted_inline is not None:
            context.on_accepted_inline(queue_id, inline)  # durable in the store with its usage
            return "accepted", replies.QUEUED.format(queue_id=queue_id)
        try:
            context.spool.activate(queue_id)  # one rename, no fsync: cheaper than a thread hop
            context.on_accepted(queue_id)
        except Exception as error:  # it stays in incoming/; the next start activates it
            server.log.error("spool.activate_failed", queue_id=queue_id, account=account, error=repr(error))
        return "accepted", replies.QUEUED.format(queue_id=queue_id)

    async def _committed_after_all(self, queue_id: str) -> bool:
        """After a failed commit: did it land anyway? If the meter cannot say, the spooled
        file stays in incoming/ for the next start to settle; it is dropped only when
        the meter says for sure that it never committed."""
        try:
            committed = await self.context.meter.message_committed(queue_id)
        except Exception:
            return False
        if not committed:
            await asyncio.to_thread(self.context.spool.discard_incoming, queue_id)
        return committed

    async def handle_exception(self, error: Exception) -> str:
        """aiosmtpd would answer `500 Error: (Type) text` with our internals in it."""
        structlog.get_logger("mailmeter.smtp").error("smtp.error", error=repr(error), result="internal_error")
        return replies.INTERNAL_ERROR


# RFC 3463 codes for aiosmtpd's replies that have none, by reply code (as Postfix's);
# any other code gets its class's X.0.0.
_ENHANCED_DEFAULT = {
    220: b"2.0.0",  # 220 Ready to start TLS (the banner gets none)
    221: b"2.0.0",
    250: b"2.0.0",
    252: b"2.0.0",
    454: b"4.7.0",
    500: b"5.5.2",
    501: b"5.5.4",
    502: b"5.5.1",
    503: b"5.5.1",
    504: b"5.5.4",
    530: b"5.7.0",
    535: b"5.7.8",
    538: b"5.7.11",
    552: b"5.3.4",
    555: b"5.5.4",
}
# Replies never held back for a pipelined group: the banner and STARTTLS's go-ahead (220),
# the replies aiosmtpd closes the connection after (221 to QUIT, 421, 502 "goodbye" to
# too many unknown commands), and the prompts after which the client sends something
# other than a command (354, 334).
_FLUSH_NOW = {b"220", b"221", b"334", b"354", b"421", b"502"}
_HAS_ENHANCED = re.compile(rb"[245]\.\d{1,3}\.\d{1,3}(?: |$)")


class _Tracked:
    """One session's handler of an SMTP command, setting `session.command` while it runs.
    A small object per command and session (a functools.wraps closure per command cost
    3.8% of the relay's samples in session set-up); HELP reads aiosmtpd's @syntax
    attributes through it."""

    __slots__ = ("method", "name", "session")

    def __init__(self, session: RelaySMTP, name: str, method: Callable[[str | None], Any]) -> None:
        self.session = session
        self.name = name
        self.method = method

    async def __call__(self, arg: str | None) -> None:
        self.session.command = self.name
        try:
            await self.method(arg)
        finally:
            self.session.command = "-"

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self.method, attribute)


def with_enhanced_code(line: bytes) -> bytes:
    """`line` with an RFC 3463 enhanced status code after its reply code, unless it has one
    or is a 334/354 prompt (whose text is not a status: a base64 challenge, a go-ahead)."""
    code, separator, text = line[:3], line[3:4], line[4:]
    if not code.isdigit() or code in (b"334", b"354") or separator not in (b" ", b"-", b""):
        return line
    if code[:1] not in b"245" or _HAS_ENHANCED.match(text):
        return line
    enhanced = _ENHANCED_DEFAULT.get(int(code), code[:1] + b".0.0")
    return code + (separator or b" ") + enhanced + (b" " + text if text else b"")


def safe_reply(status: str | bytes) -> bytes:
    """One well-formed reply line: no CR, LF or other control bytes, valid UTF-8."""
    raw = status.encode("utf-8", "replace") if isinstance(status, str) else status
    return _CONTROL.sub(b"?", raw)


def recipient_key(address: str) -> str:
    """What two RCPTs of one transaction must share to be the same recipient.

    Like Postfix's duplicate filter (cleanup), the address as aiosmtpd canonicalized it
    (needless quotes and source routes removed) with letter case ignored, in the local
    part too: RFC 5321 lets a local part be case-sensitive, but mailbox providers are
    not, and a Postfix upstream would drop the second spelling after we had counted it.
    Only ASCII letters are folded: two spellings that differ in another letter's case
    stay two recipients, each counted, sent and given a result.
    """
    return address.translate(_ASCII_LOWER)


def address_problem(address: str, smtputf8: bool, sender: bool = False) -> str | None:
    """Why an address cannot be taken, or None. Checked before anything is reserved, so
    an address delivery could never send is not billed (and cannot poison the queue)."""
    if not sendable_address(address, allow_empty=sender):
        return replies.ADDRESS_INVALID
    if not address.isascii() and not smtputf8:
        return replies.ADDRESS_NEEDS_SMTPUTF8
    return None


def _received_header(hostname: str, session: Session, server: RelaySMTP, queue_id: str) -> bytes:
    peer = server._client()
    helo = _HELO_UNSAFE.sub("?", session.host_name or "unknown")[:255]
    protocol = "ESMTP" if session.extended_smtp else "SMTP"
    if session.ssl is not None:
        protocol += "S"
    if server.account_via == "auth":
        protocol += "A"
    stamp = format_datetime(datetime.now(timezone.utc))
    line = (
        f"Received: from {helo} ([{peer}])\r\n"
        f"\tby {hostname} (mailmeter) with {protocol} id {queue_id};\r\n\t{stamp}\r\n"
    )
    return line.encode("utf-8", "replace")


def campaign_tag(message: bytes) -> str:
    """The application's campaign tag (X-Mailmeter-Campaign header) for usage breakdowns.

    Only the header block is read. A missing or malformed tag counts as untagged ("").
    Most messages have no tag: a search for the name spares them the email package's
    header parser, a tenth of a millisecond per message.
    """
    end = message.find(b"\r\n\r\n", 0, 65536)
    if _CAMPAIGN_NAME not in (message[:65536] if end < 0 else message[:end]).lower():
        return ""
    headers = BytesHeaderParser(policy=compat32).parsebytes(message[:65536], headersonly=True)
    value = (headers.get(CAMPAIGN_HEADER) or "").strip()
    return value if _CAMPAIGN_TAG.fullmatch(value) else ""


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"
