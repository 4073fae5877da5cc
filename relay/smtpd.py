"""SMTP in: aiosmtpd on the service's own event loop, with the metering hook.

The order of a transaction, which is the relay's core promise:

    RCPT   reserve one email per recipient in the meter (atomic; 452 when it does not fit)
    DATA   write + fsync the message into spool/incoming
           commit the hold in the meter under the queue id   <- the commit point
           move the message to spool/active, answer 250 with the queue id
    RSET, QUIT, new EHLO, disconnect, any failure: release the hold

aiosmtpd traps handled here (REFERENCES.md): its `authenticator` is synchronous,
so AUTH PLAIN/LOGIN are finished asynchronously in `_finish_auth`; it answers
`555` to `MAIL FROM:<..> AUTH=<>`, so the AUTH parameter is stripped first.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import format_datetime
from typing import Any, Protocol

import structlog
from aiosmtpd.smtp import SMTP, AuthResult, Envelope as SmtpEnvelope, LoginPassword, Session

from relay import replies
from relay.delivery import new_queue_id
from relay.spool import Envelope, Spool

_AUTH_PARAM = re.compile(r"\s+AUTH=\S*", re.IGNORECASE)
CAMPAIGN_HEADER = "X-Mailmeter-Campaign"
_CAMPAIGN_TAG = re.compile(r"[A-Za-z0-9._:/-]{1,64}")


class MeterPort(Protocol):
    """What SMTP-in needs from the meter. Any method may raise: the relay fails closed."""

    async def authenticate(self, name: str, password: bytes) -> Any | None: ...
    async def account_for_client(self, address: str) -> Any | None: ...
    async def sender_domains(self, name: str) -> tuple[str, ...]: ...
    async def sending_refusal(self, name: str) -> Any | None: ...
    async def reserve(self, name: str, hold_id: str | None = None, emails: int = 1) -> Any: ...
    async def commit(self, hold_id: str, queue_id: str, emails: int, campaign: str = "") -> None: ...
    async def release(self, hold_id: str) -> int: ...


@dataclass
class SmtpSettings:
    hostname: str
    message_size_limit: int
    recipients_per_message: int
    tls_context: ssl.SSLContext | None
    plaintext_auth: bool  # allow AUTH before STARTTLS (only ever on loopback)
    timeout: float = 300.0


@dataclass
class RelayContext:
    """Everything a session needs; shared by all sessions of one server."""

    settings: SmtpSettings
    meter: MeterPort
    spool: Spool
    on_accepted: Callable[[str], None]
    background: set[asyncio.Task[Any]] = field(default_factory=set)

    def spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)


@dataclass
class _Pending:
    login: bytes
    password: bytes


class RelaySMTP(SMTP):
    """One SMTP session. Holds the session's account and its open hold."""

    def __init__(self, context: RelayContext) -> None:
        settings = context.settings
        super().__init__(
            _Handler(context),
            data_size_limit=settings.message_size_limit,
            hostname=settings.hostname,
            ident="mailmeter",
            tls_context=settings.tls_context,
            require_starttls=False,
            timeout=settings.timeout,
            auth_required=False,
            auth_require_tls=not settings.plaintext_auth,
            enable_SMTPUTF8=True,
            loop=asyncio.get_running_loop(),
        )
        self.context = context
        self.log = structlog.get_logger("mailmeter.smtp")
        self.account: str | None = None
        self.account_via: str = ""
        self.network_checked = False
        self.hold_id: str | None = None
        self.refused = 0

    # -- account of the session ---------------------------------------------------

    async def _resolve_account(self) -> str | None:
        if self.account is None and not self.network_checked:
            self.network_checked = True
            assert self.session is not None
            peer = self.session.peer
            address = peer[0] if isinstance(peer, tuple) else ""
            found = await self.context.meter.account_for_client(address)
            if found is not None:
                self.account, self.account_via = found.name, "network"
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
            await self.push(replies.AUTH_REQUIRED)
            return True
        return False

    # -- AUTH, checked without blocking the loop ------------------------------------

    def _authenticate(self, mechanism: str, auth_data: Any) -> AuthResult:
        assert isinstance(auth_data, LoginPassword)
        return AuthResult(success=False, handled=False, auth_data=_Pending(auth_data.login, auth_data.password))

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        return await self._finish_auth(await super().auth_PLAIN(_, args))

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        return await self._finish_auth(await super().auth_LOGIN(_, args))

    async def _finish_auth(self, result: AuthResult) -> AuthResult:
        pending = result.auth_data
        if not isinstance(pending, _Pending):
            return result
        name = pending.login.decode("utf-8", "replace")
        try:
            account = await self.context.meter.authenticate(name, pending.password)
        except Exception as error:
            self.log.warning("smtp.auth", account=name, result="tempfail", error=repr(error))
            return AuthResult(success=False, handled=False, message=replies.AUTH_TEMPFAIL)
        if account is None:
            self.log.info("smtp.auth", account=name, client=self._client(), result="failed")
            return AuthResult(success=False, handled=False)
        self.account, self.account_via = account.name, "auth"
        self.log.info("smtp.auth", account=account.name, client=self._client(), result="ok")
        return AuthResult(success=True, auth_data=account.name)

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
        super()._set_post_data_state()

    def connection_lost(self, error: Exception | None) -> None:
        self._end_transaction("disconnected")
        super().connection_lost(error)

    def _end_transaction(self, result: str) -> None:
        hold_id, self.hold_id = self.hold_id, None
        envelope = self.envelope
        if hold_id is not None:
            self.context.spawn(self._release(hold_id))
        if envelope is not None and envelope.mail_from and result:
            self.log.info(
                "smtp.transaction",
                queue_id=None,
                account=self.account,
                client=self._client(),
                recipients=len(envelope.rcpt_tos),
                refused=self.refused,
                result=result,
            )
        self.refused = 0

    async def _release(self, hold_id: str) -> None:
        try:
            await self.context.meter.release(hold_id)
        except Exception as error:
            # The hold stays in the store; it is released when this node restarts.
            self.log.error("meter.release_failed", hold_id=hold_id, error=repr(error))

    def _client(self) -> str:
        peer = self.session.peer if self.session else None
        return peer[0] if isinstance(peer, tuple) else str(peer)


