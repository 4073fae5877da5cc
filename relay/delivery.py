"""Delivery out: workers take accepted messages from the spool and relay them upstream.

Each worker keeps its own upstream connection open between messages. Every
attempt classifies each recipient (delivered; deferred, a soft bounce; failed,
a hard bounce), writes the new state to the spool, then reports each result to
the meter. A result is marked reported only after the meter took it, and the
meter counts a final result once per recipient, so a crash between the two
steps neither loses nor doubles a result.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import re
import secrets
import signal
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any, Protocol

import aiosmtplib
import structlog
from aiosmtplib.email import parse_address
from aiosmtplib.typing import SMTPStatus

from mailmeter.relay.data import crlf_line_ends, has_bare_newline
from mailmeter.relay.dsn import FailedRecipient, build_dsn, reply_codes
from mailmeter.relay.observe import NoObserver, RelayObserver
from mailmeter.relay.pipelining import PipeliningSMTP, pipelined_transaction, positive, refusal, send_message_data
from mailmeter.relay.spool import Envelope, InlineSpool, QueueState, RecipientState, Spool, initial_state, unpack
from mailmeter.relay.upstreams import HEALTH_FILE, UpstreamHealth, upstream_label

# Inline-spooled messages just accepted are kept in memory for their first attempt (no read
# back from the store), up to this many octets in all; beyond it they are read from the store.
FRESH_INLINE_BYTES = 32 * 1024 * 1024


class ResultSink(Protocol):
    """Where per-recipient results go (the meter). Raises when it cannot record.

    result: the delivery verdict (delivered, deferred, soft_bounced: temporary failures
    until `max_age`, hard_bounced: refused permanently); detail: the reply behind it, and
    code / enhanced its reply code and enhanced status code when it has them. What the
    verdict bills as is the meter's business, not the relay's. One more verdict is final
    without an attempt: deleted (the operator deleted the message from the queue).
    """

    async def record_result(
        self,
        queue_id: str,
        recipient: str,
        result: str,
        detail: str = "",
        code: int | None = None,
        enhanced: str | None = None,
    ) -> bool: ...


@dataclass(frozen=True)
class UpstreamConfig:
    host: str
    port: int
    tls: str = "none"  # none | starttls | tls
    username: str | None = None
    password: str | None = None
    timeout: float = 30.0
    verify_certificate: bool = True


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff, as Postfix does from 300 s up to 4000 s, within a maximum age."""

    first_delay: float = 300.0
    factor: float = 2.0
    max_delay: float = 4000.0
    max_age: float = 5 * 86400.0

    def delay(self, attempts: int) -> float:
        return min(self.first_delay * self.factor ** max(attempts - 1, 0), self.max_delay)


@dataclass(frozen=True)
class QueueEntry:
    """One message in the queue as the operator sees it (`mailmeter queue list/show`).

    status: ready (to be attempted now), active (being attempted), deferred (waiting for
    its next attempt) or held; deleted in what `queue delete` answers. recipients: (address,
    status, last reply) of each. Times are Unix seconds; next_attempt_at None: held, or not
    attempted yet.
    """

    queue_id: str
    account: str | None  # None: a bounce the relay made
    sender: str
    received_at: float
    size: int  # octets of the message as spooled (the Received header relay added included)
    status: str
    pending: list[str]
    recipients: list[tuple[str, str, str]]
    attempts: int
    last_attempt_at: float | None
    next_attempt_at: float | None
    last_reply: str


class UnknownMessage(LookupError):
    """No message with this queue id in this spool."""


class MessageBusy(RuntimeError):
    """The message is being attempted (or changed) right now: try again in a moment."""


@dataclass(frozen=True)
class Outcome:
    status: str  # delivered | deferred (retried) | hard_bounced (refused for good, not retried)
    reply: str
    # The upstream failed as a server (connection, timeout, 421, not SMTP, our AUTH refused):
    # the recipient moves to the next upstream at once (relay/upstreams.py).
    upstream_failure: bool = False


def new_queue_id() -> str:
    """Unique across nodes sharing a meter: time-ordered prefix plus randomness."""
    return f"{int(time.time() * 1000):011X}{secrets.token_hex(5).upper()}"


