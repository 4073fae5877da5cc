"""The meter's narrow async interface: reserve, commit, release, record a result, read usage.

The meter finds the account's plan and current period, then lets the store run
the pure policy decisions inside one atomic transaction: `admit` at reserve,
`charges_due` and `usage_alerts_due` at commit. Any store failure is raised as
StoreUnavailable so the relay can fail closed with a 451.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime, time, timezone
from time import monotonic
from typing import Any, cast

from mailmeter.metering.batching import Batcher
from mailmeter.metering.bindings import Bindings
from mailmeter.metering.leases import LeaseBook, LeaseSettings
from mailmeter.metering.passwords import DUMMY_HASH, hash_password, verify_password
from mailmeter.metering.records import (
    SUPPRESSED,
    Account,
    AccountEdit,
    AccountUpdate,
    Grant,
    RecipientSuppressed,
    Result,
    ResultReport,
    Settlement,
    StoreUnavailable,
    in_force,
    payment_changes_to_json,
)
from mailmeter.metering.store import InlineSpoolStore, LeasingStore, ResultBatchStore, Store
from mailmeter.policies import (
    Admission,
    Plan,
    PlanSwitch,
    Refusal,
    Standing,
    Usage,
    admit,
    admit_lease,
    blocking_refusal,
    change_limit,
    charges_due,
    headroom,
    switch_plan,
    unbilled,
    usage_alerts_due,
    usage_screen,
)
from mailmeter.policies.changes import LimitName
from mailmeter.policies.currency import USD, Currency
from mailmeter.policies.money import format_money, is_whole_minor
from mailmeter.policies.periods import Period, PeriodSpec, next_period, period_containing, period_label
from mailmeter.policies.prepaid import PaymentChange, monthly_credit, monthly_payment, unsettled_usage, with_change
from mailmeter.policies.rate import PLAN_RATE, SendRate, check_account_rate, rate_in_force
from mailmeter.policies.results import classify, classify_failure

Clock = Callable[[], datetime]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
NETWORKS_TTL = 2.0
RATES_TTL = 2.0  # with leasing: a rate set on an account applies on every node within this (docs/several-nodes.md)


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class UnknownAccount(LookupError):
    pass


class UnknownPlan(LookupError):
    pass


# The largest amount (micros) the meter takes or lets a balance reach: a billion units,
# far below the 64-bit integers of SQLite and PostgreSQL (SQLite would turn an overflowing
# sum into a float, PostgreSQL refuse it), so no sum of amounts the meter keeps overflows.
MAX_MONEY = 1_000_000_000 * 1_000_000


class BalanceTooLarge(ValueError):
    """A top-up that would take a prepaid balance past MAX_MONEY."""


class AccountDeleted(ValueError):
    """The account was deleted (`account delete`): it is kept for its records, never changed."""


class WideNetwork(ValueError):
    """A client network binding wider than WIDEST_PREFIX, without the operator saying so."""

    def __init__(self, network: IPNetwork, widest: int) -> None:
        super().__init__(f"network {network} is wider than a /{widest}")
        self.network = network
        self.widest = widest


# A bound network sends without AUTH, billed to its account: wider than this it is most
# likely a mistake that opens the relay (0.0.0.0/0, ::/0, a typo'd prefix length).
WIDEST_PREFIX = {4: 16, 6: 48}


def too_wide(network: IPNetwork) -> int | None:
    """The widest prefix allowed for `network`'s family if `network` is wider, else None.
    Loopback networks (only this host) are never too wide; an IPv4-mapped IPv6 network
    (::ffff:0:0/96 is all of IPv4) is judged as the IPv4 network it maps."""
    if network.is_loopback:
        return None
    mapped = ipaddress.IPv6Network("::ffff:0:0/96")
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(mapped):
        return WIDEST_PREFIX[4] if network.prefixlen - 96 < WIDEST_PREFIX[4] else None
    widest = WIDEST_PREFIX[network.version]
    return widest if network.prefixlen < widest else None


def standing_of(account: Account, period: Period, plan: Plan | None = None) -> Standing:
    """The account facts for decisions in `period`, with limit changes resolved for it (and
    a plan change due by its start in force, which drops the account's own limits).

    With the account's `plan`, a prepaid balance is what `period` may spend (policies'
    Standing.prepaid_balance): the stored balance, plus the monthly credits of the
    periods up to this one that are due but not recorded yet (the billing job records
    them a moment after a period starts), minus what the usage of ended periods not
    invoiced yet will still take from it. So the balance is exact from the first
    instant of a period, whenever the billing job runs.
    """
    account = in_force(account, period.start)
    standing = Standing(
        payment_ok=account.payment_ok,
        suspended=account.suspended,
        prepaid_balance=account.prepaid_balance,
        outstanding_debt=account.outstanding_debt,
        included_emails_override=account.included_change.value_during(period) if account.included_change else None,
        email_quota_override=account.quota_change.value_during(period) if account.quota_change else None,
        spending_limit_override=account.spending_limit_override,
    )
    if plan is None or plan.funding.kind != "prepaid":
        return standing
    balance = account.prepaid_balance + _credits_not_recorded(account, plan, period)
    for key, usage in account.open_periods:
        if key < period.key:
            ended = period_containing(plan.period, datetime.fromisoformat(key), account.subscribed_on)
            balance -= unsettled_usage(plan, standing_of(account, ended), usage)
    return replace(standing, prepaid_balance=balance)


def first_period(account: Account, plan: Plan) -> Period:
    """The account's first billing period: the one its subscription day is in."""
    start = datetime.combine(account.subscribed_on, time(12), tzinfo=plan.period.zone())
    return period_containing(plan.period, start, account.subscribed_on)


