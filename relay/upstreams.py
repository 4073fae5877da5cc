"""Which smarthost to try: the health of each configured upstream, as delivery sees it.

`upstream` may be an ordered list of smarthosts. An attempt goes to the first one that
is up; when it fails as a server (the connection is refused or lost, a step times out,
it answers 421, its reply is not SMTP, it refuses our AUTH) the recipients it did not
take move at once to the next one, and the failed upstream is marked down for
`down_seconds`, so the messages after it skip it instead of each waiting out its
timeout. When every upstream is down, the first in the list is tried anyway (a probe):
mail is never held back by a stale verdict, and the probe's success marks it up again.

Recipient-level refusals (a 550, a 452 for one address) say nothing about the
upstream's health and never move an attempt.

The registry lives in the delivery process; `snapshot()` is what metrics and
`mailmeter queue list` show. Each change is also written to `HEALTH_FILE` in the spool
directory (one small JSON file, replaced atomically), so a CLI in another process can
read the node's view with `read_health_file`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

HEALTH_FILE = "upstream-health.json"


class UpstreamAddress(Protocol):
    """What the registry needs of an upstream's settings (delivery's UpstreamConfig)."""

    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...


U = TypeVar("U", bound=UpstreamAddress)


def upstream_label(upstream: UpstreamAddress) -> str:
    """How an upstream is named in metrics, logs and `queue list`: host:port."""
    return f"{upstream.host}:{upstream.port}"


@dataclass
class UpstreamStatus:
    """One upstream's health: up, or down until `down_until` (epoch seconds)."""

    upstream: str  # host:port
    position: int  # its place in the configured list, from 1
    up: bool = True
    down_until: float = 0.0
    failures: int = 0  # failures since the node started
    consecutive_failures: int = 0
    last_error: str = ""
    last_change: float = 0.0  # epoch seconds of the last up/down change (0: never changed)
    delivered_attempts: int = 0  # attempts it took (some or all recipients delivered or refused)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class UpstreamHealth:
    """The health of the configured upstreams, in their configured order."""

    down_seconds: float = 30.0
    clock: Callable[[], float] = time.time
    state_file: Path | None = None  # where each change is written for other processes
    _status: dict[str, UpstreamStatus] = field(default_factory=dict)

    def configure(self, upstreams: Sequence[UpstreamAddress], down_seconds: float | None = None) -> None:
        """The configured list (at start and on reload): known upstreams keep their health."""
        if down_seconds is not None:
            self.down_seconds = down_seconds
        fresh: dict[str, UpstreamStatus] = {}
        for position, upstream in enumerate(upstreams, start=1):
            label = upstream_label(upstream)
            status = self._status.get(label) or UpstreamStatus(label, position)
            status.position = position
            fresh[label] = status
        self._status = fresh
        self._save()

    def status(self, upstream: UpstreamAddress) -> UpstreamStatus:
        label = upstream_label(upstream)
        found = self._status.get(label)
        if found is None:  # not configured (a reload removed it mid-attempt): tracked anyway
            found = self._status[label] = UpstreamStatus(label, len(self._status) + 1)
        return found

    def is_up(self, upstream: UpstreamAddress) -> bool:
        status = self.status(upstream)
        return status.up or self.clock() >= status.down_until

    def order(self, upstreams: Sequence[U]) -> list[U]:
        """The upstreams to try, in order: those up (or whose backoff is over), in their
        configured order; when none is, the first alone (a probe)."""
        usable = [upstream for upstream in upstreams if self.is_up(upstream)]
        return usable or list(upstreams[:1])

    def failed(self, upstream: UpstreamAddress, error: str) -> None:
        """It failed as a server: down for `down_seconds` from now."""
        status = self.status(upstream)
        now = self.clock()
        if status.up:
            status.last_change = now
        status.up = False
        status.down_until = now + self.down_seconds
        status.failures += 1
        status.consecutive_failures += 1
        status.last_error = error[:300]
        self._save()

    def worked(self, upstream: UpstreamAddress) -> None:
        """It held a conversation to the end (whatever it answered each recipient): up."""
        status = self.status(upstream)
        status.delivered_attempts += 1
        if status.up and status.consecutive_failures == 0:
            return
        status.up, status.down_until, status.consecutive_failures = True, 0.0, 0
        status.last_change = self.clock()
        self._save()

    def snapshot(self) -> list[UpstreamStatus]:
        """Each upstream's health now, in the configured order (copies). A down upstream
        whose backoff is over shows as up: the next attempt tries it."""
        now = self.clock()
        shown = []
        for status in sorted(self._status.values(), key=lambda s: s.position):
            copy = UpstreamStatus(**asdict(status))
            copy.up = status.up or now >= status.down_until
            shown.append(copy)
        return shown

    def _save(self) -> None:
        if self.state_file is None:
            return
        payload = {"written_at": self.clock(), "upstreams": [s.as_json() for s in self.snapshot()]}
        temporary = self.state_file.with_name(f".{self.state_file.name}.{os.getpid()}")
        try:
            temporary.write_text(json.dumps(payload, sort_keys=True))
            os.replace(temporary, self.state_file)
        except OSError:
            pass  # a view for the CLI only; delivery never depends on it


def read_health_file(spool_root: Path) -> list[UpstreamStatus]:
    """The upstream health a running node last wrote into its spool directory (empty if none).

    A down upstream whose backoff is over is shown up, as `UpstreamHealth.snapshot` does."""
    try:
        payload = json.loads((spool_root / HEALTH_FILE).read_text())
    except (OSError, ValueError):
        return []
    now = time.time()
    shown = []
    for item in payload.get("upstreams", []):
        try:
            status = UpstreamStatus(**item)
        except TypeError:
            continue
        status.up = status.up or now >= status.down_until
        shown.append(status)
    return shown
