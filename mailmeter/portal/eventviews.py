"""The HTML of the portal's Events page and Suppressed page.

Events: the account's webhook (never its secret) and its latest events, each with its
delivery log. Suppressed: the suppressed recipients, each with a Remove button. Like
views.py: every value escaped, every form with the session's CSRF token.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from mailmeter.events import event_id
from mailmeter.metering.records import EventRecord, Suppression
from mailmeter.portal.views import e

KIND_LABELS = {
    "delivered": "Delivered",
    "deferred": "Deferred",
    "bounced": "Bounced",
    "usage_alert": "Usage alert",
    "payment": "Payment",
}
STATUS_LABELS = {
    "pending": "waiting to be sent",
    "delivered": "delivered to your webhook",
    "failed": "failed: every attempt was refused",
}
REASONS = {
    "not_exist": "Invalid email: the address does not exist",
    "format_error": "Invalid email: the address is malformed",
}
# The order the data of an event is shown in; other fields follow, by name.
DATA_ORDER = ("recipient", "result", "bounce", "reason", "payment_state", "charge", "charge_status", "percent")


def when(iso: str) -> str:
    """An ISO time as the pages show it: "2025-12-20 12:00:00 UTC"."""
    return iso[:19].replace("T", " ") + " UTC" if iso else ""


def webhook_section(hook: dict[str, Any] | None) -> str:
    if hook is None:
        return (
            '<section id="webhook"><h2>Webhook</h2><p class="muted">No webhook is set for this account, so no'
            " events are recorded. Your provider sets one (its URL and the kinds of events it gets) and gives"
            " you its signing secret.</p></section>"
        )
    kinds = ", ".join(KIND_LABELS.get(kind, kind) for kind in hook["events"])
    return (
        '<section id="webhook"><h2>Webhook</h2><div class="table-wrap"><table class="screen">'
        f'<tr><td>URL</td><td><code class="wrap">{e(hook["url"])}</code></td></tr>'
        f"<tr><td>Events</td><td>{e(kinds)}</td></tr>"
        f"<tr><td>Set</td><td>{e(when(hook['created_at']))}</td></tr></table></div>"
        '<p class="why">Each event is POSTed to this URL as JSON, signed with the secret your provider gave you'
        " (the <code>Mailmeter-Signature</code> header). An answer other than 2xx, or none, is retried later"
        " with a growing delay; each attempt is in the event's delivery log below.</p></section>"
    )


def event_summary(data: dict[str, Any]) -> str:
    keys = [k for k in DATA_ORDER if k in data] + sorted(k for k in data if k not in DATA_ORDER)
    return "; ".join(f"{key}: {data[key]}" for key in keys if data[key] not in ("", None))


def events_section(events: Sequence[EventRecord]) -> str:
    if not events:
        return '<section id="events"><h2>Latest events</h2><p class="muted">No events yet.</p></section>'
    return (
        '<section id="events"><h2>Latest events</h2>'
        + "".join(_event(event) for event in events)
        + '<p class="why">Times are UTC. Delivery is at least once: your receiver may get an event twice'
        " (deduplicate on its id).</p></section>"
    )


def _event(event: EventRecord) -> str:
    ident = event_id(event.id)
    try:
        data = json.loads(event.data)
    except ValueError:
        data = {}
    status = STATUS_LABELS.get(event.status, event.status)
    if event.status == "pending" and event.attempts:
        status = f"to be retried at {when(event.next_attempt_at)}"
    if event.attempts:
        rows = "".join(
            f'<tr><td class="n">{a.attempt}</td><td>{e(when(a.at))}</td>'
            f'<td class="n">{e(a.status_code if a.status_code is not None else "no answer")}</td>'
            f'<td class="wrap">{e(a.error or "-")}</td></tr>'
            for a in event.attempts
        )
        log = (
            '<div class="table-wrap"><table class="attempts"><thead><tr><th class="n">#</th><th>Time</th>'
            f'<th class="n">HTTP status</th><th>Error</th></tr></thead><tbody>{rows}</tbody></table></div>'
        )
    else:
        log = '<p class="muted">Not sent yet.</p>'
    return (
        f'<article class="event" id="{e(ident)}" data-status="{e(event.status)}">'
        f"<h3>{e(KIND_LABELS.get(event.kind, event.kind))} <code>{e(ident)}</code></h3>"
        f'<p>{e(when(event.created_at))}: <span class="status">{e(status)}</span></p>'
        f'<p class="why wrap">{e(event_summary(data))}</p>'
        f"<details open><summary>Delivery log ({len(event.attempts)} attempt{'' if len(event.attempts) == 1 else 's'})"
        f"</summary>{log}</details></article>"
    )


def suppressed_section(entries: Sequence[Suppression], csrf: str) -> str:
    intro = (
        '<p class="why">Mail to these addresses is refused when it is sent (<code>550 5.1.1</code>) and is not'
        " billed: each hard-bounced as an invalid email. Remove an address that works again: your next email to"
        " it is accepted and billed, and it is suppressed again if it bounces the same way.</p>"
    )
    if not entries:
        return f'<section id="suppressed">{intro}<p class="muted">No address is suppressed.</p></section>'
    rows = "".join(
        f'<tr><td class="wrap"><strong>{e(s.address)}</strong></td><td>{e(s.created_at[:10])}</td>'
        f'<td>{e(REASONS.get(s.reason, s.reason))}<div class="why wrap">{e(s.detail)}</div></td>'
        f'<td><form method="post" action="/suppressed/remove"><input type="hidden" name="csrf" value="{e(csrf)}">'
        f'<input type="hidden" name="address" value="{e(s.address)}">'
        f'<button type="submit" aria-label="Remove {e(s.address)}">Remove</button></form></td></tr>'
        for s in entries
    )
    return (
        f'<section id="suppressed">{intro}<p>{len(entries):,} suppressed.</p><div class="table-wrap">'
        '<table class="stack" id="suppressions"><thead><tr><th>Address</th><th>Since</th><th>Reason</th><th></th>'
        f"</tr></thead><tbody>{rows}</tbody></table></div></section>"
    )