class Delivery:
    def __init__(
        self,
        spool: Spool,
        results: ResultSink,
        upstream: UpstreamConfig | Sequence[UpstreamConfig],
        retry: RetryPolicy,
        hostname: str,
        workers: int = 4,
        clock: Callable[[], float] = time.time,
        observer: RelayObserver | None = None,
        upstream_down_seconds: float = 30.0,
        inline: InlineSpool | None = None,
    ) -> None:
        self.spool = spool
        self.inline = inline  # the inline spool (messages kept in the meter's commit), when on
        self._inline_ids: set[str] = set()  # queue ids of inline-spooled messages in the queue
        self._fresh: dict[str, bytes] = {}  # just accepted inline: their data, for the first attempt
        self._fresh_bytes = 0
        self._finished: set[str] = set()  # inline messages delivered whose row could not be dropped yet
        self.results = results
        self.upstreams = _upstream_list(upstream)
        # Health of each upstream (relay/upstreams.py); written to the spool for the CLI once started.
        self.health = UpstreamHealth(down_seconds=upstream_down_seconds)
        self.health.configure(self.upstreams)
        self.retry = retry
        self.hostname = hostname
        self.workers = workers
        self.clock = clock
        self.observer: RelayObserver = observer or NoObserver()
        self.log = structlog.get_logger("mailmeter.delivery")
        self._ready: asyncio.Queue[str] = asyncio.Queue()
        self._scheduled: dict[str, asyncio.TimerHandle] = {}
        self._known: dict[str, float] = {}  # queue id -> when this node first queued it
        self._tasks: list[asyncio.Task[None]] = []
        self._ready_ids: set[str] = set()  # in _ready: a queue id is never there twice
        self._busy: set[str] = set()  # attempted by a worker or changed by the operator right now
        self._stopping = False
        self._large_senders: ProcessPoolExecutor | None = None  # processes for _send_large, started at the first

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        """Resume the spool where it stopped, then start the workers."""
        self.health.state_file = self.spool.root / HEALTH_FILE  # the spool is ours now
        self.health.configure(self.upstreams)
        for queue_id in await asyncio.to_thread(self.spool.active_ids):
            envelope = await asyncio.to_thread(self.spool.read_envelope, queue_id)
            state = await asyncio.to_thread(self.spool.load_state, envelope)
            self._known[queue_id] = envelope.received_at
            self._resume(queue_id, state)
        if self.inline is not None:  # the messages kept in the store: resumed the same way
            for queue_id in await self.inline.spooled_ids():
                data = await self.inline.read_spooled(queue_id)
                if data is None:
                    continue
                envelope, _ = unpack(data)
                state = await asyncio.to_thread(self.spool.load_state, envelope)
                self._inline_ids.add(queue_id)
                self._known[queue_id] = envelope.received_at
                self._resume(queue_id, state)
        self._tasks = [asyncio.create_task(self._worker(n)) for n in range(self.workers)]

    def _resume(self, queue_id: str, state: QueueState) -> None:
        """Schedule a message found at start: at its next attempt, or now when all it has
        left is to report its results (a `queue delete` cut off before the meter heard of
        it), or not at all while it is held."""
        if state.held:
            return
        self._schedule(queue_id, 0.0 if not state.pending() else state.next_attempt_at)

    async def stop(self, grace: float = 10.0) -> None:
        """Stop taking work, let attempts in flight finish (up to `grace` s), then cancel."""
        for handle in self._scheduled.values():
            handle.cancel()
        self._scheduled.clear()
        self._stopping = True
        for _ in self._tasks:
            self._ready.put_nowait(_STOP)
        if self._tasks:
            _, late = await asyncio.wait(self._tasks, timeout=grace)
            for task in late:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self._stop_large_senders()

    def _stop_large_senders(self) -> None:
        """Stop the large-message processes now: a send still in flight is cut off (its
        message is tried again, as after any lost connection) rather than holding up the exit."""
        pool, self._large_senders = self._large_senders, None
        if pool is None:
            return
        processes = list(getattr(pool, "_processes", {}).values())  # no public way before Python 3.14
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.kill()  # they ignore SIGTERM (_large_sender_started)

    def reconfigure(
        self,
        upstream: UpstreamConfig | Sequence[UpstreamConfig],
        retry: RetryPolicy,
        upstream_down_seconds: float | None = None,
    ) -> None:
        """A reloaded config: the next attempt uses the new upstreams and retry policy.

        Workers drop a connection opened to an upstream that is not next in line before
        their next message; an upstream kept in the list keeps its health.
        """
        self.upstreams = _upstream_list(upstream)
        self.health.configure(self.upstreams, upstream_down_seconds)
        self.retry = retry

    @property
    def upstream(self) -> UpstreamConfig:
        """The first configured upstream."""
        return self.upstreams[0]

    @property
    def queue_depth(self) -> int:
        return len(self._known)

    def oldest_age(self) -> float:
        """Seconds since the oldest message still in the queue was queued (0 when empty)."""
        return self.clock() - min(self._known.values()) if self._known else 0.0

    def submit(self, queue_id: str) -> None:
        """A message just became active in the spool: try it now."""
        self._schedule(queue_id, 0.0)

    def submit_inline(self, queue_id: str, data: bytes) -> None:
        """A message just committed with its usage in the store (the inline spool, `pack`'s
        layout): try it now, from memory the first time."""
        self._inline_ids.add(queue_id)
        if self._fresh_bytes + len(data) <= FRESH_INLINE_BYTES:
            self._fresh[queue_id] = data
            self._fresh_bytes += len(data)
        self._schedule(queue_id, 0.0)

    async def _read(self, queue_id: str) -> tuple[Envelope, bytes, QueueState] | None:
        """A queued message and its delivery state; None once it is gone."""
        if queue_id in self._finished:  # delivered; only its removal failed: try that again
            if not await self._remove(queue_id):
                raise ConnectionError("the inline spool could not forget a delivered message")
            return None
        if queue_id not in self._inline_ids:
            try:
                if self.spool.size(queue_id) <= INLINE_READ:  # from the page cache: cheaper than a thread hop
                    return self.spool.read_with_state(queue_id)
                return await asyncio.to_thread(self.spool.read_with_state, queue_id)
            except FileNotFoundError:
                return None
        data = self._fresh.pop(queue_id, None)
        if data is not None:
            self._fresh_bytes -= len(data)
            envelope, body = unpack(data)
            # Just accepted by this process and not yet tried: it has no state file (one is
            # written only after an attempt), so none is looked for.
            return envelope, body, initial_state(envelope)
        assert self.inline is not None
        data = await self.inline.read_spooled(queue_id)
        if data is None:
            self._inline_ids.discard(queue_id)
            return None
        envelope, body = unpack(data)
        return envelope, body, await asyncio.to_thread(self.spool.load_state, envelope)

    async def _remove(self, queue_id: str) -> bool:
        """Forget a finished message: its row in the store (inline) or its file, and its state
        file. False if the store could not be reached: the message is then kept as finished
        (`_finished`) and only its removal is tried again, never its delivery."""
        if queue_id in self._inline_ids:
            assert self.inline is not None
            try:
                await self.inline.drop_spooled(queue_id)
            except Exception as error:
                self.log.warning("delivery.remove_failed", queue_id=queue_id, error=repr(error))
                self._finished.add(queue_id)
                return False
            self._inline_ids.discard(queue_id)
            self._finished.discard(queue_id)
            self.spool.remove_state(queue_id)  # one unlink, no fsync: cheaper than a thread hop
            return True
        self.spool.remove(queue_id)  # two unlinks, no fsync: cheaper than a thread hop
        return True

    def _schedule(self, queue_id: str, at: float) -> None:
        self._known.setdefault(queue_id, self.clock())
        previous = self._scheduled.pop(queue_id, None)
        if previous is not None:
            previous.cancel()
        delay = at - self.clock()
        if delay <= 0:
            self._make_ready(queue_id)
            return
        loop = asyncio.get_running_loop()
        self._scheduled[queue_id] = loop.call_later(delay, self._due, queue_id)

    def _due(self, queue_id: str) -> None:
        self._scheduled.pop(queue_id, None)
        self._make_ready(queue_id)

    def _make_ready(self, queue_id: str) -> None:
        if queue_id not in self._ready_ids:
            self._ready_ids.add(queue_id)
            self._ready.put_nowait(queue_id)

    # -- workers ----------------------------------------------------------------

    async def _worker(self, number: int) -> None:
        connection: list[aiosmtplib.SMTP | None] = [None]
        try:
            while True:
                queue_id = await self._ready.get()
                if queue_id == _STOP or self._stopping:
                    return
                self._ready_ids.discard(queue_id)
                if queue_id in self._busy:  # the operator is changing it (it says when it is due again)
                    continue
                self._busy.add(queue_id)
                try:
                    await self._attempt(queue_id, connection)
                except asyncio.CancelledError:
                    raise
                except Exception as error:  # a bug or disk error must not kill the worker
                    self.log.error("delivery.error", queue_id=queue_id, error=repr(error))
                    self._schedule(queue_id, self.clock() + self.retry.first_delay)
                finally:
                    self._busy.discard(queue_id)
        finally:
            client = connection[0]
            if client is not None and client.is_connected:
                client.close()

    async def _attempt(self, queue_id: str, connection: list[aiosmtplib.SMTP | None]) -> None:
        read = await self._read(queue_id)
        if read is None:
            self._known.pop(queue_id, None)
            return
        envelope, body, state = read
        if state.held:
            return  # `queue release` schedules it again
        pending = state.pending()
        if pending:
            started = time.monotonic()
            outcomes = await self._send(envelope.mail_from, [r.address for r in pending], body, connection)
            state.attempts += 1
            now = self.clock()
            state.last_attempt_at = now
            age = now - envelope.received_at
            next_delay = self.retry.delay(state.attempts)
            expire = age + next_delay > self.retry.max_age
            for recipient in pending:
                outcome = outcomes[recipient.address]
                status = outcome.status
                if status == "deferred" and expire:
                    status = "soft_bounced"
                recipient.status, recipient.reply, recipient.reported = status, outcome.reply, False
                self.observer.delivery_result(status, 1)
            state.next_attempt_at = now + next_delay
            if state.pending() or any(r.status != "delivered" for r in pending):
                # Results are durable before anything else happens (retries and bounces
                # build on them). When every recipient was delivered, the message is
                # removed as soon as the meter has the results; a crash before that sends
                # it again, as a crash before this write would, and the meter counts once.
                await asyncio.to_thread(self.spool.save_state, state)
            self.log.info(
                "delivery.attempt",
                queue_id=queue_id,
                account=envelope.account,
                attempt=state.attempts,
                recipients=len(pending),
                delivered=sum(1 for r in pending if r.status == "delivered"),
                deferred=sum(1 for r in pending if r.status == "deferred"),
                bounced=sum(1 for r in pending if r.status in ("hard_bounced", "soft_bounced")),
                result=_summary(pending),
                reply=next((r.reply for r in pending if r.status != "delivered"), ""),
                seconds=round(time.monotonic() - started, 4),
            )
        # The meter first: a DSN that cannot be queued must not hold results back.
        reporting_ok = await self._report(state, persist=bool(state.pending()))
        await self._bounce(envelope, body, state)
        if reporting_ok and state.unreported():
            reporting_ok = False
        if not reporting_ok:
            await asyncio.to_thread(self.spool.save_state, state)
        if state.done:
            if not await self._remove(queue_id):
                self._schedule(queue_id, self.clock() + min(self.retry.first_delay, 30.0))
                return
            self._known.pop(queue_id, None)
            return
        if not reporting_ok and not state.pending():
            self._schedule(queue_id, self.clock() + min(self.retry.first_delay, 30.0))
        else:
            self._schedule(queue_id, state.next_attempt_at)

    async def _report(self, state: QueueState, persist: bool = True) -> bool:
        """Hand every unreported result to the meter; False if the meter could not take one.

        persist=False: the caller removes the message right after, so the "reported" marks
        need not be written (reporting again after a crash is idempotent in the meter).
        """
        changed = False
        for recipient in state.unreported():
            code, enhanced = reply_codes(recipient.reply)
            try:
                await self.results.record_result(
                    state.queue_id, recipient.address, recipient.status, recipient.reply, code, enhanced
                )
            except Exception as error:
                self.log.warning("delivery.report_failed", queue_id=state.queue_id, error=repr(error))
                if changed:
                    await asyncio.to_thread(self.spool.save_state, state)
                return False
            recipient.reported = True
            changed = True
        if changed and persist:
            await asyncio.to_thread(self.spool.save_state, state)
        return True

    async def _bounce(self, envelope: Envelope, body: bytes, state: QueueState) -> None:
        """Queue an RFC 3464 DSN to the sender for failed recipients not yet bounced.

        Runs on every pass (also after a restart), so a DSN owed when the process
        died is still sent; `state.bounced` makes it once per recipient. Never for a bounce.
        """
        fresh = [
            FailedRecipient(r.address, r.reply, r.status == "hard_bounced")
            for r in state.recipients
            if r.status in ("hard_bounced", "soft_bounced") and r.address not in state.bounced
        ]
        if not fresh:
            return
        if not envelope.mail_from:
            state.bounced.extend(f.address for f in fresh)
            await asyncio.to_thread(self.spool.save_state, state)
            return
        queue_id = new_queue_id()
        try:
            dsn = build_dsn(
                self.hostname,
                envelope.queue_id,
                envelope.mail_from,
                fresh,
                body,
                datetime.fromtimestamp(envelope.received_at, timezone.utc),
            )
        except Exception as error:  # would fail the same way on every pass: give this DSN up
            self.log.error(
                "delivery.bounce_failed",
                queue_id=envelope.queue_id,
                account=envelope.account,
                recipients=len(fresh),
                result="dropped",
                error=repr(error),
            )
            state.bounced.extend(f.address for f in fresh)
            await asyncio.to_thread(self.spool.save_state, state)
            return
        bounce = Envelope(
            queue_id=queue_id,
            account=None,
            mail_from="",
            recipients=[envelope.mail_from],
            received_at=self.clock(),
        )
        await asyncio.to_thread(self.spool.enqueue_local, bounce, dsn)
        state.bounced.extend(f.address for f in fresh)
        await asyncio.to_thread(self.spool.save_state, state)
        self.log.info(
            "delivery.bounce_queued",
            queue_id=queue_id,
            original=envelope.queue_id,
            account=envelope.account,
            recipients=len(fresh),
            result="queued",
        )
        self.submit(queue_id)

    # -- the operator's queue commands (mailmeter queue ...) --------------------------

    async def entries(self) -> list[QueueEntry]:
        """Every message in this node's queue, oldest first: the spool's files (read in one
        thread hop) and the inline spool's messages (each read from memory or the store, their
        state files in one more hop)."""
        read = await asyncio.to_thread(self._read_files)
        heads = []
        for queue_id in sorted(self._inline_ids):
            head = await self._inline_head(queue_id)
            if head is not None:  # else delivered meanwhile
                heads.append(head)
        if heads:
            states = await asyncio.to_thread(lambda: [self.spool.load_state(envelope) for envelope, _ in heads])
            read.extend((envelope, size, state) for (envelope, size), state in zip(heads, states))
        return sorted((self._entry(*found) for found in read), key=lambda entry: (entry.received_at, entry.queue_id))

    def _read_files(self) -> list[tuple[Envelope, int, QueueState]]:
        found = []
        for queue_id in self.spool.active_ids():
            try:
                envelope, size = self.spool.read_head(queue_id)
                found.append((envelope, size, self.spool.load_state(envelope)))
            except FileNotFoundError:  # delivered meanwhile
                continue
        return found

    async def _inline_head(self, queue_id: str) -> tuple[Envelope, int] | None:
        """An inline-spooled message's envelope and size (as `Spool.read_head`); None once it
        is gone or only its removal is left (`_finished`)."""
        if queue_id in self._finished or self.inline is None:
            return None
        data = self._fresh.get(queue_id)  # just accepted: no read from the store
        if data is None:
            data = await self.inline.read_spooled(queue_id)
            if data is None:
                return None
        envelope, body = unpack(data)
        return envelope, len(body)

    async def entry(self, queue_id: str) -> QueueEntry:
        """One message; UnknownMessage when this node's queue does not hold it."""
        return self._entry(*await self._load(queue_id))

    async def _load(self, queue_id: str) -> tuple[Envelope, int, QueueState]:
        """A message's envelope, size and delivery state, from its file or the inline spool
        (whose state, once it has one, is a file too: active/QID.state)."""
        if not _QUEUE_ID.fullmatch(queue_id):
            raise UnknownMessage(queue_id)
        if queue_id in self._inline_ids:
            head = await self._inline_head(queue_id)
            if head is None:
                raise UnknownMessage(queue_id)
            envelope, size = head
            return envelope, size, await asyncio.to_thread(self.spool.load_state, envelope)

        def read() -> tuple[Envelope, int, QueueState]:
            envelope, size = self.spool.read_head(queue_id)
            return envelope, size, self.spool.load_state(envelope)

        try:
            return await asyncio.to_thread(read)
        except FileNotFoundError:
            raise UnknownMessage(queue_id) from None

    def _entry(self, envelope: Envelope, size: int, state: QueueState) -> QueueEntry:
        queue_id = envelope.queue_id
        if state.held:
            status = "held"
        elif queue_id in self._busy:
            status = "active"  # being attempted now
        elif queue_id in self._ready_ids or not state.attempts:
            status = "ready"
        else:
            status = "deferred"
        replies = [r.reply for r in state.recipients if r.reply and r.status != "delivered"]
        return QueueEntry(
            queue_id=queue_id,
            account=envelope.account,
            sender=envelope.mail_from,
            received_at=envelope.received_at,
            size=size,
            status=status,
            pending=[r.address for r in state.pending()],
            recipients=[(r.address, r.status, r.reply) for r in state.recipients],
            attempts=state.attempts,
            last_attempt_at=state.last_attempt_at or None,
            next_attempt_at=None if state.held else max(state.next_attempt_at, 0.0) or None,
            last_reply=replies[-1] if replies else "",
        )

    def flush(self, queue_ids: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
        """Attempt these messages now (Postfix's `postqueue -i`); (flushed, [(id, why not)])."""
        flushed, skipped = [], []
        for queue_id in queue_ids:
            if queue_id not in self._known or queue_id in self._finished:
                skipped.append((queue_id, "not in the queue"))
            elif queue_id in self._busy:
                skipped.append((queue_id, "being attempted right now"))
            elif queue_id not in self._scheduled and queue_id not in self._ready_ids:  # only a held one is neither
                skipped.append((queue_id, "held: release it first (mailmeter queue release)"))
            else:
                self._schedule(queue_id, 0.0)
                flushed.append(queue_id)
        return flushed, skipped

    async def hold(self, queue_id: str, held: bool) -> QueueEntry:
        """Hold (no attempt until released) or release a message; a release attempts it now."""
        async with self._operating(queue_id) as (envelope, size, state):
            if state.held != held:
                state.held = held
                await asyncio.to_thread(self.spool.save_state, state)
            previous = self._scheduled.pop(queue_id, None)
            if previous is not None:
                previous.cancel()
            entry = self._entry(envelope, size, state)
        if not held:
            self._schedule(queue_id, 0.0)
            entry = await self.entry(queue_id)
        self.log.info(
            "queue.held" if held else "queue.released", queue_id=queue_id, account=envelope.account, result="ok"
        )
        return entry

    async def delete(self, queue_id: str, reply: str) -> tuple[QueueEntry, bool]:
        """Give every recipient still pending the final result `deleted` (with `reply`), report
        the results to the meter and forget the message (Postfix's `postsuper -d`, with books
        that balance). No DSN: the operator deleted it. Returns the message as deleted and
        whether the meter has every result (else they are reported again shortly)."""
        removed = False
        async with self._operating(queue_id) as (envelope, size, state):
            for recipient in state.pending():
                recipient.status, recipient.reply, recipient.reported = "deleted", reply, False  # no DSN (_bounce)
                self.observer.delivery_result("deleted", 1)
            state.held = False
            await asyncio.to_thread(self.spool.save_state, state)
            previous = self._scheduled.pop(queue_id, None)
            if previous is not None:
                previous.cancel()
            reported = await self._report(state, persist=True)
            entry = replace(self._entry(envelope, size, state), status="deleted", next_attempt_at=None)
            # Its file, or its row in the store (inline) and its state file. A row the store
            # cannot drop now is dropped by a worker shortly (`_finished`); the message is
            # not listed meanwhile, and its results, reported, are never reported again.
            if state.done and await self._remove(queue_id):
                self._known.pop(queue_id, None)
                removed = True
        if not removed:
            self._schedule(queue_id, self.clock() + min(self.retry.first_delay, 30.0))
        self.log.info(
            "queue.deleted",
            queue_id=queue_id,
            account=envelope.account,
            recipients=sum(1 for r in state.recipients if r.status == "deleted"),
            result="reported" if reported else "report_pending",
        )
        return entry, reported

    @asynccontextmanager
    async def _operating(self, queue_id: str) -> AsyncIterator[tuple[Envelope, int, QueueState]]:
        """The message, kept from the workers while the operator changes it."""
        if queue_id in self._busy:
            raise MessageBusy(queue_id)
        envelope, size, state = await self._load(queue_id)
        if queue_id in self._busy:  # a worker took it while the files were read
            raise MessageBusy(queue_id)
        self._busy.add(queue_id)
        # A just accepted inline message is read from memory with no state file looked for
        # (`_read`): once the operator may have written one (a hold), it is read from the store.
        fresh = self._fresh.pop(queue_id, None)
        if fresh is not None:
            self._fresh_bytes -= len(fresh)
        try:
            yield envelope, size, state
        except BaseException:  # the change failed (a disk error): the message goes on as it was
            if queue_id in self._known and queue_id not in self._scheduled:
                self._schedule(queue_id, max(state.next_attempt_at, self.clock() + 1.0))
            raise
        finally:
            self._busy.discard(queue_id)

    # -- one SMTP conversation upstream ------------------------------------------

    async def _send(
        self,
        sender: str,
        recipients: list[str],
        body: bytes,
        connection: list[aiosmtplib.SMTP | None],
    ) -> dict[str, Outcome]:
        """One outcome per recipient; never raises, so every recipient gets a result.

        An address the upstream cannot be sent (bad syntax) fails alone. Non-ASCII
        recipients go in their own SMTPUTF8 transaction, so an upstream without it
        bounces only those (RFC 6531 3.2); the whole message needs it only when the
        sender or a header is not ASCII (as Postfix decides), whatever the client sent.
        """
        if not sendable_address(sender, allow_empty=True):
            return {r: Outcome("hard_bounced", "553 5.1.7 Sender address cannot be relayed") for r in recipients}
        outcomes = {
            r: Outcome("hard_bounced", "553 5.1.3 Recipient address cannot be relayed")
            for r in recipients
            if not sendable_address(r)
        }
        plain = [r for r in recipients if r not in outcomes and r.isascii()]
        wide = [r for r in recipients if r not in outcomes and not r.isascii()]
        if not sender.isascii() or not _headers_ascii(body):
            plain, wide = [], plain + wide
        for batch, utf8 in ((plain, False), (wide, True)):
            if batch:
                outcomes.update(await self._send_batch(sender, batch, body, connection, utf8))
        return outcomes

    async def _send_batch(
        self,
        sender: str,
        recipients: list[str],
        body: bytes,
        connection: list[aiosmtplib.SMTP | None],
        smtputf8: bool,
    ) -> dict[str, Outcome]:
        """One transaction, on the upstreams in their order of health (relay/upstreams.py):
        the recipients an upstream failed as a server go to the next one at once; every
        other reply (delivered, a recipient refused) is final for this attempt."""
        outcomes: dict[str, Outcome] = {}
        remaining = recipients
        candidates = self.health.order(self.upstreams)
        for index, upstream in enumerate(candidates):
            if len(body) > LARGE_MESSAGE:
                result = await self._send_large(upstream, sender, remaining, body, smtputf8)
            else:
                result = await converse(
                    upstream, self.hostname, sender, remaining, body, connection, smtputf8, self.log
                )
            outcomes.update(result)
            failed = [r for r in remaining if result[r].upstream_failure]
            if not failed:
                if self.health.status(upstream).consecutive_failures:
                    self.log.info("delivery.upstream_up", upstream=upstream_label(upstream), result="up")
                self.health.worked(upstream)
                break
            reply = result[failed[0]].reply
            self.health.failed(upstream, reply)
            following = candidates[index + 1] if index + 1 < len(candidates) else None
            self.log.warning(
                "delivery.upstream_down",
                upstream=upstream_label(upstream),
                error=reply,
                recipients=len(failed),
                down_seconds=self.health.down_seconds,
                next_upstream=upstream_label(following) if following is not None else None,
                result="failover" if following is not None else "deferred",
            )
            remaining = failed
        return outcomes

    async def _send_large(
        self, upstream: UpstreamConfig, sender: str, recipients: list[str], body: bytes, smtputf8: bool
    ) -> dict[str, Outcome]:
        """A large message goes out from a process of its own, on a connection of its own.

        aiosmtplib rewrites the whole message with two regular expressions (line endings,
        dot-stuffing) before it sends it, and a regular expression holds the interpreter's
        lock from its start to its end: for 10 MB, sent from a thread of this process,
        every SMTP session stood still for tens of milliseconds at a time (bench/large_mail.py:
        small messages' p99 650 ms; those two expressions were 59% of the samples holding
        the lock). A process of its own has a lock of its own. The pool starts at the first
        large message (a relay may never see one) with one process per delivery worker.
        """
        if self._large_senders is None:
            self._large_senders = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=multiprocessing.get_context("spawn"),  # not fork: this process runs threads
                initializer=_large_sender_started,
            )
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._large_senders, send_alone, upstream, self.hostname, sender, recipients, body, smtputf8
            )
        except BrokenProcessPool as error:  # a sender process died (killed, out of memory)
            self._stop_large_senders()
            self.log.error("delivery.large_sender_died", error=repr(error), result="deferred")
            return {r: Outcome("deferred", f"the large-message sender process died: {error!r}") for r in recipients}


