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

import ipaddress
import time
from collections import deque
from collections.abc import Callable
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
    """How AUTH failures are slowed and then locked out (all seconds)."""

    max_failures: int = 5  # failures within `window` that lock a client or a login
    window: float = 600.0
    lockout: float = 900.0
    delay: float = 1.0  # before the first 535; doubles with each further failure ...
    delay_max: float = 8.0  # ... up to this

    def delay_for(self, failures: int) -> float:
        if failures <= 0 or self.delay <= 0:
            return 0.0
        return min(self.delay * 2 ** (failures - 1), self.delay_max)


@dataclass(frozen=True)
class Lockout:
    """Why an AUTH is refused without looking at the password, and for how long."""

    scope: str  # "client" | "login"
    seconds_left: float


@dataclass
class AuthGuard:
    """Counts AUTH failures per client and per login; answers whether either is locked."""

    limits: AuthLimits = field(default_factory=AuthLimits)
    clock: Clock = time.monotonic
    _failures: dict[str, deque[float]] = field(default_factory=dict)
    _locked_until: dict[str, float] = field(default_factory=dict)

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

    def failed(self, client: str, login: str | None) -> float:
        """Record one failed AUTH; returns how long to wait before answering it."""
        now = self.clock()
        counts = []
        for key in (_client(client), _login(login)):
            if key is None:
                continue
            recent = self._failures.setdefault(key, deque())
            recent.append(now)
            while recent and recent[0] <= now - self.limits.window:
                recent.popleft()
            if len(recent) >= self.limits.max_failures:
                self._locked_until[key] = now + self.limits.lockout
                recent.clear()
            counts.append(len(recent) or self.limits.max_failures)
        if len(self._failures) > _SWEEP_AT or len(self._locked_until) > _SWEEP_AT:
            self._sweep(now)
        return self.limits.delay_for(max(counts, default=0))

    def succeeded(self, login: str) -> None:
        """A right password clears that login's failures (not the client's: an attacker
        with one valid account must not reset the count for guessing others)."""
        self._failures.pop(_login(login) or "", None)

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
