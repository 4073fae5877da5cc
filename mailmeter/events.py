"""Events to account holders' webhooks: the signature, the JSON, and the sender that drains the outbox.

The meter writes each event into the outbox (the store's `events` table) in the
transaction of what it tells of: a recipient's result (delivered, deferred, bounced
soft or hard), a usage alert, a payment state change. The sender claims the due
ones, POSTs each to its account's webhook URL, signed with the webhook's secret:

    Mailmeter-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>

and logs every attempt (time, HTTP status, error). A 2xx answer delivers the event;
anything else (another status, no answer, a timeout) is retried after an exponential
backoff (first_delay, doubling, at most max_delay) until max_attempts, then the
event is failed. Delivery is at least once: a receiver deduplicates on the event id.
Delivered and failed events are kept `keep_days`, then forgotten with their log.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import structlog

from mailmeter.metering.records import EVENT_KINDS, DueEvent, EventRecord, Suppression
from mailmeter.metering.store import EventStore

SIGNATURE_HEADER = "Mailmeter-Signature"
EVENT_ID_HEADER = "Mailmeter-Event-Id"


def sign_event(secret: str, timestamp: int, body: bytes) -> str:
    """The Mailmeter-Signature header value for `body` sent at `timestamp`."""
    digest = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify_event_signature(secret: str, header: str, body: bytes, now: float, tolerance: float = 300.0) -> bool:
    """What a receiver checks: the header's v1 is the HMAC of "t.body" and t is within `tolerance` of now."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    timestamp, given = fields.get("t", ""), fields.get("v1", "")
    if not timestamp.isdigit() or abs(now - int(timestamp)) > tolerance:
        return False
    return hmac.compare_digest(sign_event(secret, int(timestamp), body), f"t={timestamp},v1={given}")


def event_id(number: int) -> str:
    return f"evt_{number}"


def event_payload(event: DueEvent | EventRecord) -> dict[str, Any]:
    """The JSON object POSTed for an event (and shown by the APIs)."""
    return {
        "id": event_id(event.id),
        "type": event.kind,
        "created": event.created_at,
        "account": event.account,
        "data": json.loads(event.data),
    }


def event_json(event: EventRecord) -> dict[str, Any]:
    """An event with its delivery state and log, as the APIs and `account events` show it."""
    return {
        **event_payload(event),
        "status": event.status,
        "next_attempt_at": event.next_attempt_at if event.status == "pending" else None,
        "attempts": [
            {"attempt": a.attempt, "at": a.at, "status_code": a.status_code, "error": a.error} for a in event.attempts
        ],
    }


def suppression_json(entry: Suppression) -> dict[str, Any]:
    return {
        "address": entry.address,
        "reason": entry.reason,
        "detail": entry.detail,
        "queue_id": entry.queue_id,
        "suppressed_at": entry.created_at,
    }


def check_webhook(url: str, kinds: list[str]) -> str | None:
    """Why a webhook URL or list of event kinds cannot be used, or None."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"url: {url!r} is not an http:// or https:// URL with a host"
    if len(url) > 2000:
        return "url: at most 2000 characters"
    unknown = [kind for kind in kinds if kind not in EVENT_KINDS]
    if unknown or not kinds:
        return f"events: {', '.join(unknown) or '(none)'}: give some of {', '.join(EVENT_KINDS)}"
    return None


@dataclass(frozen=True)
class EventSettings:
    """How the sender retries: attempts and the exponential backoff between them (seconds)."""

    max_attempts: int = 8
    first_delay: float = 30.0
    max_delay: float = 3600.0
    timeout: float = 10.0
    batch: int = 50
    keep_days: float = 30.0  # delivered and failed events older than this are forgotten

    def delay(self, attempt: int) -> float:
        """The wait after failed attempt number `attempt` (1, 2, ...): first_delay doubling, capped."""
        return float(min(self.first_delay * 2 ** (attempt - 1), self.max_delay))


class EventSender:
    """Drains the outbox: one `send_due` per pass (the node runs it every `events.interval`)."""

    def __init__(
        self,
        store: EventStore,
        settings: EventSettings,
        clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
    ) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self.log = structlog.get_logger("mailmeter.events")

    async def prune(self) -> int:
        """Forget the delivered and failed events older than keep_days (with their logs)."""
        return await self.store.prune_events(self.clock() - timedelta(days=self.settings.keep_days))

    async def send_due(self) -> int:
        """Send every due event once (concurrently); returns how many were delivered."""
        now = self.clock()
        # An event claimed is put off past the longest attempt, so no other sender takes it meanwhile.
        due = await self.store.claim_due_events(
            now, now + timedelta(seconds=self.settings.timeout * 3 + 30), self.settings.batch
        )
        if not due:
            return 0
        timeout = aiohttp.ClientTimeout(total=self.settings.timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            outcomes = await asyncio.gather(*(self._send(session, event) for event in due))
        return sum(outcomes)

    async def _send(self, session: aiohttp.ClientSession, event: DueEvent) -> bool:
        body = json.dumps(event_payload(event), sort_keys=True).encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "mailmeter-webhook/1",
            EVENT_ID_HEADER: event_id(event.id),
            SIGNATURE_HEADER: sign_event(event.secret, int(time.time()), body),
        }
        status: int | None = None
        error = ""
        try:
            async with session.post(event.url, data=body, headers=headers, allow_redirects=False) as response:
                status = response.status
                if not 200 <= status < 300:
                    error = f"HTTP {status} {response.reason or ''}".strip()
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as failure:
            error = f"{type(failure).__name__}: {failure}" if str(failure) else type(failure).__name__
        at = self.clock()
        attempt = event.attempts + 1
        delivered = not error
        if delivered:
            state, next_at = "delivered", at
        elif attempt >= self.settings.max_attempts:
            state, next_at = "failed", at
        else:
            state, next_at = "pending", at + timedelta(seconds=self.settings.delay(attempt))
        await self.store.record_event_attempt(event.id, at, status, error, state, next_at)
        self.log.info(
            "event.webhook",
            account=event.account,
            event_id=event_id(event.id),
            kind=event.kind,
            attempt=attempt,
            status_code=status,
            result=state if state != "pending" else "retry",
            error=error or None,
            retry_at=next_at.isoformat() if state == "pending" else None,
        )
        return delivered


__all__ = [
    "EVENT_ID_HEADER",
    "SIGNATURE_HEADER",
    "EventSender",
    "EventSettings",
    "check_webhook",
    "event_id",
    "event_json",
    "event_payload",
    "sign_event",
    "suppression_json",
    "verify_event_signature",
]