async def connect(upstream: UpstreamConfig, hostname: str) -> aiosmtplib.SMTP:
    client = PipeliningSMTP(
        hostname=upstream.host,
        port=upstream.port,
        local_hostname=hostname,
        timeout=upstream.timeout,
        use_tls=upstream.tls == "tls",
        start_tls=True if upstream.tls == "starttls" else False,
        validate_certs=upstream.verify_certificate,
        username=upstream.username,
        password=upstream.password,
    )
    await client.connect()
    return client


async def converse(
    upstream: UpstreamConfig,
    hostname: str,
    sender: str,
    recipients: list[str],
    body: bytes,
    connection: list[aiosmtplib.SMTP | None],
    smtputf8: bool,
    log: Any = None,
) -> dict[str, Outcome]:
    """One transaction upstream on `connection` (reused when it is still open to the same
    upstream, else opened); one outcome per recipient, never raises."""
    for fresh_connection in (False, True):
        client = connection[0]
        reused = (
            client is not None
            and client.is_connected
            and not fresh_connection
            and (client.hostname, client.port) == (upstream.host, upstream.port)
        )
        try:
            if not reused:
                if client is not None:
                    client.close()
                connection[0] = None
                client = await connect(upstream, hostname)
                connection[0] = client
            assert client is not None
            errors = await transaction(client, sender, recipients, body, smtputf8)
            if any(error.code == 421 for error in errors.values()):
                _drop(connection)  # 421: the upstream is closing this connection (RFC 5321 3.8)
            elif len(errors) == len(recipients):
                await _reset(client)  # no transaction completed: the upstream may still hold its MAIL
            return {
                r: (_classify(errors[r].code, errors[r].message) if r in errors else Outcome("delivered", "250"))
                for r in recipients
            }
        except aiosmtplib.SMTPAuthenticationError as error:
            # Our smarthost credentials are refused: a configuration problem to fix,
            # never a reason to bounce the customer's mail.
            _drop(connection)
            reply = f"upstream refused our AUTH: {error.code} {error.message} ({upstream.host}:{upstream.port})"
            return {r: Outcome("deferred", reply, upstream_failure=True) for r in recipients}
        except aiosmtplib.SMTPResponseException as error:
            if error.code == SMTPStatus.invalid_response:  # the upstream's reply was not SMTP
                _drop(connection)
                reply = f"upstream {upstream.host}:{upstream.port} sent a reply that is not SMTP: {error.message}"
                return {r: Outcome("deferred", reply, upstream_failure=True) for r in recipients}
            if error.code == 421:
                _drop(connection)
            else:
                await _reset(client)
            outcome = _classify(error.code, error.message)
            return {r: outcome for r in recipients}
        except aiosmtplib.SMTPNotSupported as error:
            await _reset(client)
            reply = f"553 5.6.7 Non-ASCII address and the upstream does not support SMTPUTF8 ({error})"
            return {r: Outcome("hard_bounced", reply) for r in recipients}
        except (TimeoutError, aiosmtplib.SMTPException, OSError) as error:
            _drop(connection)
            if reused and isinstance(error, (aiosmtplib.SMTPServerDisconnected, ConnectionError)):
                continue  # the upstream closed an idle connection: retry once on a new one
            reply = f"connection to {upstream.host}:{upstream.port} failed: {error!r}"
            return {r: Outcome("deferred", reply, upstream_failure=True) for r in recipients}
        except Exception as error:  # a bug must defer (and so expire), never loop forever
            _drop(connection)
            if log is not None:
                log.error("delivery.error", error=repr(error), result="deferred")
            return {r: Outcome("deferred", f"internal error: {error!r}") for r in recipients}
    raise AssertionError("unreachable")


