"""Abuse limits of SMTP in: AUTH brute force and connection floods, per node, in memory.

Why in memory and per node: these limits protect this process (its CPU, its
sockets, its scrypt budget) from a client hammering it right now; they do not
need to survive a restart or be shared, and keeping them out of the meter means
a flood cannot load the database every account depends on.

Keys: a client is its IPv4 address, or its IPv6 /64 (one customer usually owns a
whole /64, so per-address limits there are trivially evaded). A login is the
name as sent, whether or not such an account exists, so a lockout answer tells
an attacker nothing about which accounts exist.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

Clock = Callable[[], float]

# Entries are swept when the tables grow past this, so a scan from many
# addresses cannot grow memory without bound.
_SWEEP_AT = 10_000


def client_key(address: str) -> str:
    """The unit a per-client limit counts: an IPv4 address, an IPv6 /64, else the string."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


@dataclass(frozen=True)
class AuthLimits:
    """How AUTH failures are slowed and then locked out (all seconds), and how many
    password checks may run at once."""

    max_failures: int = 5  # failures within `window` that lock a client or a login
    window: float = 600.0
    lockout: float = 900.0
    delay: float = 1.0  # before the first 535; doubles with each further failure ...
    delay_max: float = 8.0  # ... up to this
    checks_per_client: int = 2  # password checks in flight for one client at once
    checks_in_flight: int = 8  # password checks in flight on this node, all clients together

    def delay_for(self, failures: int) -> float:
        if failures <= 0 or self.delay <= 0:
            return 0.0
        backoff: float = self.delay * 2 ** (failures - 1)
        return min(backoff, self.delay_max)


@dataclass(frozen=True)
class Lockout:
    """Why an AUTH is refused without looking at the password, and for how long."""

    scope: str  # "client" | "login"
    seconds_left: float


@dataclass
class Attempt:
    """One AUTH while it holds its check slots: report how the password check ended."""

    guard: AuthGuard
    client: str
    login: str | None
    locked: Lockout | None = None  # set: refuse without checking the password
    began: list[str] = field(default_factory=list)  # lockouts its failure began

    def failed(self) -> float:
        """A wrong name or password; returns how long to wait before answering it. The
        lockouts this failure began (scopes "client", "login") are left in `began`."""
        delay, self.began = self.guard.failed_and_locked(self.client, self.login)
        return delay

    def succeeded(self) -> None:
        if self.login is not None:
            self.guard.succeeded(self.login)


