"""The admin service layer: every operator action, once, for the CLI and the HTTP API.

Each method takes plain values and returns JSON-ready data (money as decimal
strings). Errors are AdminError (or its NotFound and Conflict) with a message
that says what to do. Every method that changes state records an audit event
for the service's `actor` in the same call, and for an account in the same
database transaction as the change (SqliteStore.audited), so neither the CLI
nor the API can change anything unaudited.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import date, datetime, time, timezone
from functools import partial
from typing import Any

import structlog

from mailmeter.audit import WEBHOOK_ACTOR, account_view, changes, event_json
from mailmeter.control import QueueClient, QueueRefused, RelayNotRunning
from mailmeter.events import check_webhook, suppression_json
from mailmeter.events import event_json as outbox_event_json
from mailmeter.metering.billing import Billing
from mailmeter.metering.export import export_csv, month_of
from mailmeter.metering.meter import (
    MAX_MONEY,
    AccountDeleted,
    BalanceTooLarge,
    Meter,
    UnknownAccount,
    UnknownPlan,
    WideNetwork,
)
from mailmeter.metering.records import (
    EVENT_KINDS,
    Account,
    AuditDraft,
    DuplicateEvent,
    EventRecord,
    Row,
    Suppression,
    in_force,
)
from mailmeter.policies import PlanChangeRefused, PlanSwitch, ScriptEvent, Standing, preview
from mailmeter.policies.currency import Currency, currency_for
from mailmeter.policies.money import MoneyError, format_money, is_whole_minor, parse_money
from mailmeter.policies.parts import ThresholdCharge
from mailmeter.policies.plan import Plan
from mailmeter.policies.rate import RateError, check_account_rate, rate_in_force
from mailmeter.relay.domains import DomainError, canonical_domain


class AdminError(ValueError):
    """An operator error: the message names the fix."""


class NotFound(AdminError):
    """The thing named does not exist (HTTP 404)."""


class Conflict(AdminError):
    """The change clashes with what exists (HTTP 409)."""


class Unavailable(AdminError):
    """What is asked needs something that does not answer, like the running relay (HTTP 503)."""


ACCOUNT_TOKEN_PREFIX = "mmat_"  # an account's own API token (the admin API's tokens are a file's)


def token_hash(token: str) -> str:
    """What the store keeps of an account token: its SHA-256 (the token is 256 random bits)."""
    return hashlib.sha256(token.encode()).hexdigest()


PAYMENT_EVENTS = ("charge.succeeded", "charge.failed", "payment_method.updated")
CHARGE_STATES = ("pending", "submitted", "recorded", "succeeded", "failed")
OPEN_CHARGE_STATES = ("pending", "submitted", "recorded")
LIMITS = ("included", "quota", "spending")
MAX_EMAILS = 1_000_000_000_000  # any count of emails an operator gives (limits, previews)
MAX_NAME = 128
# NUL and the other control characters (TAB aside), and lone surrogates (not Unicode text:
# they cannot be encoded, and PostgreSQL refuses NUL): never in a stored or looked-up text.
_BAD_TEXT = re.compile("[\x00-\x08\x0a-\x1f\x7f\ud800-\udfff]")


def text_problem(value: str) -> str | None:
    """Why `value` cannot be a name, domain, reason or parameter, or None. The CLI and the
    API check every text they are given with it before anything reaches the store."""
    match = _BAD_TEXT.search(value)
    if match is None:
        return None
    if "\ud800" <= match.group() <= "\udfff":
        return "is not valid Unicode text (it holds a lone surrogate); send UTF-8 text"
    return f"contains the control character U+{ord(match.group()):04X}; remove it"


def _emails(value: object, what: str) -> int:
    """A whole number of emails from an int or a string like "10,000"."""
    if isinstance(value, bool):
        raise AdminError(f"{what}: give a whole number of emails, like 50000")
    if isinstance(value, int):
        emails = value
    else:
        try:
            emails = int(str(value).replace(",", "").replace("_", ""))
        except ValueError:
            raise AdminError(f"{what}: {value!r} is not a whole number of emails (write it like 50000)") from None
    if emails > MAX_EMAILS:
        raise AdminError(f"{what}: {emails} is more emails than the meter counts (at most {MAX_EMAILS:,})")
    return emails


def _account_name(name: str) -> str:
    if not name or len(name) > MAX_NAME or not name.isprintable() or any(c.isspace() or c == "/" for c in name):
        raise AdminError(f"name: an account name is 1-{MAX_NAME} printable characters, no spaces or '/'")
    return name


def _sender_domains(domains: list[str]) -> list[str]:
    canonical = []
    for domain in domains:
        try:
            canonical.append(canonical_domain(domain))
        except DomainError as error:
            raise AdminError(f"sender_domains: {domain!r} is not a domain name: {error}") from None
    return canonical


def _text(event: Mapping[str, Any], key: str) -> str:
    value = event.get(key)
    if not isinstance(value, str) or not value:
        raise AdminError(f"{key}: give the {key} as a non-empty string")
    return value


def _money(text: str, what: str, currency: Currency) -> int:
    """An amount the operator wrote, in the currency's minor units at most ("25.00"; JPY "2500")."""
    try:
        micros = parse_money(text, currency)
    except MoneyError as error:
        raise AdminError(f"{what}: {error}") from None
    if abs(micros) > MAX_MONEY:
        raise AdminError(
            f"{what}: {text!r} is beyond what the meter keeps (at most {format_money(MAX_MONEY, currency)})"
        )
    return micros


def _wide(wide: WideNetwork, name: str) -> AdminError:
    return AdminError(
        f"networks: {wide.network} is wider than a /{wide.widest}: every client in it could send"
        f" unauthenticated mail billed to account {name}; bind the clients' own network, or, if that"
        ' is what you mean, pass --allow-wide-network (API: "allow_wide_network": true)'
    )


def charge_json(row: Row, currency: Currency) -> dict[str, Any]:
    """One charge as `charge list` and the API show it."""
    return {
        "key": row["idempotency_key"],
        "period_start": row["period_key"],
        "kind": row["kind"],
        "index": row["seq"],
        "amount": format_money(row["amount"], currency),
        "currency": currency.code,
        "emails_unlocked": row["emails_unlocked"],
        "description": row["description"],
        "created_at": row["created_at"],
        "status": row["status"],
        "attempts": row["attempts"],
        "detail": row["detail"],
    }


