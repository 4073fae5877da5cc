"""The node's side of allowance leasing: leases in memory, session holds carved from them.

With several nodes on one PostgreSQL meter, a reserve per RCPT on the database
queues every node on the account's row lock. Instead the node borrows a block of
the account's allowance (a lease: a hold row the node owns, admitted by the same
policy as any hold; metering/postgres/leases.py), carves its sessions' holds out of it
in memory, and sends the commits of many messages to the database together.

What stays exact, and why:
- No overspend: the database only ever moves emails from a lease row to `accepted`
  (a commit fails for emails the row does not hold), and a lease row was admitted
  under the account's lock like any hold.
- No usage without a message, no message without usage: a carved message still
  commits in a database transaction before its 250; only the transaction is shared.
- Live standing: a lease is renewed (unused emails given back, the standing decided
  again) when it runs short and after `seconds` at the latest, so a failed payment
  or a lowered limit stops new carving on every node within that time; MAIL reads
  the account itself, so new transactions stop at once.
- Nothing held forever: an idle lease is given back within `seconds`; a node's
  leases are released when it starts again, and other nodes reclaim the leases of
  a node that stopped renewing them for `stale_seconds`.

Invariant kept per lease: the row holds `free + carved` emails (carved: held by
open sessions, not yet committed or released).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from time import monotonic

from mailmeter.metering.batching import Batcher
from mailmeter.metering.records import Decide, HoldAccountMismatch, LeasedCommit, Settle, StoreUnavailable, UnknownHold
from mailmeter.metering.store import LeasingStore
from mailmeter.policies.decision import Admission


@dataclass(frozen=True)
class LeaseSettings:
    """emails: the block a node borrows beyond what a session asks for; seconds: how long
    a lease answers before it is renewed or given back; stale_seconds: after this without
    a renewal, other nodes reclaim a lease (its node is gone)."""

    emails: int = 50
    seconds: float = 1.0
    stale_seconds: float = 60.0


@dataclass(eq=False)
class Lease:
    lease_id: str
    account_id: int
    period_key: str
    free: int = 0  # borrowed, not carved
    carved: int = 0  # held by open sessions
    renewed_at: float = float("-inf")  # monotonic
    existing: bool = False  # its row exists (it was granted something)
    lost: bool = False  # its row is gone: carves from it cannot commit
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass(eq=False)
class Carve:
    """One session's hold, carved from a lease."""

    lease: Lease
    emails: int


