"""RFC 3464 delivery status notifications (bounces) for recipients that failed."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone
from email.message import Message
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.parser import BytesHeaderParser
from email.policy import SMTP, SMTPUTF8, compat32
from email.utils import format_datetime, make_msgid

# The reply code at the start of a reply, and the enhanced status code right after it
# ("452 4.2.2 Mailbox full"), never a dotted number elsewhere in the text (an IP
# address in a connection error, which has no reply code at all).
_REPLY = re.compile(r"^([2-5]\d\d)(?:[ -]([245]\.\d{1,3}\.\d{1,3})\b|[ -]|$)")


@dataclass(frozen=True)
class FailedRecipient:
    address: str
    reply: str  # the remote server's reply, or our own reason
    permanent: bool


def reply_codes(reply: str) -> tuple[int | None, str | None]:
    """The reply code and enhanced status code a reply starts with ("552 5.2.2 ..." ->
    (552, "5.2.2")); None for what it lacks (our own "connection ... failed" has neither)."""
    match = _REPLY.match(reply)
    if match is None:
        return None, None
    return int(match.group(1)), match.group(2)


def status_of(failure: FailedRecipient) -> str:
    """The enhanced status code for the DSN: the server's own if its class fits, else 5.0.0 / 4.4.7."""
    _, enhanced = reply_codes(failure.reply)
    if enhanced is not None and enhanced[0] == ("5" if failure.permanent else "4"):
        return enhanced
    return "5.0.0" if failure.permanent else "4.4.7"


def build_dsn(
    reporting_host: str,
    queue_id: str,
    original_sender: str,
    failures: list[FailedRecipient],
    original: bytes,
    arrival: datetime,
    now: datetime | None = None,
) -> bytes:
    """A multipart/report; report-type=delivery-status message to the original sender."""
    now = now or datetime.now(timezone.utc)
    human = [
        f"This is the mail system at host {reporting_host}.",
        "",
        "Your message could not be delivered to one or more recipients.",
        "",
    ]
    for failure in failures:
        reason = "permanent failure" if failure.permanent else "gave up after retrying"
        human.append(f"<{failure.address}>: {reason}: {failure.reply}")

    per_message = Message()
    per_message["Reporting-MTA"] = f"dns; {reporting_host}"
    per_message["X-Mailmeter-Queue-ID"] = queue_id
    per_message["Arrival-Date"] = format_datetime(arrival)
    blocks: list[Message | str] = [per_message]
    for failure in failures:
        block = Message()
        block["Final-Recipient"] = address_field(failure.address)
        block["Action"] = "failed"
        block["Status"] = status_of(failure)
        block["Diagnostic-Code"] = "smtp; " + (" ".join(failure.reply.split()) or "delivery failed")
        block["Last-Attempt-Date"] = format_datetime(now)
        blocks.append(block)
    status_part = MIMEBase("message", "delivery-status")
    status_part.set_payload(blocks)

    original_headers = BytesHeaderParser(policy=compat32).parsebytes(original)
    headers_text = "".join(f"{key}: {value}\n" for key, value in original_headers.items())

    report = MIMEMultipart("report", report_type="delivery-status")
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{reporting_host}>"
    report["To"] = original_sender
    report["Subject"] = "Undelivered Mail Returned to Sender"
    report["Date"] = format_datetime(now)
    report["Message-ID"] = make_msgid(domain=reporting_host)
    report["Auto-Submitted"] = "auto-replied"
    report.attach(MIMEText("\n".join(human) + "\n", "plain", _charset("\n".join(human))))
    report.attach(status_part)
    report.attach(MIMEText(headers_text, "rfc822-headers", _charset(headers_text)))
    # A UTF-8 sender can only be written in raw UTF-8 headers (RFC 6532): such a DSN
    # travels with SMTPUTF8, as its original did.
    return report.as_bytes(policy=SMTP if original_sender.isascii() else SMTPUTF8)


def address_field(address: str) -> str:
    """An address for Final-Recipient: `rfc822; a@b`, or RFC 6533's `utf-8; ` type with
    each non-ASCII character as `\\x{HEX}`, so the field stays ASCII."""
    if address.isascii():
        return f"rfc822; {address}"
    return "utf-8; " + "".join(ch if ch.isascii() else f"\\x{{{ord(ch):X}}}" for ch in address)


def _charset(text: str) -> str:
    """us-ascii keeps the parts readable as plain 7bit text; anything else is utf-8."""
    return "us-ascii" if text.isascii() else "utf-8"