def _monthly_payment(text: str, currency: Currency) -> int:
    micros = _money(text, "amount", currency)
    if micros < 0 or not is_whole_minor(micros, currency):
        raise AdminError(
            "amount: the monthly payment is charged as it is: give a non-negative amount in"
            f" {currency.code}, like {format_money(150_000_000, currency)}"
        )
    return micros


@dataclass
class AdminService:
    """The operator's actions; `actor` (a token NAME, `cli:USER`) is who the audit trail names;
    `queue` reaches the running node's queue (mailmeter/control.py)."""

    meter: Meter
    billing: Billing
    actor: str
    queue: QueueClient | None = None

    def as_actor(self, actor: str) -> AdminService:
        """The same service acting for someone else (one API request's token NAME)."""
        return replace(self, actor=actor)

    def for_account(self, name: str) -> AccountService:
        """What the account `name` may do itself (its token's API, its pages), audited as `account:NAME`."""
        return AccountService(self.as_actor(f"account:{name}"), name)

    @asynccontextmanager
    async def _audit(
        self, action: str, account: str, detail: dict[str, Any] | None = None, event_id: str | None = None
    ) -> AsyncIterator[AuditDraft]:
        """Wrap the one meter call that changes `account`: its audit event commits with it."""
        draft = AuditDraft(
            at=self.meter.clock(),
            actor=self.actor,
            action=action,
            target=account,
            view=partial(account_view, currency=self.meter.currency),
            detail=detail or {},
            event_id=event_id,
        )
        async with self.meter.store.audited(draft):
            yield draft
        if draft.written:
            structlog.get_logger("mailmeter.audit").info(
                "admin.change",
                actor=self.actor,
                action=action,
                target=account,
                audit_id=draft.id,
                changed=sorted(changes(draft.before, draft.after)),
                result="ok",
            )

    # -- accounts -------------------------------------------------------------------

    async def add_account(
        self,
        name: str,
        password: str | None,
        plan: str,
        domains: list[str],
        networks: list[str],
        contacts: list[str],
        subscribed_on: date | None = None,
        allow_wide_network: bool = False,
        monthly_payment: str | None = None,
    ) -> dict[str, Any]:
        """`allow_wide_network`: the operator means a network binding wider than a /16 (IPv4)
        or /48 (IPv6); without it such a binding, which lets every client in it send
        unauthenticated billed to this account, is refused."""
        if password is None and not networks:
            raise AdminError("give a password (for SMTP AUTH) or a client network binding, or both")
        if not domains:
            raise AdminError("give at least one sender domain the account may send from")
        name = _account_name(name)
        domains = _sender_domains(domains)
        existing = await self.meter.store.get_account(name)
        if existing is not None and existing.deleted_at is not None:
            raise Conflict(
                f"account {name!r} was deleted on {existing.deleted_at:%Y-%m-%d}; an account name is never"
                " reused (its invoices and audit trail keep it): choose another name"
            )
        if existing is not None:
            raise Conflict(f"account {name!r} already exists; choose another name")
        payment = None if monthly_payment is None else _monthly_payment(monthly_payment, self.meter.currency)
        detail: dict[str, Any] = {"plan": plan}
        if payment is not None:
            detail["monthly_payment"] = format_money(payment, self.meter.currency)
        try:
            async with self._audit("account.add", name, detail):
                account = await self.meter.add_account(
                    name,
                    password,
                    plan,
                    domains,
                    networks,
                    subscribed_on=subscribed_on,
                    contacts=contacts,
                    allow_wide_networks=allow_wide_network,
                    monthly_payment=payment,
                )
        except WideNetwork as wide:
            raise _wide(wide, name) from None
        except (UnknownPlan, ValueError) as error:
            raise AdminError(str(error).strip('"')) from None
        return account.public(self.meter.currency)

    async def accounts(self, include_deleted: bool = False) -> list[dict[str, Any]]:
        now = self.meter.clock()
        currency = self.meter.currency
        return [
            in_force(a, now).public(currency)
            for a in await self.meter.store.list_accounts()
            if include_deleted or a.deleted_at is None
        ]

    async def change_account(
        self,
        name: str,
        add_domains: Sequence[str] = (),
        remove_domains: Sequence[str] = (),
        add_networks: Sequence[str] = (),
        remove_networks: Sequence[str] = (),
        add_contacts: Sequence[str] = (),
        remove_contacts: Sequence[str] = (),
        password: str | None = None,
        clear_password: bool = False,
        allow_wide_network: bool = False,
    ) -> dict[str, Any]:
        """Change sender domains, bound networks, contacts or the password; in force at once
        (the next MAIL, the next AUTH; a network binding within 2 s on every process)."""
        if password is not None and clear_password:
            raise AdminError("give a new password or remove the password, not both")
        if password is not None and not password:
            raise AdminError("password: the new password must not be empty")
        if not any((add_domains, remove_domains, add_networks, remove_networks, add_contacts, remove_contacts)) and (
            password is None and not clear_password
        ):
            raise AdminError(
                "nothing to change: give --add-domain, --remove-domain, --add-network, --remove-network,"
                " --add-contact, --remove-contact, --password-file or --no-password"
            )
        detail: dict[str, Any] = {
            key: list(value)
            for key, value in (
                ("add_domains", add_domains),
                ("remove_domains", remove_domains),
                ("add_networks", add_networks),
                ("remove_networks", remove_networks),
                ("add_contacts", add_contacts),
                ("remove_contacts", remove_contacts),
            )
            if value
        }
        if password is not None:
            detail["password"] = "changed"  # never the password itself
        if clear_password:
            detail["password"] = "removed"
        try:
            async with self._audit("account.change", name, detail):
                account = await self.meter.change_settings(
                    name,
                    add_domains=_sender_domains(list(add_domains)),
                    remove_domains=_sender_domains(list(remove_domains)),
                    add_networks=list(add_networks),
                    remove_networks=list(remove_networks),
                    add_contacts=list(add_contacts),
                    remove_contacts=list(remove_contacts),
                    password=password,
                    clear_password=clear_password,
                    allow_wide_networks=allow_wide_network,
                )
        except WideNetwork as wide:
            raise _wide(wide, name) from None
        except AccountDeleted as error:
            raise Conflict(str(error)) from None
        except ValueError as error:
            raise AdminError(str(error).strip('"')) from None
        return account.public(self.meter.currency)

    async def suspend(self, name: str, suspended: bool) -> dict[str, Any]:
        """Suspend (True) or resume the account's sending, live: at an open session's next MAIL or RCPT."""
        try:
            async with self._audit("account.suspend" if suspended else "account.resume", name):
                account = await self.meter.set_suspended(name, suspended)
        except AccountDeleted as error:
            raise Conflict(str(error)) from None
        return account.public(self.meter.currency)

    async def delete_account(self, name: str, force: bool = False) -> dict[str, Any]:
        """Soft delete: refused while the account has mail awaiting a result or usage not
        invoiced yet, unless `force`. The account stops sending at once; it is kept (its
        invoices, audit trail and name); its last invoice is for the period it was deleted in."""
        account = await self.meter.account(name)
        if account.deleted_at is not None:
            raise Conflict(f"account {name!r} was already deleted on {account.deleted_at:%Y-%m-%d}")
        problems = []
        if account.awaiting_results > 0:
            problems.append(
                f"{account.awaiting_results} recipient(s) of its mail still await a delivery result"
                f" (see `mailmeter queue list --account {name}`)"
            )
        unbilled = [key[:10] for key, usage in account.open_periods if usage.accepted > 0]
        if unbilled:
            problems.append(
                f"its usage of the period(s) starting {', '.join(unbilled)} is not invoiced yet"
                " (the billing job invoices a period when it ends)"
            )
        if problems and not force:
            raise Conflict(
                f"account {name!r} was not deleted: {'; '.join(problems)}; wait for that, or delete it anyway"
                ' with --force (API: "force": true): its last invoice still comes when this period ends'
            )
        detail = {"force": force, "open": problems}
        try:
            async with self._audit("account.delete", name, detail):
                deleted = await self.meter.delete_account(name)
        except AccountDeleted as error:
            raise Conflict(str(error)) from None
        return deleted.public(self.meter.currency)

    async def _not_deleted(self, name: str) -> None:
        """Conflict for a deleted account: it is kept for its records, never changed."""
        account = await self.meter.store.get_account(name)
        if account is not None and account.deleted_at is not None:
            raise Conflict(f"account {name!r} was deleted on {account.deleted_at:%Y-%m-%d}; it cannot be changed")

    async def overview(self, name: str) -> dict[str, Any]:
        """`account show`: the account, its standing and its current period's usage in one answer."""
        account = in_force(await self.meter.account(name), self.meter.clock())
        usage = await self.usage(name)
        if account.deleted_at is not None:
            standing = "deleted"
        elif account.suspended:
            standing = "suspended"
        elif not account.payment_ok:
            standing = "blocked: payment failed"
        else:
            standing = "active"
        return {
            **account.public(self.meter.currency),
            "standing": standing,
            "awaiting_results": account.awaiting_results,
            "usage": usage,
        }

    async def account(self, name: str) -> dict[str, Any]:
        """The account as it stands now (a plan change due by now is in force)."""
        return in_force(await self.meter.account(name), self.meter.clock()).public(self.meter.currency)

    async def usage(self, name: str) -> dict[str, Any]:
        return (await self.meter.usage(name)).as_json()

    # -- payment state, balances, limits: live at the next SMTP command ---------------

    async def set_payment(self, name: str, ok: bool, reason: str = "") -> dict[str, Any]:
        reason = reason or ("payment method updated" if ok else "payment failed")
        async with self._audit("payment.ok" if ok else "payment.failed", name, {"reason": reason}):
            await self.meter.set_payment(name, ok, reason)
        return await self.account(name)

    async def payment(self, name: str, state: str, reason: str = "") -> dict[str, Any]:
        """`failed` blocks sending (live, at the next MAIL or RCPT); `ok` releases it."""
        if state not in ("failed", "ok"):
            raise AdminError(f"state: {state!r} is not a payment state; give failed (block) or ok (release)")
        return await self.set_payment(name, state == "ok", reason)

    async def add_balance(self, name: str, amount: str) -> dict[str, Any]:
        await self._not_deleted(name)
        currency = self.meter.currency
        micros = _money(amount, "amount", currency)
        if micros <= 0:
            raise AdminError(f"amount: a top-up must be positive, like {format_money(25_000_000, currency)}")
        try:
            async with self._audit("balance.add", name, {"amount": format_money(micros, currency)}):
                balance = await self.meter.add_balance(name, micros)
        except BalanceTooLarge as error:
            raise AdminError(f"amount: {error}") from None
        return {
            "account": name,
            "added": format_money(micros, currency),
            "prepaid_balance": format_money(balance, currency),
        }

    async def set_monthly_payment(self, name: str, amount: str) -> dict[str, Any]:
        """Model B's "increase your payment": the account's monthly payment, credited to its
        prepaid balance from the next period on (the current period's credit is already fixed;
        to send more in it, top up the balance)."""
        await self._not_deleted(name)
        micros = _monthly_payment(amount, self.meter.currency)
        account = await self.meter.account(name)
        plan = self.meter.plans.get(account.plan)
        if plan is not None and plan.funding.kind != "prepaid":
            raise Conflict(
                f"account {name!r} is on plan {account.plan!r}, which is postpaid: it is invoiced for"
                " what it sends; a monthly payment is credit to a prepaid balance"
            )
        try:
            async with self._audit("balance.monthly", name, {"amount": format_money(micros, self.meter.currency)}):
                change = await self.meter.set_monthly_payment(name, micros)
        except ValueError as error:
            raise AdminError(str(error).strip('"')) from None
        prepaid = (await self.usage(name))["prepaid"]
        return {
            "account": name,
            "monthly_payment": prepaid["monthly_payment"],
            "next_monthly_payment": format_money(change.amount, self.meter.currency),
            "applies_from": change.starts.isoformat(),
            "prepaid_balance": (await self.account(name))["prepaid_balance"],
        }

    async def repay(self, name: str) -> dict[str, Any]:
        async with self._audit("repay", name):
            repaid = await self.meter.repay(name)
        return {"account": name, "repaid": format_money(repaid, self.meter.currency)}

    async def pay(self, name: str, kind: str, amount: str | None = None) -> dict[str, Any]:
        """A payment the account holder makes through the payment gateway (the portal's
        "top up" for a prepaid plan, "repay overdrawn" for a plan with an overdraft): a
        charge of kind `topup` or `repay`, handed to the gateway at once. The balance rises
        (or the overdrawn invoices are paid) when the gateway confirms it: at once if it
        answers succeeded, else by the payment webhook or, without a gateway, `mailmeter
        charge collected KEY`."""
        currency = self.meter.currency
        account = await self.meter.account(name)
        plan = self.meter.plan_of(account)
        if kind == "topup":
            if plan.funding.kind != "prepaid":
                raise Conflict(f"account {name!r} is postpaid (plan {account.plan!r}): it has no balance to top up")
            micros = _money(amount or "", "amount", currency)
            if micros <= 0 or not is_whole_minor(micros, currency):
                raise AdminError(f"amount: a top-up is a positive amount, like {format_money(25_000_000, currency)}")
            description = f"Top-up of the prepaid balance: {format_money(micros, currency)}"
        elif kind == "repay":
            micros = account.outstanding_debt
            if micros <= 0:
                raise Conflict(f"account {name!r} has nothing overdrawn to repay")
            description = f"Repay overdrawn: {format_money(micros, currency)} (every region)"
        else:
            raise AdminError(f"kind: {kind!r} is not a payment; give topup or repay")
        period = self.meter.period_of(account)
        async with self._audit(f"payment.{kind}", name, {"amount": format_money(micros, currency)}):
            row = await self.meter.store.add_payment(name, period.key, kind, micros, description, self.meter.clock())
        if row is None:
            raise Conflict("a repayment is already on its way; wait for the payment to be confirmed")
        await self.billing.collect_charge(row["idempotency_key"])
        charge = await self.meter.store.charge(row["idempotency_key"])
        assert charge is not None
        return charge_json(charge, currency)

    async def set_limit(self, name: str, which: str, value: object) -> dict[str, Any]:
        """One of the account's limits: `included` or `quota` emails, or a `spending` amount."""
        if which == "spending":
            if value is not None and not isinstance(value, str):
                raise AdminError('amount: write the spending limit as a decimal string like "20.00", or none')
            return await self.set_spending_limit(name, value)
        if which in ("included", "quota"):
            return await self.set_email_limit(name, which, _emails(value, "emails"))
        raise AdminError(f"limit {which!r}: choose included, quota or spending")

    async def set_email_limit(self, name: str, which: str, emails: int) -> dict[str, Any]:
        await self._not_deleted(name)
        if which not in ("included", "quota"):
            raise AdminError("limit: choose included (model E's monthly limit) or quota (a hard cap)")
        if emails < 0:
            raise AdminError("emails: the number of emails must not be negative")
        async with self._audit(f"limit.{which}", name, {"emails": emails}):
            await self.meter.set_email_limit(name, which, emails)
        return await self.usage(name)

    async def set_spending_limit(self, name: str, amount: str | None) -> dict[str, Any]:
        await self._not_deleted(name)
        currency = self.meter.currency
        micros = None if amount in (None, "none") else _money(str(amount), "amount", currency)
        if micros is not None and micros < 0:
            raise AdminError("amount: the spending limit must not be negative")
        detail = {"amount": None if micros is None else format_money(micros, currency)}
        async with self._audit("limit.spending", name, detail):
            await self.meter.set_spending_limit(name, micros)
        return await self.usage(name)

    # -- sending rate ----------------------------------------------------------------------

    async def set_sending_rate(self, name: str, rate: object) -> dict[str, Any]:
        """The account's own sending rate: `100/minute` (per second, minute, hour or day),
        `unlimited`, or `none` (the plan's applies); live at the next RCPT."""
        if not isinstance(rate, str) or not rate.strip():
            raise AdminError("rate: write it like 100/minute, or none (the plan's rate) or unlimited (no rate)")
        try:
            setting = check_account_rate(rate)
        except RateError as error:
            raise AdminError(f"rate: {error}") from None
        async with self._audit("account.rate", name, {"rate": setting}):
            await self.meter.set_sending_rate(name, setting)
        return await self.sending_rate(name)

    async def sending_rate(self, name: str) -> dict[str, Any]:
        """The account's own rate, its plan's, and the one in force."""
        account = in_force(await self.meter.account(name), self.meter.clock())
        plan = self.meter.plan_of(account)
        in_force_now = rate_in_force(plan.sending_rate, account.sending_rate)
        return {
            "account": name,
            "account_rate": account.sending_rate,
            "plan": plan.name,
            "plan_rate": None if plan.sending_rate is None else str(plan.sending_rate),
            "rate": None if in_force_now is None else str(in_force_now),
        }

    # -- plan changes --------------------------------------------------------------------

    async def set_plan(self, name: str, plan: object) -> dict[str, Any]:
        """Move the account to `plan`: an upgrade at once, any other change when the period ends."""
        await self._not_deleted(name)
        if not isinstance(plan, str) or not plan:
            raise AdminError("plan: name a plan the config defines (GET /v1/plans lists them)")
        if plan not in self.meter.plans:
            raise AdminError(f"plan {plan!r} is not defined (known: {', '.join(sorted(self.meter.plans))})")
        previous = in_force(await self.meter.account(name), self.meter.clock()).plan
        try:
            async with self._audit("plan.change", name, {"plan": plan}):
                switch = await self.meter.set_plan(name, plan)
        except PlanChangeRefused as error:
            raise Conflict(str(error)) from None
        account = await self.account(name)
        return {
            "account": name,
            "from": previous,
            "to": plan,
            **switch_json(switch),
            "plan": account["plan"],
            "plan_change": account["plan_change"],
        }

    # -- the inbound payment webhook ---------------------------------------------------

    async def payment_event(self, event: Mapping[str, Any], event_id: object) -> dict[str, Any]:
        """Apply one payment provider event, once per event id.

        `charge.succeeded` / `charge.failed` settle a charge the gateway answered
        `pending` for (a failure blocks the account, live); `payment_method.updated`
        releases a blocked account. The event id is stored with the audit event in
        the change's own transaction, so a redelivery changes nothing.
        """
        kind = event.get("type")
        if kind not in PAYMENT_EVENTS:
            raise AdminError(f"type: {kind!r} is not a payment event; send one of {', '.join(PAYMENT_EVENTS)}")
        if not isinstance(event_id, str) or not event_id:
            raise AdminError(
                "id: give the event an id string (or an Idempotency-Key header) so a redelivery"
                " is recognised and ignored"
            )
        previous = await self.meter.store.audit_event_for(event_id)
        if previous is not None:
            return {"event": event_id, "duplicate": True, "account": previous["target"], "type": previous["action"]}
        service = self.as_actor(WEBHOOK_ACTOR)
        try:
            if kind == "payment_method.updated":
                name = _text(event, "account")
                async with service._audit(kind, name, {"event": event_id}, event_id=event_id):
                    await self.meter.set_payment(name, True, f"payment method updated (event {event_id})")
                return {
                    "event": event_id,
                    "duplicate": False,
                    "type": kind,
                    "account": name,
                    "payment_state": (await self.meter.account(name)).payment_state,
                }
            return await service._settle_charge(event, kind, event_id)
        except DuplicateEvent:  # the same event, delivered twice at once: the other delivery applied it
            return {"event": event_id, "duplicate": True, "type": kind}

    async def _settle_charge(self, event: Mapping[str, Any], kind: str, event_id: str) -> dict[str, Any]:
        key = _text(event, "charge")
        reason = str(event.get("reason") or "")
        charge = await self.meter.store.charge(key)
        if charge is None:
            raise NotFound(f"charge: no charge {key!r}; send the Idempotency-Key of the relay's charge request")
        status = "succeeded" if kind == "charge.succeeded" else "failed"
        applied = await self._set_charge(charge, kind, status, reason or kind, {"event": event_id}, event_id)
        account = await self.meter.account(charge["account"])
        return {
            "event": event_id,
            "duplicate": False,
            "type": kind,
            "account": account.name,
            "charge": key,
            "applied": applied,
            "charge_status": status if applied else charge["status"],
            "payment_state": account.payment_state,
        }

    async def _set_charge(
        self,
        charge: Row,
        action: str,
        status: str,
        reason: str,
        detail: dict[str, Any],
        event_id: str | None = None,
    ) -> bool:
        """One charge's verdict, audited on its account; `failed` blocks the account at once."""
        detail = {**detail, "charge": charge["idempotency_key"], "reason": reason}
        async with self._audit(action, charge["account"], detail, event_id=event_id):
            return await self.meter.store.set_charge_result(
                charge["idempotency_key"], status, reason, charge["attempts"], self.meter.clock()
            )

    # -- charges: what the gateway (or, with none, an external system) collects ----------

    async def charges(self, name: str, status: str | None = None) -> list[dict[str, Any]]:
        """The account's charges, oldest first; only those in `status` when given."""
        if status is not None and status not in CHARGE_STATES:
            raise AdminError(f"status: {status!r} is not a charge state; give one of {', '.join(CHARGE_STATES)}")
        account = await self.meter.account(name)
        return [
            charge_json(row, self.meter.currency)
            for row in await self.meter.store.charges_of(account.id)
            if status is None or row["status"] == status
        ]

    async def settle_charge(self, key: str, state: str, reason: str = "") -> dict[str, Any]:
        """Mark a charge `collected` or `failed`, as the system that collects it reports.

        For `billing.gateway.kind: none`, where the relay only records charges. Only an open
        charge (pending, submitted, recorded) changes. `failed` blocks the account's sending
        at the next MAIL or RCPT, as the payment webhook's charge.failed does; collecting
        the charge of an invoice marks the invoice paid.
        """
        if state not in ("collected", "failed"):
            raise AdminError(f"state: {state!r} is not a charge outcome; give collected or failed")
        charge = await self.meter.store.charge(key)
        if charge is None:
            raise NotFound(f"charge: no charge {key!r} (see `mailmeter charge list ACCOUNT`)")
        if charge["status"] not in OPEN_CHARGE_STATES:
            raise Conflict(
                f"charge {key!r} is already {charge['status']}; only a pending, submitted or recorded"
                " charge can be marked (a failed one is sent again after `mailmeter payment ok`)"
            )
        status = "succeeded" if state == "collected" else "failed"
        reason = reason or ("collected by the external system" if state == "collected" else "collection failed")
        if not await self._set_charge(charge, f"charge.{state}", status, reason, {}):
            raise Conflict(f"charge {key!r} changed meanwhile; look at it again (mailmeter charge list)")
        changed = await self.meter.store.charge(key)
        assert changed is not None
        account = await self.meter.account(changed["account"])
        return {
            **charge_json(changed, self.meter.currency),
            "account": account.name,
            "payment_state": account.payment_state,
        }

    # -- the queue (the running node's, through its control socket) ----------------------

    async def _ask(self, request: dict[str, Any], queue_id: str | None = None) -> Any:
        if self.queue is None:
            raise Unavailable("this service has no queue to manage")
        try:
            if queue_id is None:
                return await self.queue.ask_all(request)
            if not queue_id or len(queue_id) > 64 or not queue_id.isalnum() or not queue_id.isascii():
                raise NotFound(f"no message {queue_id!r} in the queue: a queue id is letters and digits")
            return await self.queue.ask_holder(queue_id, request)
        except RelayNotRunning as error:
            raise Unavailable(str(error)) from None
        except QueueRefused as refused:
            if refused.kind == "not_found":
                raise NotFound(str(refused)) from None
            if refused.kind == "busy":
                raise Conflict(str(refused)) from None
            if refused.kind == "failed":
                raise Unavailable(str(refused)) from None
            raise AdminError(str(refused)) from None

    async def queue_list(self, account: str | None = None) -> list[dict[str, Any]]:
        """Every message in the queue (of every process of the node), oldest first."""
        if account is not None:
            await self.meter.account(account)  # an unknown name is an error, not an empty queue
        entries = [entry for node in await self._ask({"op": "list"}) for entry in node]
        if account is not None:
            entries = [entry for entry in entries if entry["account"] == account]
        return sorted(entries, key=lambda entry: (entry["received_at"], entry["queue_id"]))

    async def upstreams(self) -> list[dict[str, Any]]:
        """Each configured smarthost's health, in the order delivery tries them (up, or down
        until when; failures; last error), as the node's processes last wrote it in the spool."""
        return [status.as_json() for status in self.queue.upstreams()] if self.queue is not None else []

    async def queue_show(self, queue_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._ask({"op": "show"}, queue_id)
        return result

    async def queue_flush(
        self, queue_id: str | None = None, account: str | None = None, everything: bool = False
    ) -> dict[str, Any]:
        """Attempt now (Postfix's `postqueue -f` / `-i`): one message, an account's, or all."""
        if sum((queue_id is not None, account is not None, everything)) != 1:
            raise AdminError("say what to flush: a queue id, an account (--account NAME) or everything (--all)")
        target = account or "queue"
        if queue_id is not None:
            target = (await self.queue_show(queue_id))["account"] or "queue"
            result: dict[str, Any] = await self._ask({"op": "flush", "queue_ids": [queue_id]}, queue_id)
        else:
            ids = None if account is None else [e["queue_id"] for e in await self.queue_list(account)]
            answers = await self._ask({"op": "flush", "queue_ids": ids})
            result = {
                "flushed": [q for answer in answers for q in answer["flushed"]],
                "skipped": [s for answer in answers for s in answer["skipped"] if s["reason"] != "not in the queue"],
            }
        await self._queue_audit("queue.flush", target, None, None, {"queue_id": queue_id, **result})
        return result

    async def queue_hold(self, queue_id: str, held: bool = True) -> dict[str, Any]:
        """Hold a message (not attempted until released) or release it (attempted at once)."""
        before = await self.queue_show(queue_id)
        after: dict[str, Any] = await self._ask({"op": "hold" if held else "release"}, queue_id)
        await self._queue_audit(
            "queue.hold" if held else "queue.release",
            after["account"] or "queue",
            before,
            after,
            {"queue_id": queue_id},
        )
        return after

    async def queue_delete(self, queue_id: str) -> dict[str, Any]:
        """Delete a message: each recipient still pending gets the final result "deleted by
        operator" (a Soft Bounce, sub-type deleted_by_operator), so the books still balance."""
        before = await self.queue_show(queue_id)
        after: dict[str, Any] = await self._ask({"op": "delete"}, queue_id)
        deleted = [r["address"] for r in after["recipients"] if r["status"] == "deleted"]
        await self._queue_audit(
            "queue.delete", after["account"] or "queue", before, after, {"queue_id": queue_id, "recipients": deleted}
        )
        return after

    async def _queue_audit(
        self, action: str, target: str, before: object, after: object, detail: dict[str, Any]
    ) -> None:
        audit_id = await self.meter.store.add_audit_event(
            self.meter.clock(), self.actor, action, target, before, after, detail
        )
        structlog.get_logger("mailmeter.audit").info(
            "admin.change",
            actor=self.actor,
            action=action,
            target=target,
            queue_id=detail.get("queue_id"),
            audit_id=audit_id,
            result="ok",
        )

    # -- invoices -----------------------------------------------------------------------

    async def invoices(self, name: str) -> list[dict[str, Any]]:
        account = await self.meter.account(name)
        summaries = []
        for record in await self.meter.store.invoices(account.id):
            body = json.loads(record.body)
            currency = self._issued_in(body)
            summaries.append(
                {
                    "id": record.id,
                    "period": body["period"],
                    "invoice_date": record.invoice_date,
                    "due_date": record.due_date,
                    "currency": currency.code,
                    "total": format_money(record.total, currency),
                    "amount_due": format_money(record.amount_due, currency),
                    "status": record.status,
                }
            )
        return summaries

    def _issued_in(self, body: Mapping[str, Any]) -> Currency:
        """The currency an invoice was issued in (its body says), else the billing currency."""
        try:
            return currency_for(str(body.get("currency", "")))
        except ValueError:
            return self.meter.currency

    async def invoice(self, invoice_id: str) -> dict[str, Any]:
        for record in await self.meter.store.invoices():
            if record.id == invoice_id:
                body: dict[str, Any] = json.loads(record.body)
                body["id"] = record.id
                body["status"] = record.status
                return body
        raise NotFound(f"no invoice {invoice_id!r} (see `mailmeter invoice list ACCOUNT`)")

    async def export_csv(self, month: str) -> str:
        """Every figure of the invoices of periods starting in `month` (YYYY-MM, plan's zone), as
        CSV that reconciles alone (metering/export.py)."""
        try:
            datetime.strptime(month, "%Y-%m")
        except ValueError:
            raise AdminError(f"period {month!r}: write it as YYYY-MM, like 2026-04") from None
        return export_csv(record for record in await self.meter.store.invoices() if month_of(record) == month)

    async def run_billing(self) -> dict[str, Any]:
        run = await self.billing.run_once()
        result = {
            "invoices": run.invoices,
            "charges_collected": run.charges_collected,
            "charges_failed": run.charges_failed,
            "charges_recorded": run.charges_recorded,
            "statements": run.statements,
        }
        # Many accounts and transactions: one event for the run, after it (target "billing").
        audit_id = await self.meter.store.add_audit_event(
            self.meter.clock(), self.actor, "billing.run", "billing", None, result, {}
        )
        structlog.get_logger("mailmeter.audit").info(
            "admin.change",
            actor=self.actor,
            action="billing.run",
            target="billing",
            audit_id=audit_id,
            changed=[],
            result="ok",
        )
        return result

    # -- events: the account's webhook, its outbox and delivery log ------------------------

    async def set_webhook(
        self, name: str, url: str, kinds: list[str] | None = None, secret: str | None = None
    ) -> dict[str, Any]:
        """Set the account's webhook (replacing any): its events from now on are POSTed to
        `url`, signed with `secret` (a new random one when not given, shown only in this answer)."""
        kinds = list(EVENT_KINDS) if not kinds else [kind.strip() for kind in kinds if kind.strip()]
        problem = check_webhook(url, kinds)
        if problem is not None:
            raise AdminError(problem)
        if secret is not None and (len(secret) < 16 or any(ch.isspace() for ch in secret)):
            raise AdminError("secret: at least 16 characters without spaces (or leave it out to get a random one)")
        chosen = secret or "whsec_" + secrets.token_urlsafe(32)
        await self.meter.account(name)
        events = tuple(kind for kind in EVENT_KINDS if kind in kinds)
        async with self._audit("webhook.set", name, {"url": url, "events": list(events)}):
            if not await self.meter.store.set_webhook(name, url, chosen, events, self.meter.clock()):
                raise NotFound(f"no account named {name!r} (see `mailmeter account list`)")
        return {"account": name, "url": url, "events": list(events), "secret": chosen}

    async def remove_webhook(self, name: str) -> dict[str, Any]:
        await self.meter.account(name)
        async with self._audit("webhook.remove", name):
            if not await self.meter.store.remove_webhook(name):
                raise NotFound(f"account {name!r} has no webhook (set one with `mailmeter account webhook`)")
        return {"account": name, "webhook": None}

    async def webhook(self, name: str) -> dict[str, Any] | None:
        """The account's webhook without its secret, or None."""
        hook = await self.meter.store.webhook_of((await self.meter.account(name)).id)
        if hook is None:
            return None
        return {"url": hook.url, "events": list(hook.events), "created_at": hook.created_at}

    async def events(self, name: str, limit: int = 100) -> list[dict[str, Any]]:
        """The account's latest events, newest first, each with its delivery log."""
        return [outbox_event_json(event) for event in await self.event_records(name, limit)]

    async def event_records(self, name: str, limit: int = 100) -> list[EventRecord]:
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
            raise AdminError("limit: give a number of events from 1 to 1000")
        return await self.meter.store.events_of((await self.meter.account(name)).id, limit)

    # -- the suppression list -------------------------------------------------------------

    async def suppression_records(self, name: str) -> list[Suppression]:
        return await self.meter.store.suppressions((await self.meter.account(name)).id)

    async def suppressions(self, name: str) -> list[dict[str, Any]]:
        """The recipients the account's mail is refused for at RCPT (550 5.1.1), by address."""
        return [suppression_json(entry) for entry in await self.suppression_records(name)]

    async def remove_suppression(self, name: str, address: str) -> dict[str, Any]:
        """Take a recipient off the account's list: the next RCPT to it is accepted (and billed)."""
        address = address.strip().removeprefix("<").removesuffix(">").lower()
        if "@" not in address or len(address) > 320:
            raise AdminError(f"address: {address!r} is not an email address")
        account = await self.meter.account(name)
        if await self.meter.store.suppression(account.id, address) is None:
            raise NotFound(f"{address} is not on the suppression list of {name!r} (see `mailmeter suppression list`)")
        async with self._audit("suppression.remove", name, {"address": address}):
            await self.meter.store.remove_suppression(name, address)
        return {"account": name, "address": address, "suppressed": False}

    # -- the account's own API token ------------------------------------------------------

    async def account_token(self, name: str) -> dict[str, Any]:
        """A new API token for the account (its old one stops working): shown once, kept as a SHA-256."""
        await self.meter.account(name)
        token = ACCOUNT_TOKEN_PREFIX + secrets.token_urlsafe(32)
        async with self._audit("account.token", name):
            if not await self.meter.store.set_account_token(name, token_hash(token), self.meter.clock()):
                raise NotFound(f"no account named {name!r} (see `mailmeter account list`)")
        return {"account": name, "token": token}

    async def verify_account_token(self, token: str) -> Account | None:
        """The account whose API token this is, or None (the token is looked up by its SHA-256)."""
        if not token.startswith(ACCOUNT_TOKEN_PREFIX) or text_problem(token) is not None:
            return None
        account_id = await self.meter.store.account_id_for_token(token_hash(token))
        return None if account_id is None else await self.meter.store.get_account_by_id(account_id)

    # -- the audit trail ------------------------------------------------------------------

    async def audit(self, account: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """The newest `limit` admin changes, newest first; only one account's when given."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
            raise AdminError("limit: give a number of events from 1 to 1000")
        if account is not None:
            await self.meter.account(account)
        return [event_json(row) for row in await self.meter.store.audit_events(account, limit)]

    # -- plans ------------------------------------------------------------------------

    def plans(self) -> list[dict[str, Any]]:
        """The plans the config defines: the parts an operator picks a plan by."""
        return [
            {
                "name": name,
                "display_name": plan.title,
                "period": {"kind": plan.period.kind, "timezone": plan.period.timezone},
                "billable": plan.billable,
                "currency": plan.currency.code,
                "plan_fee": format_money(plan.plan_fee, plan.currency),
                "included_emails": plan.included_emails,
                "email_quota": plan.email_quota,
                "spending_limit": (
                    None if plan.spending_limit is None else format_money(plan.spending_limit, plan.currency)
                ),
                "in_period_charge": (
                    None
                    if plan.in_period_charge is None
                    else "threshold"
                    if isinstance(plan.in_period_charge, ThresholdCharge)
                    else "per_block"
                ),
                "rank": plan.rank,
                "sending_rate": None if plan.sending_rate is None else str(plan.sending_rate),
                "funding": {
                    "kind": plan.funding.kind,
                    "net_days": plan.funding.net_days,
                    "overdraft_allowance": (
                        None
                        if plan.funding.overdraft_allowance is None
                        else format_money(plan.funding.overdraft_allowance, plan.currency)
                    ),
                    "monthly_payment": format_money(plan.funding.monthly_payment, plan.currency),
                },
            }
            for name, plan in sorted(self.meter.plans.items())
        ]

    def _plan(self, name: str) -> Plan:
        plan = self.meter.plans.get(name)
        if plan is None:
            raise NotFound(f"plan {name!r} is not defined (known: {', '.join(sorted(self.meter.plans))})")
        return plan

    def preview(
        self,
        plan_name: str,
        emails: int,
        start: date | None = None,
        delivered: int | None = None,
        soft_bounced: int = 0,
        invalid: int = 0,
        balance: str | None = None,
        events: Sequence[Mapping[str, Any]] = (),
    ) -> dict[str, Any]:
        """One simulated period of a plan, from a prepaid `balance`, following `events`
        (each {"at": N, "type": ...}; see preview_events)."""
        plan = self._plan(plan_name)
        if emails < 0 or soft_bounced < 0 or invalid < 0 or (delivered is not None and delivered < 0):
            raise AdminError("counts must not be negative")
        if max(emails, soft_bounced, invalid, delivered or 0) > MAX_EMAILS:
            raise AdminError(f"emails: at most {MAX_EMAILS:,} emails in a preview")
        micros = 0 if balance is None else _money(balance, "balance", plan.currency)
        if micros < 0:
            raise AdminError("balance: the starting balance must not be negative")
        script = self.preview_events(events)
        begin = datetime.combine(start or datetime.now(timezone.utc).date(), time(0), tzinfo=plan.period.zone())
        try:
            result = preview(
                plan,
                emails,
                begin,
                standing=Standing(prepaid_balance=micros),
                delivered=delivered,
                soft_bounced=soft_bounced,
                invalid=invalid,
                events=script,
            )
        except ValueError as error:
            raise AdminError(str(error)) from None
        invoice = result.invoice
        currency = plan.currency
        return {
            "plan": plan_name,
            "currency": currency.code,
            "period": result.period_label,
            "period_start": result.period.start.isoformat(),
            "period_end": result.period.end.isoformat(),
            "emails": emails,
            "balance": format_money(micros, currency),
            "accepted": result.accepted,
            "refused": result.refused,
            "refusal": result.refusal.value if result.refusal else None,
            "first_refused_at": result.first_refused_at.isoformat() if result.first_refused_at else None,
            "refusals": [
                {
                    "first": run.first,
                    "last": run.last,
                    "emails": run.emails,
                    "reason": run.reason.value,
                    "at": run.at.isoformat(),
                }
                for run in result.refusals
            ],
            "events": [
                {
                    **dict(source),
                    "time": applied.at.isoformat(),
                    **({} if applied.switch is None else switch_json(applied.switch)),
                }
                for source, applied in zip(sorted(events, key=lambda e: e["at"]), result.events)
            ],
            "charges": [
                {
                    "key": timed.charge.key,
                    "at": timed.at.isoformat() if timed.at else None,
                    "amount": format_money(timed.charge.amount, currency),
                    "emails_unlocked": timed.charge.emails_unlocked,
                    "trigger_email": timed.charge.trigger_email,
                    "description": timed.charge.description,
                }
                for timed in result.charges
            ],
            "plan_at_end": result.plan,
            "plan_change": None
            if result.pending is None
            else {"plan": result.pending.plan, "effective": result.pending.effective.isoformat()},
            "invoice": {
                "invoice_date": invoice.invoice_date.isoformat(),
                "due_date": invoice.due_date.isoformat(),
                "lines": [
                    {
                        "kind": line.kind,
                        "description": line.description,
                        "quantity": line.quantity,
                        "amount": format_money(line.amount, currency),
                    }
                    for line in invoice.lines
                ],
                "total": format_money(invoice.total, currency),
                "prepaid_applied": format_money(invoice.prepaid_applied, currency),
                "amount_due": format_money(invoice.amount_due, currency),
                "prepaid_balance_after": (
                    None
                    if invoice.prepaid_balance_after is None
                    else format_money(invoice.prepaid_balance_after, currency)
                ),
            },
        }

    def preview_events(self, events: Sequence[Mapping[str, Any]]) -> list[ScriptEvent]:
        """A preview's script from JSON-like events, each {"at": N, "type": T, ...}:

        limit: "which" included | quota with "emails": N, or spending with "amount": "20.00" | null;
        plan: "plan": NAME; top_up: "amount": "25.00"; payment: "state": failed | ok.
        """
        if not isinstance(events, Sequence) or isinstance(events, str):
            raise AdminError('events: give a list of events like {"at": 1000, "type": "payment", "state": "failed"}')
        script: list[ScriptEvent] = []
        for number, event in enumerate(events):
            where = f"events[{number}]"
            if not isinstance(event, Mapping):
                raise AdminError(f'{where}: give an object like {{"at": 1000, "type": "top_up", "amount": "25.00"}}')
            kind = event.get("type")
            fields = {"at", "type", *EVENT_FIELDS.get(str(kind), ())}
            unknown = sorted(set(event) - fields)
            if kind not in EVENT_FIELDS:
                raise AdminError(f"{where}.type: {kind!r} is not an event; choose {', '.join(EVENT_FIELDS)}")
            if unknown:
                raise AdminError(
                    f"{where}.{unknown[0]}: unknown field; a {kind} event takes {', '.join(EVENT_FIELDS[kind])}"
                )
            at = event.get("at")
            if isinstance(at, bool) or not isinstance(at, int) or at < 0:
                raise AdminError(f"{where}.at: give the number of emails attempted before it, like 1000")
            script.append(self._script_event(where, at, kind, event))
        return script

    def _script_event(self, where: str, at: int, kind: str, event: Mapping[str, Any]) -> ScriptEvent:
        if kind == "limit":
            which = event.get("which")
            if which == "spending":
                amount = event.get("amount")
                if amount is not None and not isinstance(amount, str):
                    raise AdminError(
                        f'{where}.amount: write the spending limit as a decimal string like "20.00", or null for none'
                    )
                micros = (
                    None if amount in (None, "none") else _money(str(amount), f"{where}.amount", self.meter.currency)
                )
                return ScriptEvent(at, "limit", limit="spending", value=micros)
            if which not in ("included", "quota"):
                raise AdminError(f"{where}.which: choose included, quota or spending")
            return ScriptEvent(at, "limit", limit=which, value=_emails(event.get("emails"), f"{where}.emails"))
        if kind == "plan":
            name = event.get("plan")
            if not isinstance(name, str) or name not in self.meter.plans:
                raise AdminError(
                    f"{where}.plan: {name!r} is not a plan the config defines"
                    f" (known: {', '.join(sorted(self.meter.plans))})"
                )
            return ScriptEvent(at, "plan", plan=self.meter.plans[name])
        if kind == "top_up":
            amount = event.get("amount")
            if not isinstance(amount, str):
                raise AdminError(f'{where}.amount: write the top-up as a decimal string like "25.00"')
            return ScriptEvent(at, "top_up", value=_money(amount, f"{where}.amount", self.meter.currency))
        state = event.get("state")
        if state not in ("failed", "ok"):
            raise AdminError(f"{where}.state: give failed (sending blocked) or ok (released)")
        return ScriptEvent(at, "payment", ok=state == "ok")


@dataclass
class AccountService:
    """The account holder's own actions, bound to one account (the one its token or session
    names): nothing here takes another account's name, so none can reach another's data."""

    admin: AdminService
    name: str

    async def usage(self) -> dict[str, Any]:
        """The same figures as `mailmeter usage NAME --json`."""
        return await self.admin.usage(self.name)

    async def invoices(self) -> list[dict[str, Any]]:
        return await self.admin.invoices(self.name)

    async def invoice(self, invoice_id: str) -> dict[str, Any]:
        """One of the account's invoices (another account's is not found)."""
        if invoice_id not in {summary["id"] for summary in await self.invoices()}:
            raise NotFound(f"no invoice {invoice_id!r} of account {self.name!r}")
        return await self.admin.invoice(invoice_id)

    async def events(self, limit: int = 100) -> list[dict[str, Any]]:
        return await self.admin.events(self.name, limit)

    async def event_records(self, limit: int = 100) -> list[EventRecord]:
        return await self.admin.event_records(self.name, limit)

    async def webhook(self) -> dict[str, Any] | None:
        return await self.admin.webhook(self.name)

    async def suppressions(self) -> list[dict[str, Any]]:
        return await self.admin.suppressions(self.name)

    async def suppression_records(self) -> list[Suppression]:
        return await self.admin.suppression_records(self.name)

    async def remove_suppression(self, address: str) -> dict[str, Any]:
        return await self.admin.remove_suppression(self.name, address)


EVENT_FIELDS: dict[str, tuple[str, ...]] = {
    "limit": ("which", "emails", "amount"),
    "plan": ("plan",),
    "top_up": ("amount",),
    "payment": ("state",),
}


def switch_json(switch: PlanSwitch) -> dict[str, Any]:
    """What a plan change request did, as the CLI, the API and a preview show it."""
    return {
        "change": switch.kind,
        "at_once": switch.at_once,
        "effective": switch.effective.isoformat(),
        "reason": switch.reason,
    }


__all__ = [
    "ACCOUNT_TOKEN_PREFIX",
    "AccountService",
    "AdminError",
    "AdminService",
    "Conflict",
    "NotFound",
    "Unavailable",
    "UnknownAccount",
    "token_hash",
]