def first_credited_period(account: Account, plan: Plan) -> Period:
    """The first period with a monthly credit: the first one the account exists in (an account
    added with an earlier subscription day is not charged for the months before it)."""
    first = first_period(account, plan)
    if account.created_at is None or first.contains(account.created_at) or account.created_at < first.start:
        return first
    return period_containing(plan.period, account.created_at, account.subscribed_on)


def _after(account: Account, plan: Plan, key: str | None, first: Period) -> Period:
    """The period after the one whose key is `key`; `first` when there is none."""
    if key is None:
        return first
    anchor = account.subscribed_on
    return next_period(plan.period, period_containing(plan.period, datetime.fromisoformat(key), anchor), anchor)


def _credits_not_recorded(account: Account, plan: Plan, period: Period) -> int:
    """The monthly credits of the periods up to `period` that are due but not recorded yet."""
    if account.credited_through is not None and account.credited_through >= period.key:
        return 0
    due = 0
    credit = _after(account, plan, account.credited_through, first_credited_period(account, plan))
    while credit.start <= period.start:
        due += monthly_payment(plan, account.monthly_payments, credit)
        credit = next_period(plan.period, credit, account.subscribed_on)
    return due


def result_category(verdict: Result | str, code: int | None, enhanced: str | None) -> tuple[Result, str]:
    """The billing category and sub-type of a delivery verdict (deferred stays deferred,
    with the sub-type its reply would have if it never clears; deleted, by the operator,
    is a Soft Bounce of sub-type deleted_by_operator)."""
    classified = classify(str(verdict), code, enhanced)
    if classified is None:
        return Result.DEFERRED, classify_failure(code, enhanced, permanent=False).reason
    return Result(classified.category), classified.reason


def subscribed_at(account: Account) -> datetime:
    return datetime.combine(account.subscribed_on, time(0), tzinfo=timezone.utc)


@dataclass(frozen=True)
class UsageReport:
    account: Account
    plan: Plan
    period: Period
    usage: Usage
    deferred: int
    remaining: int | None
    standing: Standing
    breakdown: list[tuple[str, str, int]]
    bounce_rows: list[tuple[str, str, int]] = field(default_factory=list)  # (category, sub-type, emails)

    def as_json(self) -> dict[str, Any]:
        screen = usage_screen(self.plan, self.standing, self.usage, self.period)
        currency = self.plan.currency
        by_campaign: dict[str, int] = {}
        by_region: dict[str, int] = {}
        for campaign, region, accepted in self.breakdown:
            by_campaign[campaign or "(untagged)"] = by_campaign.get(campaign or "(untagged)", 0) + accepted
            by_region[region or "(unknown)"] = by_region.get(region or "(unknown)", 0) + accepted
        bounce_types: dict[str, dict[str, int]] = {"soft_bounced": {}, "hard_bounced": {}}
        for category, reason, emails in self.bounce_rows:
            bounce_types[category][reason or "unclassified"] = emails
        return {
            "account": self.account.name,
            "plan": self.account.plan,
            "plan_display_name": screen.plan,
            "period": screen.period,
            "period_start": self.period.start.isoformat(),
            "period_end": self.period.end.isoformat(),
            "accepted": self.usage.accepted,
            "delivered": self.usage.delivered,
            "soft_bounced": self.usage.soft_bounced,
            "hard_bounced": self.usage.hard_bounced,
            "bounce_types": bounce_types,
            "deferred": self.deferred,
            "reserved": self.usage.reserved,
            "remaining": self.remaining,
            "included_emails": screen.included_emails,
            "extra_emails": screen.extra_emails,
            "emails_sent": screen.emails_sent,
            "total_allowed": screen.total_allowed,
            "currency": currency.code,
            "spent": format_money(screen.spent, currency),
            "spending_limit": None if screen.spending_limit is None else format_money(screen.spending_limit, currency),
            "emails_remaining_before_next_charge": screen.remaining,
            "dashboard": list(screen.rows()),
            "unbilled": format_money(unbilled(self.plan, self.standing, self.usage), currency),
            "prepaid_balance": format_money(self.account.prepaid_balance, currency),
            "prepaid": self._prepaid(screen.spent),
            "overdrawn": format_money(self.account.outstanding_debt, currency),
            "payment_state": self.account.payment_state,
            "by_campaign": by_campaign,
            "by_region": by_region,
        }

    def _prepaid(self, spent: int) -> dict[str, Any] | None:
        """A prepaid plan's balance in this period: what it may spend, has spent, has left, and
        the monthly payment credited at this period's start and at the next one's."""
        if self.plan.funding.kind != "prepaid":
            return None
        following = next_period(self.plan.period, self.period, self.account.subscribed_on)
        changes = self.account.monthly_payments
        return {
            "available": format_money(self.standing.prepaid_balance, self.plan.currency),
            "spent": format_money(spent, self.plan.currency),
            "remaining": format_money(self.standing.prepaid_balance - spent, self.plan.currency),
            "monthly_payment": format_money(monthly_payment(self.plan, changes, self.period), self.plan.currency),
            "next_monthly_payment": format_money(monthly_payment(self.plan, changes, following), self.plan.currency),
            "next_credit_at": following.start.isoformat(),
        }


