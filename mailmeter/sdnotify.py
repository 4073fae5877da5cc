"""systemd's notify protocol: a few lines in a datagram to $NOTIFY_SOCKET.

READY=1 once the relay listens, RELOADING=1/READY=1 around a reload, STOPPING=1
on the way down, WATCHDOG=1 every half $WATCHDOG_USEC when the unit sets
WatchdogSec. Without NOTIFY_SOCKET (not under systemd) every call is a no-op.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Mapping


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self.address: str | None = None
        if path:
            # A leading '@' names a socket in the abstract namespace.
            self.address = "\0" + path[1:] if path.startswith("@") else path
        self.watchdog_interval: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 1_000_000 / 2

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *lines: str) -> None:
        if self.address is None:
            return
        payload = "\n".join(lines).encode()
        # Non-blocking: a receiver that stopped reading (its queue full) must never stall
        # the relay's event loop; a notification it misses is one it did not want.
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK) as sock:
            try:
                sock.connect(self.address)
                sock.sendall(payload)
            except OSError:
                pass  # systemd (or the supervisor) went away or is not reading; nothing to do about it

    async def watchdog(self) -> None:
        """Ping the watchdog for as long as the event loop keeps running this task."""
        if self.watchdog_interval is None:
            return
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_interval)
