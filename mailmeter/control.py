"""The queue's control socket: how `mailmeter queue` and the admin API reach a running node's queue.

The spool belongs to the node that holds its lock (relay/spool.py): only that process
may change a message's state, or a worker could attempt a message the operator just
deleted. So each node serves a Unix socket in its spool, `SPOOL/control` (mode 0600:
only the relay's user and root may connect), like Postfix's `public/` sockets, and the
CLI and the API ask it. With `listen.processes` > 1 every worker has a spool and a
socket of its own (mailmeter/workers.py), and a question goes to each.

One request per connection: a JSON object on one line ({"op": "list"}, {"op": "hold",
"queue_id": "..."}), answered with one line: {"result": ...} or {"error": "...", "kind":
"not_found" | "busy" | "bad_request" | "failed"}.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import structlog

from mailmeter.config import Config
from mailmeter.relay.delivery import Delivery, MessageBusy, QueueEntry, UnknownMessage
from mailmeter.relay.upstreams import UpstreamStatus

SOCKET_NAME = "control"
DELETED_REPLY = "deleted by operator"
MAX_REQUEST = 64 * 1024
TIMEOUT = 30.0
_SUN_PATH_MAX = 100  # bytes a Unix socket path may have (108 with the NUL, kept short of it)


def spool_sockets(config: Config) -> list[Path]:
    """The control sockets of a config's node: its spool's, and each worker's (mailmeter/workers.py)."""
    root = config.resolve(config.spool.path)
    workers = [root / f"worker-{number}" / SOCKET_NAME for number in range(1, config.processes)]
    return [root / SOCKET_NAME, *workers]


def entry_json(entry: QueueEntry) -> dict[str, Any]:
    data = asdict(entry)
    data["recipients"] = [
        {"address": address, "status": status, "reply": reply} for address, status, reply in entry.recipients
    ]
    return data


class _Short:
    """A Unix socket path short enough for bind/connect: through /proc/self/fd when it is
    too long (the directory opened, the path taken relative to it)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def __enter__(self) -> str:
        if len(os.fsencode(self.path)) <= _SUN_PATH_MAX:
            return str(self.path)
        self._fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return f"/proc/self/fd/{self._fd}/{self.path.name}"

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)


class ControlServer:
    """Serves the queue commands of one node's delivery on `SPOOL/control`."""

    def __init__(self, delivery: Delivery, spool_root: Path) -> None:
        self.delivery = delivery
        self.path = spool_root / SOCKET_NAME
        self.server: asyncio.AbstractServer | None = None
        self.log = structlog.get_logger("mailmeter.control")

    async def start(self) -> None:
        """Bind with mode 0600 from the first instant (bound under a temporary name, then
        renamed over a socket a crashed run left: this node holds the spool's lock)."""
        temporary = self.path.with_name(f".{SOCKET_NAME}.{os.getpid()}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with _Short(temporary) as where:
                try:
                    os.unlink(where)
                except FileNotFoundError:
                    pass
                sock.bind(where)
            os.chmod(temporary, 0o600)
            os.replace(temporary, self.path)
            self.server = await asyncio.start_unix_server(self._serve, sock=sock, limit=MAX_REQUEST)
        except BaseException:
            sock.close()
            raise

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), TIMEOUT)
            try:
                request = json.loads(line)
                if not isinstance(request, dict):
                    raise ValueError("not an object")
                answer: dict[str, Any] = {"result": await self.handle(request)}
            except UnknownMessage as unknown:
                answer = {"error": f"no message {unknown.args[0]!r} in this queue", "kind": "not_found"}
            except MessageBusy as busy:
                answer = {
                    "error": f"message {busy.args[0]} is being delivered right now; try again in a moment",
                    "kind": "busy",
                }
            except (ValueError, KeyError, TypeError) as error:
                answer = {"error": f"bad request: {error}", "kind": "bad_request"}
            except Exception as error:  # a disk error, or a bug: said to the client and logged
                self.log.error("control.error", error=repr(error), result="failed")
                answer = {"error": f"the relay could not do it ({error!r}); see its log", "kind": "failed"}
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            writer.close()

    async def handle(self, request: dict[str, Any]) -> Any:
        op = request["op"]
        delivery = self.delivery
        if op == "list":
            return [entry_json(entry) for entry in await delivery.entries()]
        if op == "flush":
            ids = request.get("queue_ids")
            if ids is None:
                ids = [entry.queue_id for entry in await delivery.entries()]
            flushed, skipped = delivery.flush([str(i) for i in ids])
            return {"flushed": flushed, "skipped": [{"queue_id": q, "reason": why} for q, why in skipped]}
        queue_id = str(request["queue_id"])
        if op == "show":
            return entry_json(await delivery.entry(queue_id))
        if op in ("hold", "release"):
            return entry_json(await delivery.hold(queue_id, op == "hold"))
        if op == "delete":
            entry, reported = await delivery.delete(queue_id, DELETED_REPLY)
            return {**entry_json(entry), "reported": reported}
        raise ValueError(f"unknown op {op!r}")