async def transaction(
    client: aiosmtplib.SMTP, sender: str, recipients: list[str], body: bytes, smtputf8: bool
) -> dict[str, aiosmtplib.SMTPResponse]:
    """One message upstream, the message as the spool holds it; the replies of the
    recipients it was not delivered to (absent: delivered). Raises only when there is no
    transaction to speak of: the connection fails, EHLO/HELO is refused, SMTPUTF8 is missing.

    With an upstream that offers PIPELINING, MAIL, every RCPT and DATA go in one write
    (relay/pipelining.py); without it, one command at a time. Either way each refused
    recipient keeps its own RCPT reply, and the recipients the upstream took share the
    reply that failed the transaction (MAIL, DATA or the end of data), if one did.

    Not aiosmtplib's sendmail: it passes the whole message through two regular expressions,
    three times when the server has SIZE (line endings, to measure it and again to send it;
    the leading dots), which for 10 MB cost a sender a tenth of a second of CPU. The spool's
    messages already end their lines with CRLF (SMTP in refuses or normalizes bare CR and LF;
    bounces and notices are made with CRLF), so the line endings are only checked here, by
    counting, and the dots are doubled with one bytes.replace.
    """
    if client.is_ehlo_or_helo_needed:
        try:
            await client.ehlo()
        except aiosmtplib.SMTPHeloError:
            if not client.is_connected:
                raise
            await client.helo()
    if smtputf8 and not client.supports_extension("smtputf8"):
        raise aiosmtplib.SMTPNotSupported("SMTPUTF8 is not supported by this server")
    if has_bare_newline(body):  # not from SMTP in (a spool file from before it refused them)
        body = await crlf_line_ends(body)
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    options = ["SMTPUTF8"] if smtputf8 else []
    if client.supports_extension("size"):
        options.insert(0, f"SIZE={len(body)}")  # RFC 1870: CRLFs counted, the dots added not
    encoding = "utf-8" if smtputf8 else "ascii"
    if isinstance(client, PipeliningSMTP) and client.pipelining:
        return await pipelined_transaction(client, sender, recipients, body, options, encoding)
    try:
        await client.mail(sender, options=options, encoding=encoding)
    except aiosmtplib.SMTPSenderRefused as error:
        return {r: refusal(aiosmtplib.SMTPResponse(error.code, error.message), "MAIL") for r in recipients}
    refused: dict[str, aiosmtplib.SMTPResponse] = {}
    for recipient in recipients:
        try:
            await client.rcpt(recipient, encoding=encoding)
        except aiosmtplib.SMTPRecipientRefused as error:
            refused[recipient] = refusal(aiosmtplib.SMTPResponse(error.code, error.message), "RCPT")
    taken = [r for r in recipients if r not in refused]
    if not taken:
        return refused
    reply = await client.execute_command(b"DATA")
    if reply.code != 354:
        return refused | {r: refusal(reply, "DATA") for r in taken}
    reply = await send_message_data(client, body)
    if positive(reply):
        return refused
    return refused | {r: refusal(reply, "the end of data") for r in taken}


