"""Start-up failures as one line for the operator: what is wrong and what to do.

A relay that cannot start (its spool or node name taken by another live process,
its port in use, a database it cannot open or write, a spool it cannot write) stops
before it listens, with one line naming the config key or the process in the way,
and exit status 2 (docs/operating.md, "Start-up errors"). It never prints a traceback
and never hangs. The admin API's socket is bound here too, early in the start, so a
port in use is such a failure.
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

EXIT_STARTUP = 2  # as for a bad config: systemd's journal has the line, the operator the fix


class StartupError(Exception):
    """The relay cannot start; the message is the one line the operator reads."""


def owner_label(node: str) -> str:
    """Who holds a claim, as a second process will read it: pid, host, node name."""
    return f"mailmeter pid {os.getpid()} on {socket.gethostname()}, node {node}"


def spool_busy(root: Path, holder: str) -> StartupError:
    return StartupError(
        f"spool.path {root} is in use by another running mailmeter ({holder or 'a live process'}):"
        " stop that one first, or give this one its own spool.path and node.name"
    )


def spool_unusable(root: Path, error: OSError) -> StartupError:
    where = error.filename or root
    return StartupError(
        f"spool.path {root}: cannot write {where} ({error.strerror or error}): create the directory,"
        " writable by the user mailmeter runs as, or point spool.path at one"
    )


def node_claimed(node: str, holder: str) -> StartupError:
    return StartupError(
        f"node.name {node!r} is in use by another running mailmeter ({holder}): stop that one first,"
        " or give this one its own node.name (each node needs a unique name)"
    )


def database_unusable(key: str, reason: str) -> StartupError:
    return StartupError(
        f"{key}: {reason}: check that the database is reachable and writable by the user"
        " mailmeter runs as (`mailmeter db upgrade` tries the same connection)"
    )


def cannot_listen(key: str, address: str, port: int, error: OSError) -> StartupError:
    where = f"{address}:{port}"
    if error.errno == errno.EADDRINUSE:
        return StartupError(
            f"{key}: {where} is already in use by another program (another mailmeter? `ss -ltnp` shows"
            " which): stop it, or choose another port"
        )
    if error.errno == errno.EACCES:
        return StartupError(
            f"{key}: no permission to listen on {where}: ports below 1024 need CAP_NET_BIND_SERVICE"
            " (the systemd unit grants it), or choose a port above 1023"
        )
    if error.errno == errno.EADDRNOTAVAIL:
        return StartupError(f"{key}: {address} is not an address of this machine; choose one it has")
    return StartupError(f"{key}: cannot listen on {where}: {error.strerror or error}")


def bind_api(address: str, port: int) -> socket.socket:
    """The API's listening socket, bound (not yet listening): raises OSError if the port is taken."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
    except OSError:
        sock.close()
        raise
    return sock
