"""Payment gateways: where in-period charges are sent to be collected.

The meter hands each charge to a gateway once per attempt; the ledger (not the
gateway) remembers what was sent, so retries reuse the same idempotency key and
the operator's payment system can deduplicate. The webhook gateway POSTs the
charge as JSON, signed with HMAC-SHA256 over "timestamp.body":

    X-Mailmeter-Timestamp: 1700000000
    X-Mailmeter-Signature: sha256=<hex digest>
    Idempotency-Key: <the charge's key>

and reads the result from the reply: 2xx with {"status": "succeeded"} or
{"status": "failed", "reason": "..."} (a declined card: the account is blocked);
{"status": "pending"} means the result will come later through the inbound
payment webhook. A 5xx, 429, timeout or connection error is retried with backoff.

Without a gateway (`billing.gateway.kind: none`) the relay collects nothing itself:
each charge is *recorded* for an external system (the operator's accounting or
payment run) to collect, which reads the ledger (`mailmeter charge list`, the API)
and reports back with `mailmeter charge collected|failed` or its API equivalent.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Protocol

import aiohttp


class ChargeOutcome(StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # the payment was declined: block the account
    PENDING = "pending"  # the gateway will report later
    RETRY = "retry"  # could not reach a verdict: try again later
    RECORDED = "recorded"  # no gateway: left to an external system, which reports back


@dataclass(frozen=True)
class ChargeRequest:
    idempotency_key: str
    account: str
    amount: str  # decimal string in the currency's minor units: "250.00" (USD), "25000" (JPY), "25.000" (BHD)
    amount_micros: int
    currency: str
    kind: str
    description: str
    period_start: str
    created_at: str


@dataclass(frozen=True)
class GatewayResult:
    outcome: ChargeOutcome
    detail: str = ""


class PaymentGateway(Protocol):
    async def submit(self, charge: ChargeRequest) -> GatewayResult: ...


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    digest = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def verify(secret: bytes, timestamp: str, body: bytes, signature: str, now: float, tolerance: float = 300.0) -> bool:
    """Constant-time check of a signature, refusing stale timestamps (replays)."""
    try:
        age = abs(now - float(timestamp))
    except ValueError:
        return False
    return age <= tolerance and hmac.compare_digest(sign(secret, timestamp, body), signature)


class NoGateway:
    """No collection configured: each charge is recorded for an external system to collect.

    Its state becomes `recorded` (the relay never sends it again) until the operator
    marks it collected or failed, as that system reports.
    """

    async def submit(self, charge: ChargeRequest) -> GatewayResult:
        return GatewayResult(ChargeOutcome.RECORDED, "recorded for external collection (billing.gateway.kind: none)")


class WebhookGateway:
    def __init__(self, url: str, secret: bytes, timeout: float = 10.0) -> None:
        self.url = url
        self.secret = secret
        self.timeout = aiohttp.ClientTimeout(total=timeout)

    async def submit(self, charge: ChargeRequest) -> GatewayResult:
        body = json.dumps(asdict(charge), separators=(",", ":"), sort_keys=True).encode()
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": charge.idempotency_key,
            "X-Mailmeter-Timestamp": timestamp,
            "X-Mailmeter-Signature": sign(self.secret, timestamp, body),
        }
        try:
            async with aiohttp.ClientSession(timeout=self.timeout) as session:
                async with session.post(self.url, data=body, headers=headers) as response:
                    text = await response.text()
                    status = response.status
        except (aiohttp.ClientError, TimeoutError) as error:
            return GatewayResult(ChargeOutcome.RETRY, f"webhook unreachable: {error!r}")
        if status == 429 or status >= 500:
            return GatewayResult(ChargeOutcome.RETRY, f"webhook answered HTTP {status}")
        if status >= 300:
            return GatewayResult(ChargeOutcome.RETRY, f"webhook answered HTTP {status}: {text[:200]}")
        try:
            verdict = json.loads(text) if text else {}
            outcome = ChargeOutcome(verdict.get("status", "succeeded"))
        except (ValueError, AttributeError):
            return GatewayResult(ChargeOutcome.RETRY, f"webhook reply is not the expected JSON: {text[:200]}")
        if outcome is ChargeOutcome.RETRY:
            return GatewayResult(ChargeOutcome.RETRY, "webhook asked for a retry")
        return GatewayResult(outcome, str(verdict.get("reason", "")))
