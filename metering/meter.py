"""The meter's narrow async interface: reserve, commit, release, record a result, read usage.

The meter finds the account's plan and current period, then lets the store run
the pure policy decision inside one atomic transaction. Any store failure is
raised as StoreUnavailable so the relay can fail closed with a 451.
"""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, timezone

from metering.passwords import DUMMY_HASH, hash_password, verify_password
from metering.records import Account, Grant, Result
from metering.sqlite_store import SqliteStore, StoreUnavailable
from policies.decision import Admission, Refusal, Standing, Usage, admit, blocking_refusal, headroom
from policies.periods import Period, period_containing
from policies.plans import Plan

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class UnknownAccount(LookupError):
    pass


class UnknownPlan(LookupError):
    pass


@dataclass(frozen=True)
class UsageReport:
    account: str
    plan: str
    period_start: datetime
    period_end: datetime
    usage: Usage
    deferred: int
    remaining: int | None

    def as_json(self) -> dict[str, object]:
        return {
            "account": self.account,
            "plan": self.plan,
            "period_start": self.period_start.isoformat(),
            "period_end": self.period_end.isoformat(),
            "accepted": self.usage.accepted,
            "delivered": self.usage.delivered,
            "soft_bounced": self.usage.soft_bounced,
            "hard_bounced": self.usage.hard_bounced,
            "deferred": self.deferred,
            "reserved": self.usage.reserved,
            "remaining": self.remaining,
        }


def standing_of(account: Account) -> Standing:
    return Standing(
        payment_ok=account.payment_ok,
        suspended=account.suspended,
        prepaid_balance=account.prepaid_balance,
    )


class Meter:
    def __init__(
        self,
        store: SqliteStore,
        plans: Mapping[str, Plan],
        node: str,
        clock: Clock = utc_now,
    ) -> None:
        self.store = store
        self.plans = dict(plans)
        self.node = node
        self.clock = clock

    # -- accounts -----------------------------------------------------------

    def plan_of(self, account: Account) -> Plan:
        plan = self.plans.get(account.plan)
        if plan is None:
            raise UnknownPlan(
                f"account {account.name!r} is on plan {account.plan!r}, which the config does not define"
            )
        return plan

    def period_of(self, account: Account, at: datetime | None = None) -> Period:
        plan = self.plan_of(account)
        return period_containing(plan.period, at or self.clock(), account.subscribed_on)

    async def add_account(
        self,
        name: str,
        password: str | None,
        plan: str,
        domains: list[str],
        networks: list[str],
        subscribed_on: date | None = None,
    ) -> Account:
        if plan not in self.plans:
            raise UnknownPlan(f"plan {plan!r} is not defined in the config (known: {', '.join(sorted(self.plans))})")
        if not name or any(ch.isspace() for ch in name):
            raise ValueError("account name must be non-empty and contain no spaces")
        for network in networks:
            ipaddress.ip_network(network, strict=False)
        password_hash = await asyncio.to_thread(hash_password, password) if password else None
        now = self.clock()
        await self.store.add_account(
            name,
            password_hash,
            plan,
            subscribed_on or now.date(),
            [d.lower().rstrip(".") for d in domains],
            [str(ipaddress.ip_network(n, strict=False)) for n in networks],
            now,
        )
        account = await self.store.get_account(name)
        assert account is not None
        return account

    async def account(self, name: str) -> Account:
        account = await self.store.get_account(name)
        if account is None:
            raise UnknownAccount(f"no account named {name!r} (see `mailmeter account list`)")
        return account

    async def authenticate(self, name: str, password: bytes) -> Account | None:
        """Check a login off the event loop; None for a wrong name or password."""
        account = await self.store.get_account(name)
        stored = account.password_hash if account and account.password_hash else DUMMY_HASH
        ok = await asyncio.to_thread(verify_password, password, stored)
        return account if ok and account is not None and account.password_hash else None

    async def sender_domains(self, name: str) -> tuple[str, ...]:
        return (await self.account(name)).domains

    async def account_for_client(self, address: str) -> Account | None:
        """The account bound to the client's IP network, if any (like Postfix mynetworks)."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return None
        best: tuple[int, str] | None = None
        for network, name in await self.store.all_networks():
            net = ipaddress.ip_network(network)
            if ip.version == net.version and ip in net and (best is None or net.prefixlen > best[0]):
                best = (net.prefixlen, name)
        return await self.store.get_account(best[1]) if best else None

    # -- the metering hook ----------------------------------------------------

    async def sending_refusal(self, name: str) -> Refusal | None:
        """Checked at MAIL: a reason the account may not send at all right now."""
        account = await self.account(name)
        blocked = blocking_refusal(standing_of(account))
        if blocked is not None:
            return blocked
        plan = self.plan_of(account)
        usage = await self.store.usage(account.id, self.period_of(account).key)
        room, refusal = headroom(plan, standing_of(account), usage)
        return refusal if room == 0 else None

    async def reserve(self, name: str, hold_id: str | None = None, emails: int = 1) -> Grant:
        """Hold up to `emails` more emails for one SMTP transaction, atomically."""
        account = await self.account(name)
        plan = self.plan_of(account)
        standing = standing_of(account)
        period = self.period_of(account)
        hold = hold_id or secrets.token_hex(12)

        def decide(usage: Usage) -> Admission:
            return admit(plan, standing, usage, emails)

        admission = await self.store.reserve(
            account.id, period.key, hold, self.node, emails, self.clock(), decide
        )
        refusal = admission.refusal.value if admission.refusal else None
        return Grant(hold_id=hold, granted=admission.granted, refusal=refusal)

    async def commit(self, hold_id: str, queue_id: str, emails: int, campaign: str = "") -> None:
        await self.store.commit(hold_id, queue_id, emails, self.node, self.clock())

    async def release(self, hold_id: str) -> int:
        return await self.store.release(hold_id)

    async def release_abandoned_holds(self) -> int:
        """At start: holds this node left when it stopped belong to no live session."""
        return await self.store.release_node_holds(self.node)

    async def message_committed(self, queue_id: str) -> bool:
        return await self.store.message_committed(queue_id)

    async def record_result(self, queue_id: str, recipient: str, result: Result | str, detail: str = "") -> bool:
        result = Result(result)
        account_id = await self.store.message_account(queue_id)
        if account_id is None:
            return False  # not a metered message (a bounce the relay generated)
        account = await self.store.get_account_by_id(account_id)
        if account is None:
            raise UnknownAccount(f"account id {account_id} of message {queue_id} is gone")
        period = self.period_of(account)
        return await self.store.record_result(
            queue_id, recipient, result, detail, account.id, period.key, self.clock()
        )

    async def usage(self, name: str) -> UsageReport:
        account = await self.account(name)
        plan = self.plan_of(account)
        period = self.period_of(account)
        usage = await self.store.usage(account.id, period.key)
        room, _ = headroom(plan, standing_of(account), usage)
        return UsageReport(
            account=account.name,
            plan=account.plan,
            period_start=period.start,
            period_end=period.end,
            usage=usage,
            deferred=await self.store.deferred_recipients(account.id),
            remaining=room,
        )


__all__ = ["Meter", "StoreUnavailable", "UnknownAccount", "UnknownPlan", "UsageReport", "utc_now"]