@dataclass
class AuthGuard:
    """Counts AUTH failures per client and per login; answers whether either is locked;
    and lets a password check start only when it cannot overshoot the lockout.

    An attempt counts from the moment it starts: the checks in flight for a client (or a
    login) plus its recent failures never exceed `max_failures`, so a burst of parallel
    guesses gets at most that many passwords checked before the lockout; the others wait
    for a slot and then find the lockout. Each client has at most `checks_per_client`
    checks in flight and the node `checks_in_flight`, taken in that order: one client's
    queue never stands in front of another's AUTH for more than that many checks.
    """

    limits: AuthLimits = field(default_factory=AuthLimits)
    clock: Clock = time.monotonic
    _failures: dict[str, deque[float]] = field(default_factory=dict)
    _locked_until: dict[str, float] = field(default_factory=dict)
    lockouts_begun: dict[str, int] = field(default_factory=dict)  # by scope, since start (for metrics)
    _running: dict[str, int] = field(default_factory=dict)  # checks in flight per client and login key
    _total: int = 0  # checks in flight on this node
    _freed: asyncio.Condition | None = None  # notified whenever a check ends

    def lockout(self, client: str, login: str | None) -> Lockout | None:
        """The lockout in force for this client or login, client first."""
        now = self.clock()
        for scope, key in (("client", _client(client)), ("login", _login(login))):
            if key is None:
                continue
            until = self._locked_until.get(key)
            if until is None:
                continue
            if until > now:
                return Lockout(scope, until - now)
            del self._locked_until[key]
        return None

    @asynccontextmanager
    async def attempt(self, client: str, login: str | None) -> AsyncIterator[Attempt]:
        """Wait for the slots to check one password (or find a lockout: `locked` is set and
        no password may be checked); the slots are given back on leaving the block."""
        if self._freed is None:
            self._freed = asyncio.Condition()
        keys = [key for key in (_client(client), _login(login)) if key is not None]
        async with self._freed:
            while True:
                locked = self.lockout(client, login)
                if locked is not None:
                    break
                if self._may_start(keys):
                    break
                await self._freed.wait()
        if locked is not None:
            yield Attempt(self, client, login, locked)
            return
        for key in keys:
            self._running[key] = self._running.get(key, 0) + 1
        self._total += 1
        try:
            yield Attempt(self, client, login)
        finally:
            self._total -= 1
            for key in keys:
                left = self._running[key] - 1
                if left:
                    self._running[key] = left
                else:
                    del self._running[key]
            async with self._freed:
                self._freed.notify_all()

    def _may_start(self, keys: list[str]) -> bool:
        limits = self.limits
        if self._total >= limits.checks_in_flight:
            return False
        now = self.clock()
        for key in keys:
            running = self._running.get(key, 0)
            if key.startswith("client:") and running >= limits.checks_per_client:
                return False
            if running + self._recent_failures(key, now) >= limits.max_failures:
                return False
        return True

    def _recent_failures(self, key: str, now: float) -> int:
        recent = self._failures.get(key)
        if not recent:
            return 0
        while recent and recent[0] <= now - self.limits.window:
            recent.popleft()
        return len(recent)

    def failed(self, client: str, login: str | None) -> float:
        """Record one failed AUTH; returns how long to wait before answering it."""
        return self.failed_and_locked(client, login)[0]

    def failed_and_locked(self, client: str, login: str | None) -> tuple[float, list[str]]:
        """Record one failed AUTH: how long to wait before answering it, and the lockouts it
        began ("client", "login"; counted in `lockouts_begun`)."""
        now = self.clock()
        counts = []
        began = []
        for scope, key in (("client", _client(client)), ("login", _login(login))):
            if key is None:
                continue
            recent = self._failures.setdefault(key, deque())
            recent.append(now)
            while recent and recent[0] <= now - self.limits.window:
                recent.popleft()
            if len(recent) >= self.limits.max_failures:
                self._locked_until[key] = now + self.limits.lockout
                recent.clear()
                if self.limits.lockout > 0:
                    began.append(scope)
                    self.lockouts_begun[scope] = self.lockouts_begun.get(scope, 0) + 1
            counts.append(len(recent) or self.limits.max_failures)
        if len(self._failures) > _SWEEP_AT or len(self._locked_until) > _SWEEP_AT:
            self._sweep(now)
        return self.limits.delay_for(max(counts, default=0)), began

    def succeeded(self, login: str) -> None:
        """A right password clears that login's failures (not the client's: an attacker
        with one valid account must not reset the count for guessing others)."""
        self._failures.pop(_login(login) or "", None)

    def clear(self) -> int:
        """Lift every lockout and forget every failure (the operator's SIGUSR1); how many
        lockouts were in force."""
        now = self.clock()
        lifted = sum(1 for until in self._locked_until.values() if until > now)
        self._locked_until.clear()
        self._failures.clear()
        return lifted

    def _sweep(self, now: float) -> None:
        for key in [k for k, t in self._failures.items() if not t or t[-1] <= now - self.limits.window]:
            del self._failures[key]
        for key in [k for k, until in self._locked_until.items() if until <= now]:
            del self._locked_until[key]


def _client(address: str) -> str:
    return "client:" + client_key(address)


def _login(name: str | None) -> str | None:
    return None if name is None else "login:" + name


@dataclass
class ConnectionCounter:
    """Open SMTP connections per client, so one address cannot take every slot."""

    limit: int
    _open: dict[str, int] = field(default_factory=dict)

    def acquire(self, address: str) -> bool:
        key = client_key(address)
        count = self._open.get(key, 0)
        if count >= self.limit:
            return False
        self._open[key] = count + 1
        return True

    def release(self, address: str) -> None:
        key = client_key(address)
        count = self._open.get(key, 0) - 1
        if count > 0:
            self._open[key] = count
        else:
            self._open.pop(key, None)

    def open_from(self, address: str) -> int:
        return self._open.get(client_key(address), 0)
