"""The CSV export (metering/export.py) reconciles alone, over random accounts, plans and usage.

Each example bills a few accounts the way the billing job does (close_period on the
usage and the charges issued, invoice_body, an InvoiceRecord), exports them, reads the
CSV back as a spreadsheet would, and checks with exact decimal arithmetic that every
invoice's line amounts add up to its total, lines plus payments to its amount due,
and its own row carries the same figures, each in its own column.
"""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from datetime import date, datetime, timezone
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from mailmeter.metering.billing import invoice_body, invoice_id, invoice_status
from mailmeter.metering.export import EXPORT_COLUMNS, export_csv
from mailmeter.metering.records import Account, InvoiceRecord, charge_key
from mailmeter.policies.account import Usage
from mailmeter.policies.charges import charges_due
from mailmeter.policies.invoice import close_period
from mailmeter.policies.money import parse_money
from mailmeter.policies.periods import period_containing
from mailmeter.policies.plans import parse_plan
from mailmeter.policies.prepaid import monthly_credit
from tests.policies.test_policy_properties import plan_configs, standings

MID_APRIL = datetime(2026, 4, 15, tzinfo=timezone.utc)


@st.composite
def billed_accounts(draw: st.DrawFn) -> InvoiceRecord:
    """One account's closed period: a random plan, standing and usage, and the charges the
    meter issued (those due under another standing: a limit changed after they were made)."""
    config = draw(plan_configs())
    if config["funding"]["kind"] == "prepaid" and draw(st.booleans()):
        config["funding"]["monthly_payment"] = (
            f"{draw(st.integers(min_value=0, max_value=500))}.{draw(st.integers(0, 99)):02d}"
        )
    plan = parse_plan("random", config)
    standing = draw(standings())
    accepted = draw(st.integers(min_value=0, max_value=700))
    delivered = draw(st.integers(min_value=0, max_value=accepted))
    soft = draw(st.integers(min_value=0, max_value=accepted - delivered))
    usage = Usage(
        accepted=accepted,
        delivered=delivered,
        soft_bounced=soft,
        hard_bounced=draw(st.integers(min_value=0, max_value=accepted - delivered - soft)),
    )
    issued = charges_due(plan, draw(standings()) if draw(st.booleans()) else standing, usage)
    number = draw(st.integers(min_value=1, max_value=10_000))
    account = Account(number, f"acct{number}", "random", date(2026, 1, 31), True, False, standing.prepaid_balance)
    period = period_containing(plan.period, MID_APRIL, account.subscribed_on)
    invoice = close_period(plan, standing, usage, period, issued)
    credit = monthly_credit(plan, (), period, "April")
    statuses = st.sampled_from(["pending", "submitted", "succeeded", "failed"])
    rows: list[dict[str, Any]] = [
        {
            "idempotency_key": charge_key(account.name, period.key, charge.key),
            "kind": charge.kind,
            "amount": charge.amount,
            "emails_unlocked": charge.emails_unlocked,
            "description": charge.description,
            "created_at": MID_APRIL.isoformat(),
            "status": draw(statuses),
        }
        for charge in [*issued, *([credit] if credit else [])]
    ]
    regions = [
        {"region": region, "result": result, "n": draw(st.integers(min_value=1, max_value=50))}
        for region in draw(st.sets(st.sampled_from(["", "eu-1", "us-2"]), max_size=2))
        for result in ("delivered", "hard_bounced")
    ]
    status = invoice_status(plan, invoice)
    body = invoice_body(account, plan, invoice, status, rows, regions)  # type: ignore[arg-type]
    return InvoiceRecord(
        id=invoice_id(account, period, plan),
        account_id=account.id,
        period_key=period.key,
        period_end=period.end.isoformat(),
        issued_at=invoice.issued_at.isoformat(),
        invoice_date=invoice.invoice_date.isoformat(),
        due_date=invoice.due_date.isoformat(),
        statement_date=invoice.statement_date.isoformat(),
        total=invoice.total,
        amount_due=invoice.amount_due,
        prepaid_applied=invoice.prepaid_applied,
        status=status,
        body=json.dumps(body),
    )


def reconcile(text: str, records: list[InvoiceRecord]) -> None:
    """What a reconciler does with the CSV alone, checked against the invoices."""
    reader = csv.DictReader(io.StringIO(text))
    assert reader.fieldnames == EXPORT_COLUMNS
    rows = list(reader)
    lines: dict[str, int] = defaultdict(int)
    payments: dict[str, int] = defaultdict(int)
    usage_charges: dict[str, int] = defaultdict(int)
    charged_lines: dict[str, int] = defaultdict(int)
    own: dict[str, dict[str, str]] = {}
    for row in rows:
        invoice = row["invoice_id"]
        if row["record"] == "line":
            lines[invoice] += parse_money(row["amount"])
            if row["item"] == "in_period_charges":
                charged_lines[invoice] += parse_money(row["amount"])
        elif row["record"] == "payment":
            payments[invoice] += parse_money(row["amount"])
        elif row["record"] == "invoice":
            assert invoice not in own and row["amount"] == ""
            own[invoice] = row
        elif row["record"] == "charge":
            if row["item"] != "monthly":
                usage_charges[invoice] += parse_money(row["amount"])
            assert row["charge_key"].startswith(f"{row['account']}/") and row["charge_status"]
        else:
            assert row["record"] == "region" and row["amount"] == "" and int(row["quantity"]) > 0
        if row["record"] != "invoice":
            assert row["total"] == row["prepaid_applied"] == row["amount_due"] == ""
    assert sorted(own) == sorted(record.id for record in records)
    for record in records:
        figures = own[record.id]
        assert lines[record.id] == record.total == parse_money(figures["total"])
        assert lines[record.id] + payments[record.id] == record.amount_due == parse_money(figures["amount_due"])
        assert -payments[record.id] == record.prepaid_applied == parse_money(figures["prepaid_applied"])
        assert usage_charges[record.id] == -charged_lines[record.id]  # the charge rows detail that line


@settings(max_examples=150, deadline=None)
@given(st.lists(billed_accounts(), min_size=1, max_size=5, unique_by=lambda record: record.id))
def test_summing_the_lines_of_any_export_gives_every_invoices_total_and_amount_due(
    records: list[InvoiceRecord],
) -> None:
    reconcile(export_csv(records), records)
