"""The portal's HTML: small functions that return escaped markup (no template engine).

Every value is escaped with `e()`; every form carries the session's CSRF token; the only
script is /portal.js (the print button), served from this origin (the CSP forbids others).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from html import escape
from typing import Any
from urllib.parse import quote

from mailmeter.policies.money import display_money
from mailmeter.policies.plan import Plan
from mailmeter.policies.pricing import BlockPrice
from mailmeter.portal.holder import Model

CSS = """
*{box-sizing:border-box}body{margin:0;font:16px/1.45 system-ui,sans-serif;color:#18181b;background:#f4f4f5}
header{background:#1e3a8a;color:#fff;padding:.6rem 1rem;display:flex;flex-wrap:wrap;gap:.5rem 1rem;align-items:center}
header .brand{font-weight:700}header nav{display:flex;flex-wrap:wrap;gap:.25rem .9rem;flex:1}
header a{color:#dbeafe}header a[aria-current]{color:#fff;font-weight:700}
header form{margin:0}main{max-width:60rem;margin:0 auto;padding:1rem}
section{background:#fff;border:1px solid #e4e4e7;border-radius:.5rem;padding:1rem;margin:0 0 1rem;
overflow-wrap:break-word}
h1{font-size:1.4rem;margin:.2rem 0 1rem}h2{font-size:1.1rem;margin:1rem 0 .6rem}section>h2:first-child{margin-top:0}
table{border-collapse:collapse;width:100%}td,th{text-align:left;padding:.35rem .5rem;border-bottom:1px solid #e4e4e7;
vertical-align:top}td.n,th.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.screen td:first-child{font-weight:600;white-space:nowrap}.why{color:#52525b;font-size:.92rem}
.table-wrap{overflow-x:auto}label{display:block;font-weight:600;margin:.3rem 0}
input[type=text],input[type=password]{font:inherit;padding:.45rem;border:1px solid #a1a1aa;border-radius:.3rem;
width:100%;max-width:20rem}button{font:inherit;padding:.45rem .9rem;border:0;border-radius:.3rem;background:#1d4ed8;
color:#fff;cursor:pointer;margin-top:.4rem}header button{background:#334155;margin:0}
.error{background:#fee2e2;border-color:#fca5a5}.notice{background:#dcfce7;border-color:#86efac}
.chart{display:block;max-width:100%;height:auto}.muted{color:#52525b}
.wrap{overflow-wrap:anywhere}h3{font-size:1rem;margin:.2rem 0}.event{border-top:1px solid #e4e4e7;padding:.6rem 0}
.event p{margin:.2rem 0}.attempts{font-size:.92rem}td form button{margin:0}
@media (max-width:40rem){.screen tr,.stack tr{display:block;border-bottom:1px solid #e4e4e7;padding:.3rem 0}
.screen td,.stack td{display:block;border:0;padding:.1rem .3rem}.screen td:first-child{white-space:normal}
.stack thead{display:none}main{padding:.5rem}}
@media print{header,form,.noprint{display:none}body{background:#fff}section{border:0}}
"""

JS = """document.addEventListener("DOMContentLoaded",function(){var b=document.getElementById("print");
if(b){b.addEventListener("click",function(){window.print();});}});"""


def e(value: object) -> str:
    return escape(str(value), quote=True)


def page(
    title: str,
    body: str,
    account: str | None = None,
    csrf: str | None = None,
    nav: Sequence[tuple[str, str]] = (),
    current: str = "",
) -> str:
    header = '<header><span class="brand">mailmeter</span>'
    if account is not None:
        links = "".join(
            f'<a href="{e(path)}"{" aria-current=page" if path == current else ""}>{e(label)}</a>'
            for path, label in nav
        )
        header += (
            f'<nav aria-label="Account">{links}</nav><span class="who">{e(account)}</span>'
            f'<form method="post" action="/signout"><input type="hidden" name="csrf" value="{e(csrf or "")}">'
            '<button type="submit" id="signout">Sign out</button></form>'
        )
    header += "</header>"
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<title>{e(title)} - mailmeter</title><link rel="stylesheet" href="/portal.css">'
        '<script src="/portal.js" defer></script></head>'
        f"<body>{header}<main><h1>{e(title)}</h1>{body}</main></body></html>"
    )


def message(text: str, kind: str) -> str:
    role = "alert" if kind == "error" else "status"
    return f'<section class="{kind}" role="{role}">{e(text)}</section>'


def signin_form(csrf: str, error: str | None = None) -> str:
    return (message(error, "error") if error else "") + (
        '<section><h2>Account name and password</h2><form method="post" action="/signin">'
        f'<input type="hidden" name="csrf" value="{e(csrf)}">'
        '<label for="name">Account</label><input type="text" id="name" name="name" autocomplete="username" required>'
        '<label for="password">Password</label>'
        '<input type="password" id="password" name="password" autocomplete="current-password" required>'
        '<button type="submit" id="signin">Sign in</button></form></section>'
        '<section><h2>Or an account token</h2><form method="post" action="/signin">'
        f'<input type="hidden" name="csrf" value="{e(csrf)}">'
        '<label for="token">Token</label><input type="password" id="token" name="token" autocomplete="off" required>'
        '<button type="submit" id="signin-token">Sign in with the token</button>'
        '<p class="muted">Your provider issues it (<code>mailmeter account token NAME</code>).</p></form></section>'
    )


def form(action: str, csrf: str, field: str, label: str, value: str, button: str, hint: str) -> str:
    ident = action.strip("/").replace("/", "-")
    return (
        f'<form method="post" action="{e(action)}"><input type="hidden" name="csrf" value="{e(csrf)}">'
        f'<label for="{ident}">{e(label)}</label>'
        f'<input type="text" id="{ident}" name="{e(field)}" value="{e(value)}" inputmode="decimal" required>'
        f'<p class="why">{e(hint)}</p><button type="submit">{e(button)}</button></form>'
    )


def button_form(action: str, csrf: str, button: str, hint: str) -> str:
    return (
        f'<form method="post" action="{e(action)}"><input type="hidden" name="csrf" value="{e(csrf)}">'
        f'<p class="why">{e(hint)}</p><button type="submit">{e(button)}</button></form>'
    )


def rows_table(rows: Sequence[tuple[str, str]], cls: str = "") -> str:
    body = "".join(f'<tr><td>{e(k)}</td><td class="why">{e(v)}</td></tr>' for k, v in rows)
    return f'<div class="table-wrap"><table class="{cls}">{body}</table></div>'


def counts_table(head: Sequence[str], rows: Sequence[Sequence[object]], numeric_from: int = 1) -> str:
    th = "".join(f"<th{' class=n' if i >= numeric_from else ''}>{e(h)}</th>" for i, h in enumerate(head))
    trs = "".join(
        "<tr>"
        + "".join(
            f"<td{' class=n' if i >= numeric_from else ''}>{e(f'{c:,}' if isinstance(c, int) else c)}</td>"
            for i, c in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f'<div class="table-wrap"><table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table></div>'


# -- the usage page, by model ---------------------------------------------------------------


def model_d(usage: dict[str, Any], plan: Plan) -> str:
    """Model D's documented screen (docs/billing-models.md), row by row, with its explanations."""
    rows = list(usage["dashboard"])
    included, extra = int(usage["included_emails"]), int(usage["extra_emails"])
    sent, total = int(usage["emails_sent"]), usage["total_allowed"]
    price = plan.price
    block = price.block_emails if isinstance(price, BlockPrice) else 0
    per_block = display_money(price.per_block, plan.currency) if isinstance(price, BlockPrice) else ""
    charges = extra // block if block else 0
    why = {
        0: f"Your plan: {included:,} emails included each billing period.",
        1: "The billing period.",
        2: f"{charges:,} x {block:,}: {per_block} was charged {charges:,} times, each adding a batch of"
        f" {block:,} extra emails to your allowance.",
        3: "Emails accepted by the relay this period (an email counts when the relay accepts it).",
    }
    explanations = [why.get(i, "") for i in range(4)]
    if total is not None:
        explanations.append(
            f"{included:,} + {extra:,}: your current sending ceiling: {included:,} (plan) + {extra:,}"
            f" (unlocked via usage charges). You have {max(int(total) - sent, 0):,} emails left before"
            " hitting this limit."
        )
    explanations.append("Usage charges this period, above your base plan price.")
    if usage["spending_limit"] is not None:
        explanations.append(
            "The spending limit is the maximum extra amount that can be charged per billing period above"
            " your base plan price. When sending pauses, upgrade your plan or increase your spending limit."
        )
    if usage["emails_remaining_before_next_charge"] is not None and total is not None:
        explanations.append(
            f"{int(total):,} - {sent:,}. Emails you can still send before the next usage charge is"
            f" triggered. Sending beyond {int(total):,} will add another usage increment."
        )
    pairs = list(zip(rows, explanations + [""] * (len(rows) - len(explanations))))
    return (
        '<section><h2>Usage</h2><div class="table-wrap"><table class="screen" id="screen">'
        + "".join(f'<tr><td>{e(k)}</td><td class="why">{e(v)}</td></tr>' for k, v in pairs)
        + "</table></div></section>"
    )


def model_e(usage: dict[str, Any], plan: Plan, charges: Sequence[dict[str, Any]], decrease: int | None = None) -> str:
    limit, sent = int(usage["included_emails"]), int(usage["emails_sent"])
    remaining = usage["emails_remaining_before_next_charge"]
    over = max(sent - limit, 0)
    price = plan.price
    block = f"{price.block_emails:,}" if isinstance(price, BlockPrice) else ""
    rows = [
        ("Monthly limit", f"{limit:,} emails"),
        ("Sent this period", f"{sent:,} emails"),
        (
            "Remaining",
            f"{remaining:,} emails" + (" before the limit" if sent < limit else " before the next overage charge")
            if remaining is not None
            else "no limit",
        ),
        ("Over the limit", f"{over:,} emails ({len(charges)} overage charges, {usage['spent']} {usage['currency']})"),
    ]
    if decrease is not None and decrease < limit:
        rows.append(("Next period", f"{decrease:,} emails (the decrease applies when this period ends)"))
    return (
        '<section><h2>Usage</h2><div class="table-wrap"><table class="screen" id="screen">'
        + "".join(f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in rows)
        + "</table></div>"
        + f'<p class="why">Past the limit, sending goes on: each started block of {block} emails over it is'
        " charged at once. Unused emails do not carry over.</p></section>" + campaigns(usage)
    )


def campaigns(usage: dict[str, Any]) -> str:
    rows = sorted(usage["by_campaign"].items(), key=lambda item: (-item[1], item[0]))
    if not rows:
        return '<section><h2>By campaign</h2><p class="muted">No emails this period yet.</p></section>'
    return (
        "<section><h2>By campaign</h2>"
        + counts_table(("Campaign (X-Mailmeter-Campaign)", "Emails"), rows)
        + "</section>"
    )


def history(periods: Sequence[tuple[str, int, Sequence[tuple[str, int]]]]) -> str:
    """Model E's history: each invoiced period's emails, per campaign."""
    if not periods:
        return ""
    rows = [
        (label, "; ".join(f"{campaign}: {emails:,}" for campaign, emails in campaigns) or "-", total)
        for label, total, campaigns in periods
    ]
    return (
        '<section><h2>History</h2><div id="history">'
        + counts_table(("Period", "By campaign", "Emails"), rows, numeric_from=2)
        + "</div></section>"
    )


def model_c(usage: dict[str, Any]) -> str:
    results = int(usage["delivered"]) + int(usage["soft_bounced"]) + int(usage["hard_bounced"])
    overdrawn = usage["overdrawn"]
    owes = any(ch not in "0.," for ch in overdrawn)
    status = f"Overdrawn: {overdrawn} {usage['currency']}" if owes else "Normal"
    if usage["payment_state"] != "ok":
        status += " (sending paused: payment failed)"
    summary = counts_table(
        ("Service item", "Usage quantity", "Status"),
        [("Email delivery, billed on delivery results", f"{results:,} results", status)],
        numeric_from=9,
    )
    kinds = usage["bounce_types"]
    categories = [("Delivered", int(usage["delivered"]))]
    categories += [(f"Soft bounce: {reason}", n) for reason, n in sorted(kinds.get("soft_bounced", {}).items())] or [
        ("Soft bounce", int(usage["soft_bounced"]))
    ]
    categories += [(f"Invalid email: {reason}", n) for reason, n in sorted(kinds.get("hard_bounced", {}).items())] or [
        ("Invalid email", int(usage["hard_bounced"]))
    ]
    regions = sorted(usage["by_region"].items())
    return (
        f'<section><h2>Billing summary</h2>{summary}<p class="why">Spent this period: {e(usage["spent"])}'
        f" {e(usage['currency'])}; {int(usage['deferred']):,} emails are still waiting for their result.</p></section>"
        + "<section><h2>Delivery results</h2>"
        + counts_table(("Result", "Emails"), categories)
        + "</section><section><h2>Region details</h2>"
        + (counts_table(("Region", "Emails accepted"), regions) if regions else '<p class="muted">None yet.</p>')
        + "</section>"
    )


def model_a(usage: dict[str, Any], charges: Sequence[dict[str, Any]]) -> str:
    rows = [
        ("Live usage", f"{int(usage['accepted']):,} emails accepted this period"),
        ("Priced usage", f"{usage['spent']} {usage['currency']}"),
        ("Unbilled balance", f"{usage['unbilled']} {usage['currency']} (not collected yet; on the next invoice)"),
        ("Charged during the period", f"{len(charges)} threshold charges"),
    ]
    return "<section><h2>Usage</h2>" + rows_table(rows, "screen") + "</section>"


def model_b(usage: dict[str, Any], plan: Plan) -> str:
    prepaid = usage["prepaid"] or {}
    credit_at = prepaid.get("next_credit_at")
    next_day = datetime.fromisoformat(credit_at).astimezone(plan.period.zone()).date() if credit_at else ""
    cur = usage["currency"]
    buys = usage["remaining"]
    rows = [
        ("Balance", f"{prepaid.get('remaining', usage['prepaid_balance'])} {cur}"),
        ("What it buys", f"{buys:,} more emails at this month's prices" if buys is not None else "no limit"),
        ("Available this period", f"{prepaid.get('available', '')} {cur}"),
        ("Spent this period", f"{prepaid.get('spent', usage['spent'])} {cur} ({int(usage['accepted']):,} emails)"),
        ("Monthly payment", f"{prepaid.get('monthly_payment', '')} {cur} (credited at each period's start)"),
        (
            "Next monthly payment",
            f"{prepaid.get('next_monthly_payment', '')} {cur} on {next_day}",
        ),
    ]
    return "<section><h2>Balance</h2>" + rows_table(rows, "screen") + "</section>"


def payments(charges: Sequence[dict[str, Any]], title: str) -> str:
    if not charges:
        return ""
    rows = [(c["created_at"][:16].replace("T", " "), c["description"], c["status"]) for c in charges]
    note = (
        "A payment is added when the payment provider confirms it (status succeeded);"
        " recorded or submitted means it is waiting for that confirmation."
    )
    return (
        f"<section><h2>{e(title)}</h2>"
        + counts_table(("When (UTC)", "Payment", "Status"), rows, numeric_from=9)
        + f'<p class="why">{e(note)}</p></section>'
    )


def days_table(days: Sequence[Any]) -> str:
    rows = [(f"{d.day:%a %b %-d}", d.emails, d.total) for d in days if d.emails]
    if not rows:
        return ""
    return (
        '<details class="noprint"><summary>Emails by day</summary>'
        + counts_table(("Day", "Emails", "In the period"), rows)
        + "</details>"
    )


def invoices_list(invoices: Sequence[dict[str, Any]]) -> str:
    if not invoices:
        return '<section><p class="muted">No invoices yet: the first comes when a period ends.</p></section>'
    rows = "".join(
        f'<tr><td><a href="/invoices/{e(quote(i["id"], safe=""))}">{e(i["period"])}</a></td>'
        f"<td>{e(i['invoice_date'])}</td>"
        f'<td class="n">{e(i["total"])} {e(i["currency"])}</td><td class="n">{e(i["amount_due"])}</td>'
        f"<td>{e(i['status'])}</td></tr>"
        for i in invoices
    )
    return (
        '<section><div class="table-wrap"><table id="invoices"><thead><tr><th>Period</th><th>Date</th>'
        '<th class="n">Total</th><th class="n">Due</th><th>Status</th></tr></thead>'
        f"<tbody>{rows}</tbody></table></div></section>"
    )


def invoice_page(invoice: dict[str, Any]) -> str:
    cur = invoice["currency"]
    lines = [(line["description"], line["amount"]) for line in invoice["lines"]]
    lines.append(("Total", invoice["total"]))
    lines += [(p["description"], p["amount"]) for p in invoice.get("payments", [])]
    lines.append((f"Amount due ({invoice['status']})", invoice["amount_due"]))
    body = "".join(f'<tr><td>{e(d)}</td><td class="n">{e(a)} {e(cur)}</td></tr>' for d, a in lines)
    charges = invoice.get("in_period_charges", [])
    charged = (
        f"<h2>Charged during the period</h2><details><summary>{len(charges):,} charges</summary>"
        + counts_table(
            ("Charge", "Amount", "Status"), [(c["description"], c["amount"], c["status"]) for c in charges], 1
        )
        + "</details>"
        if charges
        else ""
    )
    regions = invoice.get("regions", [])
    region_table = (
        "<h2>By region</h2>"
        + counts_table(("Region", "Result", "Emails"), [(r["region"], r["result"], r["emails"]) for r in regions], 2)
        if regions
        else ""
    )
    return (
        f"<section><p>Invoice <strong>{e(invoice['id'])}</strong>, account {e(invoice['account'])}, plan"
        f" {e(invoice['plan_display_name'])}</p><p>Period {e(invoice['period'])}; invoice date"
        f" {e(invoice['invoice_date'])}; due {e(invoice['due_date'])}</p>"
        f'<div class="table-wrap"><table id="lines">{body}</table></div>{charged}{region_table}'
        f'<p class="noprint"><a href="/invoices/{e(quote(invoice["id"], safe=""))}.csv">Download CSV</a>'
        ' <button type="button" id="print">Print</button></p></section>'
    )


def model_title(model: Model) -> str:
    return {
        "A": "Usage and unbilled balance",
        "B": "Balance",
        "C": "Billing details",
        "D": "Usage",
        "E": "Usage",
    }[model]
