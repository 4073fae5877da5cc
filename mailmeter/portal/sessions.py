"""Portal sessions, in this process's memory: an unguessable id (the cookie) for one account,
its CSRF token (every form carries it; every POST is checked against it), and its deadlines.

In memory on purpose: a session is a short-lived right to act for one account on this node;
a restart ends every session (the holder signs in again), and nothing about it needs to be in
the meter's database. The table is bounded: expired sessions are swept as it grows.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

_SWEEP_AT = 10_000


@dataclass
class Session:
    id: str
    account: str
    csrf: str
    started: float
    seen: float


@dataclass
class Sessions:
    """Sessions by id; one ends `idle` seconds after its last request or `lifetime` after sign-in."""

    idle: float = 1800.0
    lifetime: float = 43200.0
    clock: Callable[[], float] = time.monotonic
    _by_id: dict[str, Session] = field(default_factory=dict)

    def start(self, account: str) -> Session:
        """A new session (a new id at every sign-in: an id set before it is never trusted)."""
        now = self.clock()
        if len(self._by_id) > _SWEEP_AT:
            self._sweep(now)
        session = Session(secrets.token_urlsafe(32), account, secrets.token_urlsafe(32), now, now)
        self._by_id[session.id] = session
        return session

    def get(self, session_id: str | None) -> Session | None:
        """The live session of this id (and note the request), or None."""
        if not session_id:
            return None
        session = self._by_id.get(session_id)
        if session is None:
            return None
        now = self.clock()
        if now - session.seen > self.idle or now - session.started > self.lifetime:
            del self._by_id[session_id]
            return None
        session.seen = now
        return session

    def end(self, session_id: str) -> None:
        self._by_id.pop(session_id, None)

    def _sweep(self, now: float) -> None:
        for sid in [
            sid for sid, s in self._by_id.items() if now - s.seen > self.idle or now - s.started > self.lifetime
        ]:
            del self._by_id[sid]


def same_token(expected: str, presented: str | None) -> bool:
    """A CSRF token check in constant time."""
    return presented is not None and hmac.compare_digest(expected.encode(), presented.encode())