class LeaseBook:
    """The node's leases and its sessions' carves; the database sees only leases and commits."""

    def __init__(
        self,
        store: LeasingStore,
        node: str,
        settings: LeaseSettings,
        clock: Callable[[], datetime],
        region: str = "",
    ) -> None:
        self.store = store
        self.node = node
        self.settings = settings
        self.clock = clock
        self.region = region
        self._leases: dict[tuple[int, str], Lease] = {}
        self._carves: dict[str, Carve] = {}
        self._settle: Settle | None = None
        self._commits: Batcher[LeasedCommit, None] = Batcher(self._commit_batch)
        self.renewals = 0  # lease transactions (borrow, renew); for tests and metrics

    def owns(self, hold_id: str) -> bool:
        return hold_id in self._carves

    def leases(self) -> list[Lease]:
        """The node's leases now (for metrics)."""
        return list(self._leases.values())

    # -- reserve -------------------------------------------------------------------------

    async def reserve(self, account_id: int, period_key: str, hold_id: str, emails: int, decide: Decide) -> Admission:
        """Carve `emails` for the session's hold from the account's lease, renewing it if needed.

        A hold stays with the lease it was first carved from (so with its account and
        period: HoldAccountMismatch for another account). The lease's lock makes one
        renewal at a time; carving from a fresh lease needs no await.
        """
        while True:
            carve = self._carves.get(hold_id)
            if carve is not None and carve.lease.account_id != account_id:
                raise HoldAccountMismatch(hold_id, carve.lease.account_id, account_id)
            if carve is not None and carve.lease.lost:
                if carve.emails > 0:
                    raise StoreUnavailable("this node's lease for the account was reclaimed; retry the transaction")
                del self._carves[hold_id]  # it holds nothing: it may start again on the account's new lease
                carve = None
            lease = carve.lease if carve is not None else self._lease_for(account_id, period_key)
            if self._carve(lease, hold_id, emails):
                return Admission(granted=emails, refusal=None, remaining=None)
            async with lease.lock:
                if lease.lost:
                    continue  # given back (idle) or reclaimed while we waited: look again
                if self._carve(lease, hold_id, emails, holding_lock=True):  # another session's renewal served us
                    return Admission(granted=emails, refusal=None, remaining=None)
                returning, lease.free = lease.free, 0
                self.renewals += 1
                try:
                    admission = await self.store.renew_lease(
                        lease.lease_id,
                        account_id,
                        lease.period_key,
                        self.node,
                        returning,
                        lease.existing,
                        self.clock(),
                        decide,
                    )
                except BaseException:
                    lease.free += returning  # nothing changed in the database (or it cannot say: commits will tell)
                    raise
                if admission is None:  # reclaimed by another node: forget it (and look again)
                    self._lose(lease)
                    continue
                lease.renewed_at = monotonic()
                lease.existing = lease.existing or admission.granted > 0
                mine = min(admission.granted, emails)
                lease.free += admission.granted - mine
                self._add_carve(lease, hold_id, mine)
                return Admission(granted=mine, refusal=admission.refusal, remaining=admission.remaining)

    def _lease_for(self, account_id: int, period_key: str) -> Lease:
        lease = self._leases.get((account_id, period_key))
        if lease is None:
            lease_id = f"lease/{self.node}/{account_id}/{period_key}/{secrets.token_hex(4)}"
            lease = self._leases[(account_id, period_key)] = Lease(lease_id, account_id, period_key)
        return lease

    def _fresh(self, lease: Lease) -> bool:
        return not lease.lost and monotonic() - lease.renewed_at < self.settings.seconds

    def _carve(self, lease: Lease, hold_id: str, emails: int, holding_lock: bool = False) -> bool:
        """Carve from the lease if it is fresh and has enough, and no renewal is under way
        (unless the caller is the one holding the lock, after a renewal finished)."""
        if not self._fresh(lease) or lease.free < emails or (lease.lock.locked() and not holding_lock):
            return False
        lease.free -= emails
        self._add_carve(lease, hold_id, emails)
        return True

    def _add_carve(self, lease: Lease, hold_id: str, emails: int) -> None:
        if emails <= 0 and hold_id not in self._carves:
            self._carves[hold_id] = Carve(lease, 0)  # the session's hold exists (granted nothing yet)
            return
        lease.carved += emails
        carve = self._carves.setdefault(hold_id, Carve(lease, 0))
        carve.emails += emails

    def _lose(self, lease: Lease) -> None:
        lease.lost = True
        if self._leases.get((lease.account_id, lease.period_key)) is lease:
            del self._leases[(lease.account_id, lease.period_key)]

    # -- release and commit ----------------------------------------------------------------

    def release(self, hold_id: str) -> int:
        """Give a session's carve back to its lease (no database: the lease row still holds it)."""
        carve = self._carves.pop(hold_id, None)
        if carve is None:
            return 0
        carve.lease.carved -= carve.emails
        carve.lease.free += carve.emails
        return carve.emails

    async def commit(
        self, hold_id: str, queue_id: str, emails: int, campaign: str, settle: Settle, account_id: int | None = None
    ) -> None:
        """The commit point of a carved message, in the next batch transaction; raises if it did not count.

        `account_id`: the account the caller commits for (HoldAccountMismatch for a carve of another).
        """
        carve = self._carves.get(hold_id)
        if carve is None:
            raise UnknownHold(hold_id)
        if account_id is not None and carve.lease.account_id != account_id:
            raise HoldAccountMismatch(hold_id, carve.lease.account_id, account_id)
        if emails > carve.emails:
            raise ValueError(f"commit of {emails} emails exceeds the {carve.emails} held")
        lease = carve.lease
        self._settle = settle
        done = self._commits.submit_nowait(
            LeasedCommit(lease.lease_id, lease.account_id, lease.period_key, queue_id, emails, campaign)
        )

        def settled(outcome: asyncio.Future[None]) -> None:
            # Here, not after the await: the batch goes on if the session is cancelled meanwhile.
            error = outcome.exception()
            if isinstance(error, UnknownHold):
                self._lose(lease)  # its row no longer holds what this node thought
            if error is not None:
                return  # the carve stays, for the session's release
            # Counted: the carve's emails left the lease row; any it held beyond `emails` stay in it, free.
            if self._carves.get(hold_id) is carve:
                del self._carves[hold_id]
            lease.carved -= carve.emails
            lease.free += carve.emails - emails

        done.add_done_callback(settled)
        await asyncio.shield(done)  # a session that goes away does not cancel the others' batch

    async def _commit_batch(self, commits: list[LeasedCommit]) -> list[None | Exception]:
        return await self.store.commit_leased(commits, self.node, self.clock(), self.region, self._settle)

    @property
    def commit_batches(self) -> int:
        return self._commits.batches

    # -- upkeep ------------------------------------------------------------------------------

    async def tend(self, force: bool = False) -> int:
        """Give back what idle leases do not use, mark busy ones renewed, reclaim dead nodes'.

        Run every `seconds`. `force` (at stop) gives back every free email at once.
        Returns the emails given back.
        """
        given = 0
        now = monotonic()
        for lease in list(self._leases.values()):
            if not lease.existing or lease.lock.locked():
                continue
            if not force and now - lease.renewed_at < self.settings.seconds:
                continue
            async with lease.lock:
                returning, lease.free = lease.free, 0
                try:
                    left = await self.store.shrink_lease(lease.lease_id, returning, lease.carved == 0, self.clock())
                except BaseException:
                    lease.free += returning
                    raise
                if left is None:
                    self._lose(lease)
                    continue
                given += returning
                lease.renewed_at = monotonic() - self.settings.seconds  # renewed, but no longer fresh to carve
                if left == 0 and lease.carved == 0:
                    self._lose(lease)  # its row is gone; a later reserve starts a new lease
        if not force:
            stale = self.clock() - timedelta(seconds=self.settings.stale_seconds)
            await self.store.reclaim_stale_leases(stale, self.node)
        return given


__all__ = ["Carve", "Lease", "LeaseBook", "LeaseSettings"]
