"""Notices to account contacts: usage alerts, invoices, statements.

The meter records each notice once per period and account (its key is the
primary key); this sender turns the pending ones into email, queued in the
relay's own spool and delivered by its own delivery path, and into a signed
webhook POST when configured. Each channel is marked sent separately, so a
webhook outage does not resend the email. A crash between queueing the email
and marking it sent can send that email twice (at least once, never lost).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from datetime import datetime, timezone
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, make_msgid
from typing import Any

import aiohttp
import structlog

from mailmeter.metering.gateway import sign
from mailmeter.metering.store import NoticeStore
from mailmeter.policies.currency import currency_for
from mailmeter.policies.money import display_money, parse_money
from mailmeter.relay.delivery import new_queue_id
from mailmeter.relay.spool import Envelope, Spool


def _amount(body: dict[str, Any], key: str) -> str:
    """An amount of the notice as people read it: "$830.00", "¥2,500", "BHD 25.000"."""
    text = str(body[key])
    code = body.get("currency")
    if code is None:  # a notice recorded before notices named their currency
        return text
    try:
        return display_money(parse_money(text), currency_for(str(code)), short_whole=False)
    except ValueError:
        return f"{text} {code}"


def notice_text(account: str, key: str, body: dict[str, Any]) -> tuple[str, str]:
    """Subject and text of a notice email."""
    kind = body.get("kind", key)
    if kind == "usage_alert":
        percent, limit, sent = body["percent"], body["limit"], body["sent"]
        subject = f"mailmeter: {account} has used {percent}% of its {limit:,} emails this period"
        text = (
            f"Account {account} has sent {sent:,} emails this billing period, {percent}% of its limit of {limit:,}.\n"
        )
        if percent >= 100:
            text += "Emails beyond the limit are billed as overage.\n"
        return subject, text
    if kind == "invoice":
        subject = f"mailmeter: invoice {body['invoice']} for {account}"
        text = (
            f"Invoice {body['invoice']}: total {_amount(body, 'total')}, amount due {_amount(body, 'amount_due')}"
            f" by {body['due_date']}.\n"
        )
        return subject, text
    if kind == "statement":
        subject = f"mailmeter: statement for {account}, {body['period']}"
        text = (
            f"Statement for {body['period']}: invoice {body['invoice']}, total {_amount(body, 'total')}, "
            f"amount due {_amount(body, 'amount_due')} ({body['status']}).\n"
        )
        return subject, text
    return f"mailmeter notice for {account}", json.dumps(body, indent=2) + "\n"


class NoticeSender:
    def __init__(
        self,
        store: NoticeStore,
        spool: Spool,
        submit: Callable[[str], None],
        from_address: str,
        webhook_url: str | None = None,
        webhook_secret: bytes | None = None,
    ) -> None:
        self.store = store
        self.spool = spool
        self.submit = submit
        self.from_address = from_address
        self.webhook_url = webhook_url
        self.webhook_secret = webhook_secret
        self.log = structlog.get_logger("mailmeter.notices")

    async def send_pending(self) -> int:
        sent = 0
        for row in await self.store.pending_notices():
            body = json.loads(row["body"])
            if not row["email_sent"]:
                contacts = json.loads(row["contacts"])
                queue_id = None
                if contacts:
                    queue_id = await self._queue_email(row["account"], row["key"], body, contacts)
                await self.store.mark_notice(row["account_id"], row["period_key"], row["key"], "email")
                self.log.info(
                    "notice.email",
                    account=row["account"],
                    notice=row["key"],
                    queue_id=queue_id,
                    recipients=len(contacts),
                    result="queued" if contacts else "no_contacts",
                )
                sent += 1
            if not row["webhook_sent"]:
                if self.webhook_url is None or await self._post(row, body):
                    await self.store.mark_notice(row["account_id"], row["period_key"], row["key"], "webhook")
        return sent

    async def _queue_email(self, account: str, key: str, body: dict[str, Any], contacts: list[str]) -> str:
        subject, text = notice_text(account, key, body)
        message = EmailMessage()
        message["From"] = self.from_address
        message["To"] = ", ".join(contacts)
        message["Subject"] = subject
        message["Date"] = format_datetime(datetime.now(timezone.utc))
        message["Message-ID"] = make_msgid(domain=self.from_address.rpartition("@")[2] or None)
        message["Auto-Submitted"] = "auto-generated"
        message.set_content(text)
        queue_id = new_queue_id()
        envelope = Envelope(queue_id=queue_id, account=None, mail_from="", recipients=contacts, received_at=time.time())
        # policy SMTP: CRLF line ends, as every spooled message has (SMTP in's, DSNs)
        await asyncio.to_thread(self.spool.enqueue_local, envelope, message.as_bytes(policy=SMTP))
        self.submit(queue_id)
        return queue_id

    async def _post(self, row: Any, body: dict[str, Any]) -> bool:
        assert self.webhook_url is not None and self.webhook_secret is not None
        payload = json.dumps(
            {"account": row["account"], "period_start": row["period_key"], "key": row["key"], **body}, sort_keys=True
        ).encode()
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": f"{row['account']}/{row['period_key']}/{row['key']}",
            "X-Mailmeter-Timestamp": timestamp,
            "X-Mailmeter-Signature": sign(self.webhook_secret, timestamp, payload),
        }
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
                async with session.post(self.webhook_url, data=payload, headers=headers) as response:
                    ok = 200 <= response.status < 300
        except (aiohttp.ClientError, TimeoutError) as error:
            self.log.warning(
                "notice.webhook", account=row["account"], notice=row["key"], result="retry", error=repr(error)
            )
            return False
        self.log.info("notice.webhook", account=row["account"], notice=row["key"], result="sent" if ok else "retry")
        return ok
