"""The store interface's types: the plain data the meter stores and returns, the errors every
store raises, and the pure helpers both stores share (account_core, charge_key)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import date, datetime
from enum import StrEnum
from typing import Any, Protocol, overload

from mailmeter.policies.account import Usage
from mailmeter.policies.changes import PlanChange
from mailmeter.policies.charges import Charge
from mailmeter.policies.currency import Currency
from mailmeter.policies.decision import Admission
from mailmeter.policies.history import History, PartPricing, PlanPart
from mailmeter.policies.limits import LimitChange
from mailmeter.policies.money import format_money
from mailmeter.policies.prepaid import PaymentChange
from mailmeter.policies.rate import SendRate


class Result(StrEnum):
    """Per-recipient results.

    As the relay reports them, they are its delivery verdict: delivered; deferred (will
    be retried); soft_bounced (temporary failures until the queue's maximum age);
    hard_bounced (refused permanently, not retried). As the meter stores and counts them
    they are the billing category (model C), which policies/results.py derives from the
    verdict and what the reply means: a `552 5.2.2` (mailbox full) is refused
    permanently and billed as soft_bounced. hard_bounced is the document's "Invalid Email".
    """

    DELIVERED = "delivered"
    DEFERRED = "deferred"  # not final: will be retried
    SOFT_BOUNCED = "soft_bounced"  # final: Soft Bounce
    HARD_BOUNCED = "hard_bounced"  # final: Invalid Email

    @property
    def final(self) -> bool:
        return self is not Result.DEFERRED


@dataclass(frozen=True)
class ResultReport:
    """One recipient's delivery result, as the delivery side reports it to the meter."""

    queue_id: str
    recipient: str
    result: Result  # the billing category
    detail: str
    at: datetime
    reason: str = ""  # the category's sub-type (policies/results.py)


@dataclass(frozen=True)
class Account:
    id: int
    name: str
    plan: str
    subscribed_on: date
    payment_ok: bool
    suspended: bool
    prepaid_balance: int
    domains: tuple[str, ...] = ()
    networks: tuple[str, ...] = ()
    password_hash: str | None = field(default=None, repr=False)
    contacts: tuple[str, ...] = ()
    payment_detail: str = ""
    awaiting_results: int = 0
    outstanding_debt: int = 0
    spending_limit_override: int | None = None
    included_change: LimitChange | None = None
    quota_change: LimitChange | None = None
    plan_change: PlanChange | None = None  # a plan change waiting for the end of the period
    created_at: datetime | None = None
    monthly_payments: tuple[PaymentChange, ...] = ()  # the account's own monthly payment, by period (model B)
    credited_through: str | None = None  # key of the last period whose monthly credit is recorded
    settled_through: str | None = None  # key of the last period invoiced (periods are invoiced in order)
    open_periods: tuple[tuple[str, Usage], ...] = ()  # usage of each period after settled_through, by key
    deleted_at: datetime | None = None  # `account delete`: kept for its invoices and audit trail, sends nothing
    sending_rate: str | None = None  # its own rate ("100/minute", "unlimited"); None: the plan's (policies/rate.py)

    @property
    def payment_state(self) -> str:
        return "ok" if self.payment_ok else "failed"

    def public(self, currency: Currency) -> dict[str, object]:
        """What `account show --json` prints, money in `currency`: never the password hash."""
        return {
            "name": self.name,
            "plan": self.plan,
            "subscribed_on": self.subscribed_on.isoformat(),
            "sender_domains": list(self.domains),
            "networks": list(self.networks),
            "contacts": list(self.contacts),
            "payment_state": self.payment_state,
            "payment_detail": self.payment_detail,
            "suspended": self.suspended,
            "deleted_at": None if self.deleted_at is None else self.deleted_at.isoformat(),
            "prepaid_balance": format_money(self.prepaid_balance, currency),
            "overdrawn": format_money(self.outstanding_debt, currency),
            "spending_limit_override": (
                None if self.spending_limit_override is None else format_money(self.spending_limit_override, currency)
            ),
            "monthly_payment_changes": [
                {"from": change.starts.isoformat(), "amount": format_money(change.amount, currency)}
                for change in self.monthly_payments
            ],
            "has_password": self.password_hash is not None,
            "sending_rate": self.sending_rate,
            "plan_change": None
            if self.plan_change is None
            else {
                "plan": self.plan_change.plan,
                "effective": self.plan_change.effective.isoformat(),
                "requested_at": self.plan_change.requested_at.isoformat(),
            },
        }


@dataclass(frozen=True)
class AccountEdit:
    """An operator's change of an account's settings, written in one transaction (the meter
    has checked it: the domains canonical, the networks parsed, the password hashed).

    Adding what is there or removing what is not changes nothing. `password_hash`: a new
    password; `clear_password`: no SMTP AUTH any more. `deleted_at`: delete the account
    (it is suspended too, so an open session is refused at its next command).
    """

    add_domains: tuple[str, ...] = ()
    remove_domains: tuple[str, ...] = ()
    add_networks: tuple[str, ...] = ()
    remove_networks: tuple[str, ...] = ()
    add_contacts: tuple[str, ...] = ()
    remove_contacts: tuple[str, ...] = ()
    password_hash: str | None = None
    clear_password: bool = False
    suspended: bool | None = None
    deleted_at: datetime | None = None


def edit_columns(edit: AccountEdit, contacts: list[str]) -> dict[str, object]:
    """The `accounts` columns an edit sets (both stores), from the account's current contacts."""
    columns: dict[str, object] = {}
    if edit.add_contacts or edit.remove_contacts:
        kept = [c for c in contacts if c not in edit.remove_contacts]
        columns["contacts"] = json.dumps(kept + [c for c in edit.add_contacts if c not in kept])
    if edit.password_hash is not None:
        columns["password_hash"] = edit.password_hash
    elif edit.clear_password:
        columns["password_hash"] = None
    if edit.suspended is not None:
        columns["suspended"] = int(edit.suspended)
    if edit.deleted_at is not None:
        columns["deleted_at"] = edit.deleted_at.isoformat()
        columns["suspended"] = 1
    return columns


def in_force(account: Account, instant: datetime) -> Account:
    """The account as it stands at `instant`: a pending plan change that is due by then is in
    force, and the account's own limits, which belonged to the old plan, are gone.

    The store applies a due change for good at the account's next admin change; until then
    every decision reads it through here, so the change takes effect at the very instant
    the period ends, whenever the billing job runs.
    """
    change = account.plan_change
    if change is None or not change.due(instant):
        return account
    return replace(
        account,
        plan=change.plan,
        plan_change=None,
        included_change=None,
        quota_change=None,
        spending_limit_override=None,
    )


def limit_change_to_json(change: LimitChange | None) -> str | None:
    if change is None:
        return None
    return json.dumps([change.previous, change.new, change.changed_at.isoformat()])


def limit_change_from_json(text: str | None) -> LimitChange | None:
    if not text:
        return None
    previous, new, changed_at = json.loads(text)
    return LimitChange(previous, new, datetime.fromisoformat(changed_at))


def payment_changes_to_json(changes: tuple[PaymentChange, ...]) -> str:
    return json.dumps([[change.starts.isoformat(), change.amount] for change in changes])


def payment_changes_from_json(text: str | None) -> tuple[PaymentChange, ...]:
    if not text:
        return ()
    return tuple(PaymentChange(datetime.fromisoformat(starts), int(amount)) for starts, amount in json.loads(text))


def open_periods_from_text(text: str | None) -> tuple[tuple[str, Usage], ...]:
    """The stores' `open_periods` column: "KEY ACCEPTED RESERVED DELIVERED SOFT HARD" per period, comma-separated."""
    if not text:
        return ()
    periods: list[tuple[str, Usage]] = []
    for item in text.split(","):
        key, accepted, reserved, delivered, soft, hard = item.split(" ")
        periods.append(
            (
                key,
                Usage(
                    accepted=int(accepted),
                    reserved=int(reserved),
                    delivered=int(delivered),
                    soft_bounced=int(soft),
                    hard_bounced=int(hard),
                ),
            )
        )
    return tuple(sorted(periods, key=lambda period: period[0]))


@dataclass(frozen=True)
class Suppression:
    """A recipient on an account's suppression list: refused at RCPT, never billed.

    address: lower-case; reason: the Invalid Email sub-type of the bounce that put it
    there (policies/results.py); detail: the upstream's reply; created_at: ISO time."""

    address: str
    reason: str
    detail: str
    queue_id: str
    created_at: str


SUPPRESSED = "suppressed"  # Grant.refusal of a recipient on the account's suppression list


class RecipientSuppressed(Exception):
    """A reserve for a recipient on the account's suppression list: nothing was held."""

    def __init__(self, entry: Suppression) -> None:
        super().__init__(f"{entry.address} is suppressed")
        self.entry = entry


@dataclass(frozen=True)
class Grant:
    """The answer to one reserve call."""

    hold_id: str
    granted: int
    refusal: str | None  # a policies.decision.Refusal value when granted < requested, or SUPPRESSED
    suppressed: Suppression | None = None  # with refusal SUPPRESSED: why the recipient is refused
    rate: str | None = None  # refusal rate_limited: the rate in force ("100/minute") ...
    retry_after: int | None = None  # ... and the seconds until its next window


# The kinds of events an account's webhook may take (EventRecord.kind).
EVENT_KINDS = ("delivered", "deferred", "bounced", "usage_alert", "payment")


@dataclass(frozen=True)
class Webhook:
    """An account's webhook: where its events are POSTed, signed with `secret`."""

    url: str
    secret: str
    events: tuple[str, ...]
    created_at: str


@dataclass(frozen=True)
class EventAttempt:
    """One delivery attempt of an event: its time, the HTTP status (None: no answer) and the error."""

    attempt: int
    at: str
    status_code: int | None
    error: str


@dataclass(frozen=True)
class EventRecord:
    """An event in the outbox. status: pending (to be sent or retried), delivered or failed
    (its attempts ran out); data: its JSON object as text; attempts: the delivery log."""

    id: int
    account: str
    kind: str
    data: str
    created_at: str
    status: str
    next_attempt_at: str
    attempts: tuple[EventAttempt, ...] = ()


@dataclass(frozen=True)
class DueEvent:
    """An event claimed for a delivery attempt, with where it goes."""

    id: int
    account: str
    kind: str
    data: str
    created_at: str
    attempts: int
    url: str
    secret: str


def result_event(queue_id: str, recipient: str, result: Result, reason: str, detail: str) -> tuple[str, str]:
    """The event kind and JSON data of a recipient's result (bounced carries soft or hard)."""
    kind = {Result.SOFT_BOUNCED: "bounced", Result.HARD_BOUNCED: "bounced"}.get(result, result.value)
    data: dict[str, Any] = {"queue_id": queue_id, "recipient": recipient, "result": result.value}
    if kind == "bounced":
        data["bounce"] = "soft" if result is Result.SOFT_BOUNCED else "hard"
    if result is not Result.DELIVERED:
        data["reason"] = reason
    data["detail"] = detail[:500]
    return kind, json.dumps(data, sort_keys=True)


def payment_event(ok: bool, detail: str, charge: str | None = None, charge_status: str | None = None) -> str:
    """The JSON data of a payment state change: set by the operator, the API or the payment
    webhook, or a charge that the gateway declined (failed: sending blocked) or collected."""
    data: dict[str, Any] = {"payment_state": "ok" if ok else "failed", "detail": detail[:500]}
    if charge is not None:
        data["charge"] = charge
        data["charge_status"] = charge_status
    return json.dumps(data, sort_keys=True)


def plan_change_to_json(change: PlanChange | None) -> str | None:
    if change is None:
        return None
    return json.dumps(
        {
            "plan": change.plan,
            "previous": change.previous,
            "requested_at": change.requested_at.isoformat(),
            "effective": change.effective.isoformat(),
        }
    )


def plan_change_from_json(text: str | None) -> PlanChange | None:
    if not text:
        return None
    data = json.loads(text)
    return PlanChange(
        plan=data["plan"],
        previous=data["previous"],
        requested_at=datetime.fromisoformat(data["requested_at"]),
        effective=datetime.fromisoformat(data["effective"]),
    )


def _pricing_json(pricing: PartPricing) -> dict[str, Any]:
    return {
        "billable": pricing.billable,
        "emails": pricing.emails,
        "limit": pricing.limit,
        "chargeable": pricing.chargeable,
        "priced": [list(pair) for pair in pricing.priced],
        "tiers": list(pricing.tiers),
        "cost": pricing.cost,
    }


def _pricing(data: Mapping[str, Any]) -> PartPricing:
    return PartPricing(
        billable=data["billable"],
        emails=data["emails"],
        limit=data["limit"],
        chargeable=data["chargeable"],
        priced=tuple((n, each) for n, each in data["priced"]),
        tiers=tuple(data["tiers"]),
        cost=data["cost"],
    )


def history_to_json(history: History | None) -> str | None:
    """A period's history as stored with its counters (period_usage.history)."""
    if history is None:
        return None
    return json.dumps(
        {
            "since": history.since,
            "chargeable": history.chargeable,
            "tiers": list(history.tiers),
            "parts": [
                {
                    "plan": part.plan,
                    "title": part.title,
                    "start": part.start.isoformat(),
                    "end": part.end.isoformat(),
                    "first_email": part.first_email,
                    "charges": part.charges,
                    "charged": part.charged,
                    "pricing": _pricing_json(part.pricing),
                }
                for part in history.parts
            ],
        },
        sort_keys=True,
    )


def history_from_json(text: str | None) -> History | None:
    if not text:
        return None
    data = json.loads(text)
    parts = tuple(
        PlanPart(
            plan=part["plan"],
            title=part["title"],
            start=datetime.fromisoformat(part["start"]),
            end=datetime.fromisoformat(part["end"]),
            first_email=part["first_email"],
            pricing=_pricing(part["pricing"]),
            charges=part["charges"],
            charged=part["charged"],
        )
        for part in data["parts"]
    )
    return History(parts=parts, since=data["since"], chargeable=data["chargeable"], tiers=tuple(data["tiers"]))


# The account columns an admin change may write (AccountUpdate.fields), each with the
# function that turns the Account field's value into the column's value.
_ACCOUNT_COLUMNS: dict[str, Any] = {
    "plan": str,
    "plan_change": plan_change_to_json,
    "included_change": limit_change_to_json,
    "quota_change": limit_change_to_json,
    "spending_limit_override": lambda micros: micros,
}


@dataclass(frozen=True)
class AccountUpdate:
    """An admin change's writes, decided inside its transaction from the account as it is then.

    fields: Account fields to write (plan, plan_change, included_change, quota_change,
      spending_limit_override) and their new values.
    history: the current period's history, stored with its counters (None: unchanged).
    outcome: what the change decided, handed back to its caller.
    """

    fields: Mapping[str, object] = field(default_factory=dict)
    history: History | None = None
    outcome: Any = None

    def columns(self) -> dict[str, object]:
        """The fields as column values; an unknown field is a bug, refused."""
        unknown = set(self.fields) - set(_ACCOUNT_COLUMNS)
        if unknown:
            raise ValueError(f"an admin change may not write {sorted(unknown)}")
        return {name: _ACCOUNT_COLUMNS[name](value) for name, value in self.fields.items()}


def applying_due_plan_change(account: Account, now: datetime) -> AccountUpdate | None:
    """The writes that put a due pending plan change in force for good (see in_force)."""
    change = account.plan_change
    if change is None or not change.due(now):
        return None
    return AccountUpdate(
        fields={
            "plan": change.plan,
            "plan_change": None,
            "included_change": None,
            "quota_change": None,
            "spending_limit_override": None,
        }
    )


# -- what the stores exchange with their callers ------------------------------------


class Row(Protocol):
    """One result row: by column name or position, like sqlite3.Row and asyncpg.Record.

    Both answer `row["col"]`, `row[0]`, `tuple(row)`, `dict(row)` and `row.keys()`,
    which is all callers use.
    """

    @overload
    def __getitem__(self, key: str) -> Any: ...
    @overload
    def __getitem__(self, key: int) -> Any: ...
    def keys(self) -> Iterable[str]: ...
    def __iter__(self) -> Iterator[Any]: ...
    def __len__(self) -> int: ...


@dataclass(frozen=True)
class Settlement:
    """What a commit adds besides usage: in-period charges and notices that became due."""

    charges: list[Charge]
    notices: list[tuple[str, str]]  # (key, JSON body), each sent once per period


Decide = Callable[[Account, Usage], Admission]
Settle = Callable[[Account, Usage, int, str], Settlement]
# The sending rate in force for an account as read inside the reserve transaction (policies/rate.py).
RateFor = Callable[[Account], SendRate | None]


@dataclass(frozen=True)
class InvoiceRecord:
    id: str
    account_id: int
    period_key: str
    period_end: str
    issued_at: str
    invoice_date: str
    due_date: str
    statement_date: str
    total: int
    amount_due: int
    prepaid_applied: int
    status: str
    body: str


@dataclass(frozen=True)
class LeasedCommit:
    """One message's commit point, carved from a lease: its emails leave the lease for `accepted`."""

    lease_id: str
    account_id: int
    period_key: str
    queue_id: str
    emails: int
    campaign: str = ""


@dataclass
class AuditDraft:
    """An admin change about to happen: who, what, on which account, and how to show it.

    `view` turns the account into the JSON kept as before/after; the caller decides
    what is public (never a password hash). The store fills before, after and id.
    """

    at: datetime
    actor: str
    action: str
    target: str
    view: Callable[[Account], dict[str, Any]]
    detail: dict[str, Any] = field(default_factory=dict)
    event_id: str | None = None
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None
    written: bool = False
    id: int | None = None


class StoreUnavailable(RuntimeError):
    """The store could not answer (locked, unreachable, corrupt). Callers fail closed."""


class UnknownHold(LookupError):
    """A hold id that is not (or no longer) in the store."""


class HoldAccountMismatch(LookupError):
    """A reserve into, or a commit of, a hold under another account than the hold's own.

    A hold belongs to the account it was first taken for: adding to it, or committing
    it, for another account would count one account's emails against another's
    allowance (an SMTP session must not change its account inside a transaction).
    """

    def __init__(self, hold_id: str, hold_account: int, asked_for: int) -> None:
        super().__init__(f"hold {hold_id} belongs to account id {hold_account}, not {asked_for}")


class NodeClaimed(Exception):
    """Another live process holds this node name; `holder` says which, as far as the database knows."""

    def __init__(self, node: str, holder: str) -> None:
        super().__init__(f"node {node!r} is held by {holder}")
        self.node = node
        self.holder = holder


class DuplicateEvent(RuntimeError):
    """An inbound event id that was already applied: the change it carried is rolled back."""


def charge_key(account: str, period_key: str, charge_key_part: str) -> str:
    """The idempotency key of a charge: account, period and the policy's kind/index."""
    return f"{account}/{period_key}/{charge_key_part}"


def account_core(row: Row, domains: tuple[str, ...] = (), networks: tuple[str, ...] = ()) -> Account:
    """An Account from an `accounts` row of either store (with `debt` and `open_periods` when selected)."""
    keys = row.keys()
    return Account(
        id=row["id"],
        name=row["name"],
        password_hash=row["password_hash"],
        plan=row["plan"],
        subscribed_on=date.fromisoformat(row["subscribed_on"]),
        payment_ok=bool(row["payment_ok"]),
        suspended=bool(row["suspended"]),
        prepaid_balance=row["prepaid_balance"],
        domains=domains,
        networks=networks,
        contacts=tuple(json.loads(row["contacts"])),
        payment_detail=row["payment_detail"],
        awaiting_results=row["awaiting_results"],
        outstanding_debt=int(row["debt"]) if "debt" in keys else 0,
        spending_limit_override=row["spending_limit_override"],
        included_change=limit_change_from_json(row["included_change"]),
        quota_change=limit_change_from_json(row["quota_change"]),
        plan_change=plan_change_from_json(row["plan_change"]),
        created_at=datetime.fromisoformat(row["created_at"]),
        monthly_payments=payment_changes_from_json(row["monthly_payment"]),
        credited_through=row["credited_through"],
        settled_through=row["settled_through"],
        open_periods=open_periods_from_text(row["open_periods"]) if "open_periods" in keys else (),
        deleted_at=datetime.fromisoformat(row["deleted_at"]) if row["deleted_at"] else None,
        sending_rate=row["sending_rate"],
    )