def _large_sender_started() -> None:
    """In a large-message sender process: systemd's SIGTERM (to the whole control group)
    and Ctrl-C (to the whole process group) are for the relay, which lets the sends in
    flight finish within its drain grace, as it does its own, then kills what is left."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def send_alone(
    upstream: UpstreamConfig, hostname: str, sender: str, recipients: list[str], body: bytes, smtputf8: bool
) -> dict[str, Outcome]:
    """In a large-message sender process: one transaction on a connection of its own."""

    async def alone() -> dict[str, Outcome]:
        connection: list[aiosmtplib.SMTP | None] = [None]
        try:
            return await converse(upstream, hostname, sender, recipients, body, connection, smtputf8)
        finally:
            _drop(connection)

    return asyncio.run(alone())


def sendable_address(address: str, allow_empty: bool = False) -> bool:
    """Can the upstream client put this address on a MAIL/RCPT line exactly as it is?

    SMTP-in refuses what fails here, so what the meter counts is what is relayed.
    """
    if address == "" or address == "<>":
        return allow_empty
    if _PLAIN_ADDRESS.fullmatch(address):  # the usual address: no parse (two per message and attempt)
        return True
    if _CONTROL.search(address):  # aiosmtplib refuses every command argument with one
        return False
    try:
        address.encode("utf-8")  # lone surrogates: 8-bit bytes that were not UTF-8
        return parse_address(address) == address
    except ValueError:
        return False


def _headers_ascii(message: bytes) -> bool:
    end = message.find(b"\r\n\r\n")
    return (message if end < 0 else message[:end]).isascii()


def _drop(connection: list[aiosmtplib.SMTP | None]) -> None:
    if connection[0] is not None:
        connection[0].close()
        connection[0] = None


# A dot-atom local part at a dot-atom domain: parse_address answers such an address as
# it is (tests/test_delivery.py holds the two to the same answers).
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # as aiosmtplib's COMMAND_INJECTION_REGEX
_PLAIN_ADDRESS = re.compile(r"[A-Za-z0-9_+-]+(?:\.[A-Za-z0-9_+-]+)*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*")
_STOP = ""  # wakes a worker to exit; never a queue id
_QUEUE_ID = re.compile(r"[0-9A-Za-z]{1,64}")  # what a queue id the operator names may be (never a path)
INLINE_READ = 256 * 1024  # spool files up to this are read on the loop (no thread hop)
LARGE_MESSAGE = 1024 * 1024  # bodies above this are sent from a process of their own (_send_large)


def _classify(code: int, message: str) -> Outcome:
    """Retry or not, from the reply code (RFC 5321 4.2.1): 2yz delivered, 4yz deferred and
    retried, 5yz refused for good. What a failure bills as is not decided here.

    One exception, RFC 5321 4.5.3.1.10: some servers still answer "too many recipients"
    with RFC 821's 552 instead of 452, and a client SHOULD treat that as temporary; the
    enhanced code X.5.3 says which 552 it is.
    """
    reply = f"{code} {message}".strip()
    if 200 <= code < 300:
        return Outcome("delivered", reply)
    if code == 421:  # the upstream is closing the channel (RFC 5321 3.8): another one may take it
        return Outcome("deferred", reply, upstream_failure=True)
    if 400 <= code < 500:
        return Outcome("deferred", reply)
    _, enhanced = reply_codes(reply)
    if code == 552 and enhanced is not None and enhanced.endswith(".5.3"):
        return Outcome("deferred", reply)
    return Outcome("hard_bounced", reply)


async def _reset(client: aiosmtplib.SMTP | None) -> None:
    """After a refused transaction, RSET so the connection can be reused; else drop it."""
    if client is None or not client.is_connected:
        return
    try:
        await client.rset()
    except Exception:
        client.close()


def _upstream_list(upstream: UpstreamConfig | Sequence[UpstreamConfig]) -> tuple[UpstreamConfig, ...]:
    upstreams = (upstream,) if isinstance(upstream, UpstreamConfig) else tuple(upstream)
    if not upstreams:
        raise ValueError("delivery needs at least one upstream")
    return upstreams


def _summary(recipients: list[RecipientState]) -> str:
    statuses = {r.status for r in recipients}
    return statuses.pop() if len(statuses) == 1 else "mixed"


__all__ = [
    "Delivery",
    "MessageBusy",
    "QueueEntry",
    "RetryPolicy",
    "UnknownMessage",
    "UpstreamConfig",
    "new_queue_id",
    "sendable_address",
]