class _Handler:
    """aiosmtpd hooks. Each returns the reply line verbatim."""

    def __init__(self, context: RelayContext) -> None:
        self.context = context

    async def handle_MAIL(
        self, server: RelaySMTP, session: Session, envelope: SmtpEnvelope, address: str, options: list[str]
    ) -> str:
        account = server.account
        assert account is not None  # check_auth_needed ran first
        meter = self.context.meter
        try:
            domains = await meter.sender_domains(account)
            refusal = await meter.sending_refusal(account)
        except Exception as error:
            server.log.error("smtp.meter_unavailable", account=account, stage="MAIL", error=repr(error))
            return replies.METER_UNAVAILABLE
        domain = address.rpartition("@")[2].lower().rstrip(".")
        if "@" not in address or domain not in domains:
            server.log.info("smtp.transaction", queue_id=None, account=account, client=server._client(),
                            recipients=0, result="sender_refused")
            return replies.sender_not_allowed(address, account)
        if refusal is not None:
            reason = str(getattr(refusal, "value", refusal))
            server.log.info("smtp.transaction", queue_id=None, account=account, client=server._client(),
                            recipients=0, result="deferred", reason=reason)
            return replies.mail_refused(reason)
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return replies.SENDER_OK

    async def handle_RCPT(
        self, server: RelaySMTP, session: Session, envelope: SmtpEnvelope, address: str, options: list[str]
    ) -> str:
        account = server.account
        assert account is not None
        limit = self.context.settings.recipients_per_message
        if len(envelope.rcpt_tos) >= limit:
            server.refused += 1
            return replies.TOO_MANY_RECIPIENTS.format(limit=limit)
        try:
            grant = await self.context.meter.reserve(account, server.hold_id, 1)
        except Exception as error:
            server.log.error("smtp.meter_unavailable", account=account, stage="RCPT", error=repr(error))
            server.refused += 1
            return replies.METER_UNAVAILABLE
        server.hold_id = grant.hold_id
        if grant.granted < 1:
            server.refused += 1
            return replies.rcpt_refused(grant.refusal or "quota_exhausted")
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return replies.RECIPIENT_OK

    async def handle_DATA(self, server: RelaySMTP, session: Session, envelope: SmtpEnvelope) -> str:
        context = self.context
        account = server.account
        assert account is not None and server.hold_id is not None
        hold_id = server.hold_id
        queue_id = new_queue_id()
        started = time.monotonic()
        raw = envelope.original_content or b""
        message = _received_header(context.settings.hostname, session, server, queue_id) + raw
        spooled = Envelope(
            queue_id=queue_id,
            account=account,
            mail_from=envelope.mail_from or "",
            recipients=list(envelope.rcpt_tos),
            received_at=time.time(),
            client=server._client(),
        )
        recipients = len(envelope.rcpt_tos)

        def logged(result: str, reply: str) -> str:
            server.log.info(
                "smtp.transaction",
                queue_id=queue_id,
                account=account,
                client=server._client(),
                recipients=recipients,
                refused=server.refused,
                size=len(raw),
                result=result,
                reply=reply[:3],
                seconds=round(time.monotonic() - started, 4),
            )
            server.refused = 0
            envelope.mail_from = None  # this transaction is logged; no "abandoned" line
            return reply

        try:
            await asyncio.to_thread(context.spool.write_incoming, spooled, message)
        except OSError as error:
            server.log.error("spool.write_failed", queue_id=queue_id, error=repr(error))
            reply = replies.SPOOL_FULL if error.errno == 28 else replies.SPOOL_FAILED
            return logged("deferred", reply)  # the hold is released by _set_rset_state
        try:
            await context.meter.commit(hold_id, queue_id, recipients, campaign_tag(raw))
        except Exception as error:
            server.log.error("smtp.meter_unavailable", account=account, stage="DATA", error=repr(error))
            await asyncio.to_thread(context.spool.discard_incoming, queue_id)
            return logged("deferred", replies.METER_UNAVAILABLE)
        # Committed: the message is accepted. From here on it is delivered whatever happens.
        server.hold_id = None
        try:
            await asyncio.to_thread(context.spool.activate, queue_id)
            context.on_accepted(queue_id)
        except OSError as error:
            server.log.error("spool.activate_failed", queue_id=queue_id, error=repr(error))
        return logged("accepted", replies.QUEUED.format(queue_id=queue_id))


def _received_header(hostname: str, session: Session, server: RelaySMTP, queue_id: str) -> bytes:
    peer = server._client()
    helo = session.host_name or "unknown"
    protocol = "ESMTP" if session.extended_smtp else "SMTP"
    if session.ssl is not None:
        protocol += "S"
    if server.account_via == "auth":
        protocol += "A"
    stamp = format_datetime(datetime.now(timezone.utc))
    line = f"Received: from {helo} ([{peer}])\r\n\tby {hostname} (mailmeter) with {protocol} id {queue_id};\r\n\t{stamp}\r\n"
    return line.encode("utf-8", "replace")


def campaign_tag(message: bytes) -> str:
    """The application's campaign tag (X-Mailmeter-Campaign header) for usage breakdowns.

    Only the header block is read. A missing or malformed tag counts as untagged ("").
    """
    headers = BytesHeaderParser(policy=compat32).parsebytes(message[:65536], headersonly=True)
    value = (headers.get(CAMPAIGN_HEADER) or "").strip()
    return value if _CAMPAIGN_TAG.fullmatch(value) else ""


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"