class Meter:
    def __init__(
        self,
        store: Store,
        plans: Mapping[str, Plan],
        node: str,
        clock: Clock = utc_now,
        region: str = "",
        leasing: LeaseSettings | None = None,
    ) -> None:
        """`leasing`: borrow blocks of each account's allowance and answer reserves from them
        (metering/leases.py); only for a store that supports leases (PostgreSQL)."""
        self.store = store
        self.plans = dict(plans)  # all in one currency (see `currency`)
        self.node = node
        self.region = region
        self.clock = clock
        self._networks: tuple[float, Bindings, int] | None = None  # (read at, bindings, their version)
        self._identities: dict[str, Account] = {}
        self._rates: dict[int, tuple[float, bool]] = {}  # account id -> (monotonic expiry, has a rate)
        self._periods: dict[tuple[PeriodSpec, date | None], Period] = {}
        self.leases: LeaseBook | None = None
        self._results: Batcher[ResultReport, bool | None] | None = None
        if hasattr(store, "record_message_results"):
            self._results = Batcher(self._record_results)
        if leasing is not None and leasing.emails > 0:
            if not hasattr(store, "commit_leased"):
                raise ValueError("allowance leasing needs the PostgreSQL store (database.url)")
            self.leases = LeaseBook(cast(LeasingStore, store), node, leasing, clock, region)

    @property
    def currency(self) -> Currency:
        """The billing currency: every plan's (`billing.currency`); USD when there are none."""
        currencies = {plan.currency for plan in self.plans.values()}
        if len(currencies) > 1:
            raise ValueError(
                f"plans in several currencies ({', '.join(sorted(c.code for c in currencies))});"
                " one billing.currency applies to every plan"
            )
        return currencies.pop() if currencies else USD

    # -- accounts -----------------------------------------------------------

    def plan_of(self, account: Account, period: Period | None = None) -> Plan:
        """The account's plan; in `period` when given (a plan change due by its start is in force)."""
        if period is not None:
            account = in_force(account, period.start)
        plan = self.plans.get(account.plan)
        if plan is None:
            raise UnknownPlan(f"account {account.name!r} is on plan {account.plan!r}, which the config does not define")
        return plan

    def terms(self, account: Account, period: Period) -> tuple[Plan, Standing]:
        """The plan and the standing that decide for the account in `period`."""
        plan = self.plan_of(account, period)
        return plan, standing_of(account, period, plan)

    def period_of(self, account: Account, at: datetime | None = None) -> Period:
        return self._period(self.plan_of(account).period, at or self.clock(), account.subscribed_on)

    def _period(self, spec: PeriodSpec, at: datetime, anchor: date) -> Period:
        """period_containing, remembering the last answer per plan period and anchor.

        Every message asks four times (MAIL, reserve, commit, result) and the answer
        changes once a month. Also called from the store's thread (settle, result
        keys): an entry is replaced whole, so a race only computes a period twice.
        """
        key = (spec, None if spec.kind == "calendar_month" else anchor)
        known = self._periods.get(key)
        if known is not None and known.start <= at < known.end:
            return known
        period = period_containing(spec, at, anchor)
        self._periods[key] = period
        return period

    async def add_account(
        self,
        name: str,
        password: str | None,
        plan: str,
        domains: list[str],
        networks: list[str],
        subscribed_on: date | None = None,
        contacts: list[str] | None = None,
        allow_wide_networks: bool = False,
        monthly_payment: int | None = None,
    ) -> Account:
        """Add an account; a prepaid plan's first monthly credit is recorded at once.

        Raises WideNetwork for a network wider than WIDEST_PREFIX unless `allow_wide_networks`.
        `monthly_payment`: micros the account pays each period instead of the plan's
        amount, from its first period on (prepaid plans only).
        """
        if plan not in self.plans:
            raise UnknownPlan(f"plan {plan!r} is not defined in the config (known: {', '.join(sorted(self.plans))})")
        if not name or any(ch.isspace() or ch == "/" for ch in name):
            raise ValueError("account name must be non-empty and contain no spaces or '/'")
        stored_networks = self._networks_checked(networks, allow_wide_networks)
        for domain in domains:
            if not domain.isascii():  # str.lower() would make the Kelvin sign a "k"
                raise ValueError(f"sender domain {domain!r}: give it in ASCII (an IDN as its xn-- A-label)")
        for contact in contacts or []:
            if "@" not in contact or any(ch.isspace() for ch in contact):
                raise ValueError(f"contact {contact!r} is not an email address")
        now = self.clock()
        changes: tuple[PaymentChange, ...] = ()
        if monthly_payment is not None:
            self._check_monthly_payment(name, plan, monthly_payment)
            first = first_credited_period(
                Account(0, name, plan, subscribed_on or now.date(), True, False, 0, created_at=now), self.plans[plan]
            )
            changes = (PaymentChange(first.start, monthly_payment),)
        password_hash = await asyncio.to_thread(hash_password, password) if password else None
        await self.store.add_account(
            name,
            password_hash,
            plan,
            subscribed_on or now.date(),
            [d.lower().rstrip(".") for d in domains],
            stored_networks,
            now,
            contacts or [],
            payment_changes_to_json(changes),
        )
        return await self.record_monthly_credits(await self.account(name))

    def _networks_checked(self, networks: Sequence[str], allow_wide: bool) -> list[str]:
        """The networks as stored (canonical); WideNetwork for one wider than WIDEST_PREFIX unless `allow_wide`."""
        canonical = []
        for network in networks:
            parsed = ipaddress.ip_network(network, strict=False)
            widest = too_wide(parsed)
            if widest is not None and not allow_wide:
                raise WideNetwork(parsed, widest)
            canonical.append(str(parsed))
        return canonical

    async def change_settings(
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
        allow_wide_networks: bool = False,
    ) -> Account:
        """Change the account's sender domains, bound networks, contacts or password, at once
        (MAIL reads the domains, AUTH the password; other processes see a network binding
        within NETWORKS_TTL). Raises ValueError naming what is wrong (a removal of what the
        account does not have, no domain or no way to authenticate left), WideNetwork,
        AccountDeleted, UnknownAccount."""
        account = await self.account(name)
        if account.deleted_at is not None:
            raise AccountDeleted(f"account {name!r} was deleted on {account.deleted_at:%Y-%m-%d}; it cannot be changed")
        for domain in add_domains:
            if not domain.isascii():
                raise ValueError(f"sender domain {domain!r}: give it in ASCII (an IDN as its xn-- A-label)")
        adding_domains = [d.lower().rstrip(".") for d in add_domains]
        removing_domains = [d.lower().rstrip(".") for d in remove_domains]
        for domain in removing_domains:
            if domain not in account.domains:
                raise ValueError(
                    f"sender domain {domain!r} is not one of the account's ({', '.join(account.domains) or 'none'})"
                )
        adding_networks = self._networks_checked(add_networks, allow_wide_networks)
        removing_networks = [str(ipaddress.ip_network(n, strict=False)) for n in remove_networks]
        for network in removing_networks:
            if network not in account.networks:
                raise ValueError(
                    f"network {network} is not bound to the account (bound: {', '.join(account.networks) or 'none'})"
                )
        for contact in add_contacts:
            if "@" not in contact or any(ch.isspace() for ch in contact):
                raise ValueError(f"contact {contact!r} is not an email address")
        for contact in remove_contacts:
            if contact not in account.contacts:
                raise ValueError(
                    f"contact {contact!r} is not one of the account's ({', '.join(account.contacts) or 'none'})"
                )
        domains = (set(account.domains) - set(removing_domains)) | set(adding_domains)
        if not domains:
            raise ValueError("an account needs at least one sender domain: add another before removing the last")
        networks = (set(account.networks) - set(removing_networks)) | set(adding_networks)
        has_password = password is not None or (account.password_hash is not None and not clear_password)
        if not has_password and not networks:
            raise ValueError(
                "the account would have neither a password nor a bound network, so nothing could send"
                " for it: keep one of the two"
            )
        password_hash = await asyncio.to_thread(hash_password, password) if password else None
        edit = AccountEdit(
            add_domains=tuple(adding_domains),
            remove_domains=tuple(removing_domains),
            add_networks=tuple(adding_networks),
            remove_networks=tuple(removing_networks),
            add_contacts=tuple(add_contacts),
            remove_contacts=tuple(remove_contacts),
            password_hash=password_hash,
            clear_password=clear_password and password is None,
        )
        return await self._edit(name, edit)

    async def _edit(self, name: str, edit: AccountEdit) -> Account:
        if not await self.store.edit_account(name, edit):
            raise UnknownAccount(f"no account named {name!r} (see `mailmeter account list`)")
        self._networks = None  # this process sees a binding change at once
        self._identities.pop(name, None)
        return await self.account(name)

    async def set_suspended(self, name: str, suspended: bool) -> Account:
        """Suspend or resume the account's sending, live: an open session is refused (or
        released) at its next MAIL or RCPT, as with a payment block."""
        account = await self.account(name)
        if account.deleted_at is not None:
            raise AccountDeleted(
                f"account {name!r} was deleted on {account.deleted_at:%Y-%m-%d}; a deleted account stays suspended"
            )
        return await self._edit(name, AccountEdit(suspended=suspended))

    async def delete_account(self, name: str) -> Account:
        """Soft delete: the account stops sending at once (suspended, no AUTH, no network
        binding) and is kept, with its invoices and audit trail; its name is never reused."""
        account = await self.account(name)
        if account.deleted_at is not None:
            raise AccountDeleted(f"account {name!r} was already deleted on {account.deleted_at:%Y-%m-%d}")
        return await self._edit(name, AccountEdit(deleted_at=self.clock()))

    async def account(self, name: str) -> Account:
        account = await self.store.get_account(name)
        if account is None:
            raise UnknownAccount(f"no account named {name!r} (see `mailmeter account list`)")
        return account

    async def authenticate(self, name: str, password: bytes) -> Account | None:
        """Check a login off the event loop; None for a wrong name or password."""
        # A name with a NUL or another control character names no account (PostgreSQL would
        # refuse the lookup, a 454 instead of the 535 a wrong name gets); it costs the same hash.
        account = await self.store.get_account(name) if name.isprintable() else None
        stored = account.password_hash if account and account.password_hash else DUMMY_HASH
        ok = await asyncio.to_thread(verify_password, password, stored)
        if account is not None and account.deleted_at is not None:
            return None  # a deleted account never logs in (the hash was still checked: same time)
        return account if ok and account is not None and account.password_hash else None

    async def mail_check(self, name: str) -> tuple[tuple[str, ...], Refusal | None]:
        """At MAIL, with one store read: the sender domains, and why the account may not send (if so).

        The account's live state (payment, balance, limits, domains) and the period's
        counters are read together; only the period comes from the cached identity.
        """
        period = self.period_of(await self._identity(name))
        found = await self.store.account_with_usage(name, period.key)
        if found is None:
            raise UnknownAccount(f"no account named {name!r} (see `mailmeter account list`)")
        account, usage = found
        plan, standing = self.terms(account, period)
        blocked = blocking_refusal(standing)
        if blocked is not None:
            return account.domains, blocked
        room, refusal = headroom(plan, standing, usage)
        return account.domains, refusal if room == 0 else None

    async def account_for_client(self, address: str) -> str | None:
        """The name of the account bound to the client's IP network, if any (like Postfix mynetworks).

        The bindings are read at most every NETWORKS_TTL seconds (every new connection
        asks); a binding added or removed takes effect within that time. A lookup costs
        a few dictionary probes however many accounts there are (metering/bindings.py). Whether the
        account may send is MAIL's question (mail_check), asked of the store every time.
        """
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return None
        now = monotonic()
        if self._networks is None or now - self._networks[0] > NETWORKS_TTL:
            # Read whole only when their version changed: 10,000 bindings cost more to read
            # than a message's metering, every NETWORKS_TTL. Read after the version, so a
            # change between the two reads is read again next time, never missed.
            version = await self.store.networks_version()
            if self._networks is not None and self._networks[2] == version:
                bindings = self._networks[1]
            else:
                bindings = Bindings.build([(network, name) for network, name in await self.store.all_networks()])
            self._networks = (now, bindings, version)
        return self._networks[1].lookup(ip)

    # -- admin changes that take effect at the next SMTP command -----------------

    async def set_payment(self, name: str, ok: bool, detail: str = "") -> None:
        if not await self.store.set_payment(name, ok, detail, self.clock()):
            raise UnknownAccount(f"no account named {name!r} (see `mailmeter account list`)")

    async def add_balance(self, name: str, micros: int, reference: str = "") -> int:
        if micros <= 0:
            raise ValueError("the top-up amount must be positive")
        account = await self.account(name)
        if account.prepaid_balance + micros > MAX_MONEY:  # a race passes it by one top-up at most
            raise BalanceTooLarge(
                f"the balance would pass {format_money(MAX_MONEY, self.currency)}, the most the meter keeps"
            )
        return await self.store.add_balance(name, micros, "topup", reference, self.clock())

    async def repay(self, name: str) -> int:
        await self.account(name)
        return await self.store.repay(name, self.clock())

    async def set_spending_limit(self, name: str, micros: int | None) -> None:
        """Model D: the account's spending limit, at once (raising it resumes sending)."""
        if micros is not None and micros < 0:
            raise ValueError("the spending limit must not be negative")
        await self._change_limit(name, "spending", micros)

    async def set_sending_rate(self, name: str, rate: str) -> str | None:
        """The account's own sending rate: `N/second|minute|hour|day`, `unlimited` (none even if
        the plan has one) or `none` (the plan's applies); live at the next RCPT on this node (on
        every node within RATES_TTL with leasing). Raises RateError, UnknownAccount."""
        setting = check_account_rate(rate)
        stored = None if setting == PLAN_RATE else setting
        if not await self.store.set_sending_rate(name, stored):
            raise UnknownAccount(f"no account named {name!r} (see `mailmeter account list`)")
        self._rates.clear()
        return stored

    async def set_email_limit(self, name: str, which: str, emails: int) -> None:
        """Model E: an increase applies at once, a decrease when the period ends; the emails
        already sent keep their prices (the period's history keeps them)."""
        if emails < 0:
            raise ValueError("the email limit must not be negative")
        if which not in ("included", "quota"):
            raise ValueError("the email limit is included or quota")
        await self._change_limit(name, "included" if which == "included" else "quota", emails)

    async def _change_limit(self, name: str, which: LimitName, value: int | None) -> None:
        now = self.clock()
        period = self.period_of(await self.account(name), now)

        def change(account: Account, usage: Usage) -> AccountUpdate:
            plan, standing = self.terms(account, period)
            outcome = change_limit(plan, standing, usage, which, value, now, period)
            field = {"included": "included_change", "quota": "quota_change"}.get(which, "spending_limit_override")
            stored = outcome.spending if which == "spending" else outcome.change
            return AccountUpdate(fields={field: stored}, history=outcome.history)

        if await self.store.change_account(name, period.key, now, change) is None:
            raise UnknownAccount(f"no account named {name!r} (see `mailmeter account list`)")

    async def set_plan(self, name: str, plan_name: str) -> PlanSwitch:
        """Move the account to another plan: an upgrade at once, anything else when the period
        ends (policies/changes.py). Raises UnknownPlan, PlanChangeRefused, UnknownAccount."""
        new = self.plans.get(plan_name)
        if new is None:
            raise UnknownPlan(
                f"plan {plan_name!r} is not defined in the config (known: {', '.join(sorted(self.plans))})"
            )
        now = self.clock()
        period = self.period_of(await self.account(name), now)

        def change(account: Account, usage: Usage) -> AccountUpdate:
            plan, standing = self.terms(account, period)
            switch = switch_plan(plan, new, standing, usage, period, now, account.plan_change)
            if switch.kind == "unchanged":
                return AccountUpdate(outcome=switch)
            if switch.kind == "cancelled" or not switch.at_once:
                return AccountUpdate(fields={"plan_change": switch.pending}, outcome=switch)
            return AccountUpdate(
                fields={
                    "plan": new.name,
                    "plan_change": None,
                    "included_change": None,
                    "quota_change": None,
                    "spending_limit_override": None,
                },
                history=switch.history,
                outcome=switch,
            )

        update = await self.store.change_account(name, period.key, now, change)
        if update is None:
            raise UnknownAccount(f"no account named {name!r} (see `mailmeter account list`)")
        switch: PlanSwitch = update.outcome
        return switch

    # -- model B: the monthly payment is credit ---------------------------------

    def _check_monthly_payment(self, name: str, plan_name: str, micros: int) -> None:
        if micros < 0 or not is_whole_minor(micros, self.currency):
            raise ValueError(
                f"the monthly payment must be a non-negative amount in steps of {self.currency.smallest},"
                f" like {format_money(150_000_000, self.currency)} (it is charged as it is)"
            )
        if self.plans[plan_name].funding.kind != "prepaid":
            raise ValueError(
                f"account {name!r} is on plan {plan_name!r}, which is postpaid: it is invoiced for what it sends;"
                " a monthly payment is credit to a prepaid balance"
            )

    async def set_monthly_payment(self, name: str, micros: int) -> PaymentChange:
        """The account's monthly payment ("increase your payment"), from the next period's credit on.

        The current period's credit was fixed when the period started (to send more in
        it, top up the balance). Before the account's first period, from that period on.
        """
        account = await self.account(name)
        self._check_monthly_payment(name, account.plan, micros)
        plan = self.plan_of(account)
        current = self.period_of(account)
        first = first_credited_period(account, plan)
        starts = (
            first.start
            if first.start > current.start
            else next_period(plan.period, current, account.subscribed_on).start
        )
        change = PaymentChange(starts, micros)
        changes = with_change(account.monthly_payments, change)
        if not await self.store.set_monthly_payment(name, payment_changes_to_json(changes)):
            raise UnknownAccount(f"no account named {name!r} (see `mailmeter account list`)")
        return change

    async def record_monthly_credits(self, account: Account, plan: Plan | None = None) -> Account:
        """Record the monthly credits that are due (model B): each period's charge and the
        amount added to the balance, once per period (store.add_monthly_credit).

        Credits are recorded in order with the closing of periods, never past the first
        period not invoiced yet, so each invoice sees the balance its period had; until
        then the meter counts a due credit as if it were there (standing_of). Returns the
        account as it is now. `plan`: the account's, when the caller has it at hand.
        """
        plan = plan or self.plans.get(account.plan)
        if plan is None or plan.funding.kind != "prepaid":
            return account
        current = self.period_of(account)
        if account.credited_through is not None and account.credited_through >= current.key:
            return account
        anchor = account.subscribed_on
        unsettled = _after(account, plan, account.settled_through, first_period(account, plan))
        through = min(current, unsettled, key=lambda period: period.start)
        credit = _after(account, plan, account.credited_through, first_credited_period(account, plan))
        recorded = False
        while credit.start <= through.start:
            charge = monthly_credit(plan, account.monthly_payments, credit, period_label(plan.period, credit))
            await self.store.add_monthly_credit(account.id, credit.key, charge, self.clock())
            recorded = True
            credit = next_period(plan.period, credit, anchor)
        return await self.account(account.name) if recorded else account

    # -- the metering hook ----------------------------------------------------

    async def sending_refusal(self, name: str) -> Refusal | None:
        """A reason the account may not send at all right now (MAIL's answer)."""
        return (await self.mail_check(name))[1]

    async def _identity(self, name: str) -> Account:
        """The account as first read, for what never changes (id, plan, subscription day).

        A reserve only needs those to find its period; everything that does change
        (payment state, balance, limits) is read again inside the reserve transaction,
        so caching this saves a store round trip per RCPT without staling a decision.
        """
        account = self._identities.get(name)
        if account is None:
            account = await self.account(name)
            self._identities[name] = account
        return account

    async def reserve(
        self, name: str, hold_id: str | None = None, emails: int = 1, recipient: str | None = None
    ) -> Grant:
        """Hold up to `emails` more emails for one SMTP transaction, atomically.

        `recipient` (RCPT's address): on the account's suppression list, with a plan that
        suppresses, nothing is held and the grant is refused SUPPRESSED, with the entry.

        More for an existing hold go into it, in its period; a hold of another account
        raises HoldAccountMismatch (a session's account cannot change inside a transaction).
        The plan and standing are those of the account as read inside the transaction
        (a plan change is seen at once); the period comes from the cached identity: a
        plan change never changes how an account's time is cut into periods.
        """
        account = await self._identity(name)
        period = self.period_of(account)
        hold = hold_id or secrets.token_hex(12)

        def rate_for(current: Account) -> SendRate | None:
            return rate_in_force(self.plan_of(current, period).sending_rate, current.sending_rate)

        if self.leases is not None and (self.leases.owns(hold) or not await self._rated(account)):
            # Leases answer from memory; the suppression list is one look-up of its own.
            if recipient is not None and self._suppresses(account):
                entry = await self.store.suppression(account.id, recipient)
                if entry is not None:
                    return Grant(hold_id=hold, granted=0, refusal=SUPPRESSED, suppressed=entry)
            block = self.leases.settings.emails

            def decide_lease(current: Account, usage: Usage) -> Admission:
                plan, standing = self.terms(current, period)
                return admit_lease(plan, standing, usage, emails, block)

            admission = await self.leases.reserve(account.id, period.key, hold, emails, decide_lease)
            refusal = admission.refusal.value if admission.refusal else None
            return Grant(hold_id=hold, granted=admission.granted, refusal=refusal)

        def decide(current: Account, usage: Usage) -> Admission:
            plan, standing = self.terms(current, period)
            return admit(plan, standing, usage, emails)

        try:
            admission = await self.store.reserve(
                account.id,
                period.key,
                hold,
                self.node,
                emails,
                self.clock(),
                decide,
                rate=rate_for,
                recipient=recipient,
                suppress_for=self._suppresses if recipient is not None else None,
            )
        except RecipientSuppressed as suppressed:
            return Grant(hold_id=hold, granted=0, refusal=SUPPRESSED, suppressed=suppressed.entry)
        refusal = admission.refusal.value if admission.refusal else None
        return Grant(
            hold_id=hold,
            granted=admission.granted,
            refusal=refusal,
            rate=admission.rate,
            retry_after=admission.retry_after,
        )

    async def _rated(self, account: Account) -> bool:
        """Whether a sending rate may apply to the account (its plan's or its own), read at most
        every RATES_TTL seconds. With leasing, such an account is decided in the database per
        recipient instead of from a lease, so its rate is counted exactly across nodes."""
        now = monotonic()
        known = self._rates.get(account.id)
        if known is None or known[0] < now:
            current = await self.account(account.name)
            rated = rate_in_force(self.plan_of(current).sending_rate, current.sending_rate) is not None
            known = (now + RATES_TTL, rated)
            self._rates[account.id] = known
        return known[1]

    def _suppresses(self, account: Account) -> bool:
        """Whether the account's plan keeps a suppression list (`suppression:`, on by default)."""
        plan = self.plans.get(account.plan)
        return plan.suppression if plan is not None else True

    async def commit(
        self,
        hold_id: str,
        queue_id: str,
        emails: int,
        campaign: str = "",
        account: str | None = None,
        spooled: bytes | None = None,
    ) -> None:
        """The commit point: usage, queue id, and any charges and notices now due, atomically.

        `account`: the account the message is sent for (SMTP in always names it); a hold
        taken under another account is refused with HoldAccountMismatch, nothing counted.
        `spooled`: the message, kept in the same transaction for this node's delivery
        (the inline spool; only when `inline_spool` is true).
        """
        plans = self.plans
        account_id = (await self._identity(account)).id if account is not None else None

        def settle(account: Account, usage: Usage, last_seq: int, period_key: str) -> Settlement:
            # The hold's period, not the clock's: a transaction may straddle a period boundary.
            spec = plans[account.plan].period  # every plan an account changes between cuts periods alike
            period = self._period(spec, datetime.fromisoformat(period_key), account.subscribed_on)
            plan, standing = self.terms(account, period)
            charges = charges_due(plan, standing, usage, after_index=last_seq)
            notices = [
                (
                    alert.key,
                    json.dumps(
                        {"kind": "usage_alert", "percent": alert.percent, "limit": alert.limit, "sent": usage.accepted}
                    ),
                )
                for alert in usage_alerts_due(plan, standing, usage)
            ]
            return Settlement(charges=charges, notices=notices)

        if self.leases is not None and self.leases.owns(hold_id):
            if spooled is not None:
                raise ValueError("the inline spool needs the SQLite store, which leases nothing")
            await self.leases.commit(hold_id, queue_id, emails, campaign, settle, account_id=account_id)
            return
        await self.store.commit(
            hold_id,
            queue_id,
            emails,
            self.node,
            self.clock(),
            campaign=campaign,
            region=self.region,
            settle=settle,
            account_id=account_id,
            spooled=spooled,
        )

    @property
    def inline_spool(self) -> bool:
        """Can this meter keep messages in its commit (the inline spool)? SQLite only."""
        return self.leases is None and hasattr(self.store, "spooled_ids")

    def _inline(self) -> InlineSpoolStore:
        if not self.inline_spool:
            raise ValueError("the inline spool (spool.inline) needs the SQLite store")
        return cast(InlineSpoolStore, self.store)

    async def spooled_ids(self) -> list[str]:
        """The inline-spooled messages this node's delivery owns."""
        return await self._inline().spooled_ids(self.node)

    async def read_spooled(self, queue_id: str) -> bytes | None:
        return await self._inline().read_spooled(queue_id)

    async def drop_spooled(self, queue_id: str) -> None:
        await self._inline().drop_spooled(queue_id)

    async def release(self, hold_id: str) -> int:
        if self.leases is not None and self.leases.owns(hold_id):
            return self.leases.release(hold_id)
        return await self.store.release(hold_id)

    async def tend_leases(self, force: bool = False) -> int:
        """Give back unused lease emails (every lease's `seconds`; `force` at stop); see metering/leases.py."""
        return await self.leases.tend(force) if self.leases is not None else 0

    async def release_abandoned_holds(self) -> int:
        """At start: holds this node left when it stopped belong to no live session."""
        return await self.store.release_node_holds(self.node)

    async def message_committed(self, queue_id: str) -> bool:
        return await self.store.message_committed(queue_id)

    async def record_result(
        self,
        queue_id: str,
        recipient: str,
        result: Result | str,
        detail: str = "",
        code: int | None = None,
        enhanced: str | None = None,
    ) -> bool:
        """Count a recipient's result once, in the period it arrives in (one transaction).

        `result` is the relay's delivery verdict and `code` / `enhanced` the reply behind
        it ("552", "5.2.2"); what is stored and counted is the billing category those
        mean (policies/results.py), with its sub-type. On the shared PostgreSQL store,
        the results reported while a transaction is in flight go together in the next
        one (metering/batching.py).
        """
        category, reason = result_category(result, code, enhanced)
        now = self.clock()
        plans = self.plans
        if self._results is not None:
            report = ResultReport(queue_id, recipient, category, detail, now, reason)
            return bool(await self._results.submit(report))

        def period_key_for(account: Account) -> str:
            return self._period(plans[account.plan].period, now, account.subscribed_on).key

        recorded = await self.store.record_message_result(
            queue_id, recipient, category, detail, now, period_key_for, reason, self._suppresses
        )
        return bool(recorded)  # None: not a metered message (a bounce or notice the relay made)

    async def _record_results(self, reports: list[ResultReport]) -> list[bool | None | Exception]:
        plans = self.plans

        def period_key_for(account: Account, at: datetime) -> str:
            return self._period(plans[account.plan].period, at, account.subscribed_on).key

        return await cast(ResultBatchStore, self.store).record_message_results(
            reports, period_key_for, self._suppresses
        )

    async def usage(self, name: str, at: datetime | None = None) -> UsageReport:
        account = await self.account(name)
        period = self.period_of(account, at)
        plan, standing = self.terms(account, period)
        account = in_force(account, period.start)
        usage = await self.store.usage(account.id, period.key, account.awaiting_results)
        room, _ = headroom(plan, standing, usage)
        rows = await self.store.breakdown(account.id, period.key)
        bounces = await self.store.results_by_reason(account.id, period.key)
        return UsageReport(
            account=account,
            plan=plan,
            period=period,
            usage=usage,
            deferred=await self.store.deferred_recipients(account.id),
            remaining=room,
            standing=standing,
            breakdown=[(r["campaign"], r["region"], int(r["accepted"])) for r in rows],
            bounce_rows=[(r["result"], r["reason"], int(r["n"])) for r in bounces],
        )


__all__ = [
    "MAX_MONEY",
    "AccountDeleted",
    "BalanceTooLarge",
    "Meter",
    "StoreUnavailable",
    "UnknownAccount",
    "UnknownPlan",
    "UsageReport",
    "WideNetwork",
    "first_credited_period",
    "first_period",
    "standing_of",
    "too_wide",
    "utc_now",
]