class RelayNotRunning(RuntimeError):
    """No node answers on a spool's control socket."""


class QueueRefused(RuntimeError):
    """A node answered with an error: `kind` is not_found, busy or bad_request."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


class QueueClient:
    """Asks the node(s) of a config's spool(s) (`spool_sockets`) about their queues; `health`
    reads the smarthosts' health the node's processes write in the spool (mailmeter/node.py's
    upstream_health), which needs no running relay."""

    def __init__(self, sockets: Sequence[Path], health: Callable[[], list[UpstreamStatus]] | None = None) -> None:
        self.sockets = list(sockets)
        self.health = health

    def upstreams(self) -> list[UpstreamStatus]:
        """Each configured smarthost's health, in the configured order ([] when not known)."""
        return self.health() if self.health is not None else []

    async def ask(self, path: Path, request: dict[str, Any]) -> Any:
        """One node's answer; RelayNotRunning when nothing serves `path`, QueueRefused for its error."""
        try:
            with _Short(path) as where:
                reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(where, limit=1 << 26), TIMEOUT)
        except (FileNotFoundError, ConnectionRefusedError, TimeoutError) as error:
            raise RelayNotRunning(
                f"the relay is not running on spool {path.parent} (nothing answers on {path}:"
                f" {getattr(error, 'strerror', None) or 'timed out'}); start it (mailmeter serve, or systemctl"
                " start mailmeter): the queue is handled by the running relay"
            ) from None
        except PermissionError:
            raise RelayNotRunning(
                f"{path} is only for the relay's user: run this command as that user (or root)"
            ) from None
        try:
            writer.write(json.dumps(request).encode() + b"\n")
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), TIMEOUT)
        except (ConnectionError, TimeoutError) as error:
            raise RelayNotRunning(f"the relay on spool {path.parent} did not answer ({error!r}); retry") from None
        finally:
            writer.close()
        if not line:
            raise RelayNotRunning(f"the relay on spool {path.parent} closed the control socket; see its log")
        answer = json.loads(line)
        if "error" in answer:
            raise QueueRefused(answer["error"], answer.get("kind", "bad_request"))
        return answer["result"]

    async def ask_all(self, request: dict[str, Any]) -> list[Any]:
        """Every node's answer, in the order of `sockets`."""
        return [await self.ask(path, request) for path in self.sockets]

    async def ask_holder(self, queue_id: str, request: dict[str, Any]) -> Any:
        """The answer of the node whose queue holds `queue_id`; QueueRefused not_found if none does."""
        for path in self.sockets:
            try:
                return await self.ask(path, {**request, "queue_id": queue_id})
            except QueueRefused as refused:
                if refused.kind != "not_found":
                    raise
        raise QueueRefused(
            f"no message {queue_id!r} in the queue (it may have been delivered; see `mailmeter queue list`)",
            "not_found",
        )


__all__ = ["ControlServer", "QueueClient", "QueueRefused", "RelayNotRunning", "entry_json", "spool_sockets"]
