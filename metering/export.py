"""The CSV export of a month's invoices, for reconciliation: it adds up without the invoices.

Every figure has its own column, and the `record` column says what a row is:

  line     one invoice line (`item`: fee, usage, in_period_charges, ...); the `amount`s
           of an invoice's line rows add up to its `total`
  payment  what paid part of the total before it fell due (`item`: prepaid, the part
           the prepaid balance paid); line + payment amounts add up to `amount_due`
  invoice  the invoice's own figures: `total`, `prepaid_applied`, `amount_due` (no amount)
  charge   one charge made during the period (`item`: threshold, block, monthly), with
           its `charge_key` and `charge_status`: details, already summed by the
           in_period_charges line (usage charges) or credited to the prepaid balance
           (monthly), so not added again
  region   one region's delivery results of a kind (`quantity` emails, no money)

Money is a decimal string of the invoice's `currency`, exact (never rounded again).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from typing import Any

from mailmeter.metering.records import InvoiceRecord
from mailmeter.policies.currency import currency_for
from mailmeter.policies.money import format_money

EXPORT_COLUMNS = [
    "invoice_id",
    "account",
    "plan",
    "period",
    "period_start",
    "period_end",
    "invoice_date",
    "due_date",
    "currency",
    "invoice_status",
    "record",
    "item",
    "description",
    "quantity",
    "amount",
    "charge_key",
    "charge_status",
    "total",
    "prepaid_applied",
    "amount_due",
]


def invoice_rows(record: InvoiceRecord) -> list[dict[str, Any]]:
    """The export rows of one invoice, in the order above: lines, payments, the invoice, charges, regions."""
    body = json.loads(record.body)
    base = {
        "invoice_id": record.id,
        "account": body["account"],
        "plan": body["plan"],
        "period": body["period"],
        "period_start": body["period_start"],
        "period_end": body["period_end"],
        "invoice_date": record.invoice_date,
        "due_date": record.due_date,
        "currency": body["currency"],
        "invoice_status": record.status,
    }
    currency = currency_for(str(body["currency"]))
    rows: list[dict[str, Any]] = []
    for line in body["lines"]:
        rows.append(
            {
                **base,
                "record": "line",
                "item": line["kind"],
                "description": line["description"],
                "quantity": line["quantity"],
                "amount": line["amount"],
            }
        )
    if record.prepaid_applied:
        rows.append(
            {
                **base,
                "record": "payment",
                "item": "prepaid",
                "description": "Paid from the prepaid balance",
                "amount": format_money(-record.prepaid_applied, currency),
            }
        )
    rows.append(
        {
            **base,
            "record": "invoice",
            "item": "invoice",
            "description": f"Invoice total; amount due by {record.due_date}",
            "total": format_money(record.total, currency),
            "prepaid_applied": format_money(record.prepaid_applied, currency),
            "amount_due": format_money(record.amount_due, currency),
        }
    )
    for charge in [*body["in_period_charges"], *body.get("monthly_payments", [])]:
        rows.append(
            {
                **base,
                "record": "charge",
                "item": charge["kind"],
                "description": charge["description"],
                "quantity": charge["emails_unlocked"],
                "amount": charge["amount"],
                "charge_key": charge["key"],
                "charge_status": charge["status"],
            }
        )
    for region in body["regions"]:
        rows.append(
            {
                **base,
                "record": "region",
                "item": region["region"],
                "description": region["result"],
                "quantity": region["emails"],
            }
        )
    return rows


def month_of(record: InvoiceRecord) -> str:
    """YYYY-MM of the invoice's period start, in its plan's time zone."""
    return str(json.loads(record.body)["period_month"])


def export_csv(records: Iterable[InvoiceRecord]) -> str:
    """The CSV text (header row first) of these invoices' rows."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=EXPORT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerows(invoice_rows(record))
    return buffer.getvalue()


__all__ = ["EXPORT_COLUMNS", "export_csv", "invoice_rows", "month_of"]
