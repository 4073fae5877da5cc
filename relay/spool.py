"""The durable spool: the only hand-off between SMTP in and delivery out.

Layout under the spool root, in the spirit of Postfix's queue directories:

    incoming/QID        written and fsynced before the meter commit; not yet accepted
    active/QID          accepted: the envelope as one JSON line, then the raw message
    active/QID.state    delivery state (per-recipient results, attempts), replaced atomically

The inline spool (spool.inline, SQLite only; issue 19 item 3): a small message
(up to spool.inline_max_bytes, as `pack` lays it out) is not written here at all. It
goes to the meter's commit, which keeps it in the same transaction as its usage
(one fsync for both), and delivery reads it from there (`InlineSpool`); only its
delivery state, once it has one, is a file in active/ (QID.state).

A message moves incoming -> active only after the meter has committed its usage
under the same queue id. At start, an incoming file whose queue id the meter
knows is activated; any other is deleted (its client never got a `250`).
All methods block on disk I/O. Callers run in a thread the ones that fsync or move a
large body (write_incoming, save_state, reading a large message); the metadata-only ones
(activate's rename, remove's unlinks, size) and reading a small message from the page
cache take microseconds, less than the hop to a thread and back, whose queueing alone
was 1.8 ms (p50) of the reply time after DATA under bench/run's load.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol


@dataclass
class Envelope:
    queue_id: str
    account: str | None  # None for a bounce the relay generated (not metered)
    mail_from: str
    recipients: list[str]
    received_at: float
    client: str = ""


@dataclass
class RecipientState:
    address: str
    status: str = "pending"  # pending | deferred | delivered | hard_bounced | soft_bounced | deleted (by the operator)
    reply: str = ""
    reported: bool = True  # has the latest result been recorded in the meter?


@dataclass
class QueueState:
    queue_id: str
    recipients: list[RecipientState]
    attempts: int = 0
    next_attempt_at: float = 0.0
    last_attempt_at: float = 0.0  # when the latest attempt ended; next_attempt_at - this = the backoff
    bounced: list[str] = field(default_factory=list)  # recipients a DSN was already queued for
    held: bool = False  # `queue hold`: not attempted until `queue release`

    def pending(self) -> list[RecipientState]:
        return [r for r in self.recipients if r.status in ("pending", "deferred")]

    def unreported(self) -> list[RecipientState]:
        return [r for r in self.recipients if not r.reported]

    @property
    def done(self) -> bool:
        return not self.pending() and not self.unreported()


def pack(envelope: Envelope, *message: bytes) -> bytes:
    """A spooled message as one string of octets: the envelope as one JSON line, then the
    message (what active/QID holds; what the inline spool keeps in the store)."""
    return b"".join((_header(envelope), *message))


def unpack(data: bytes) -> tuple[Envelope, bytes]:
    end = data.index(b"\n") + 1
    return Envelope(**json.loads(data[:end])), data[end:]


def _header(envelope: Envelope) -> bytes:
    return json.dumps(asdict(envelope), separators=(",", ":")).encode() + b"\n"


class InlineSpool(Protocol):
    """Where delivery finds the messages the meter committed with their usage (the inline
    spool; mailmeter's Meter on SQLite). Any method may raise: delivery tries again later."""

    async def spooled_ids(self) -> list[str]: ...
    async def read_spooled(self, queue_id: str) -> bytes | None: ...
    async def drop_spooled(self, queue_id: str) -> None: ...


def initial_state(envelope: Envelope) -> QueueState:
    """The delivery state of a message not yet tried: every recipient pending."""
    return QueueState(queue_id=envelope.queue_id, recipients=[RecipientState(address=r) for r in envelope.recipients])


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DirectorySync:
    """fsync of one directory, shared by the threads that need it at the same time.

    A new file's name is durable only once its directory is fsynced. Each caller
    needs an fsync that *started after* it called (one already running may have
    begun before its file was created); every caller that arrives while one runs
    is covered by the single next one. Under load, concurrent spool writes then
    share a directory fsync (a flush of the disk's cache, as costly as the file's
    own) instead of each paying one.
    """

    def __init__(self, path: Path, fsync: Callable[[Path], None] | None = None) -> None:
        self.path = path
        self._fsync = fsync or _fsync_dir
        self._changed = threading.Condition()
        self._started = 0  # fsyncs started so far (the generation of the latest)
        self._done = 0  # the latest generation that completed without error
        self._running = False

    def sync(self) -> None:
        """Return once an fsync of the directory that started after this call has succeeded."""
        with self._changed:
            needed = self._started + 1
            while self._done < needed:
                if self._running:
                    self._changed.wait()
                    continue
                self._running = True
                self._started += 1
                generation = self._started
                try:
                    self._changed.release()
                    try:
                        self._fsync(self.path)
                    finally:
                        self._changed.acquire()
                    self._done = generation
                finally:  # on an error this caller raises; the others try again themselves
                    self._running = False
                    self._changed.notify_all()


class SpoolBusy(Exception):
    """Another live process holds the spool's lock; `holder` is what it wrote there."""

    def __init__(self, lock: Path, holder: str) -> None:
        super().__init__(f"{lock} is locked by {holder or 'another process'}")
        self.lock = lock
        self.holder = holder


class Spool:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.incoming = root / "incoming"
        self.active = root / "active"
        self.lock_path = root / "lock"
        self._lock_fd: int | None = None
        self._incoming_sync = DirectorySync(self.incoming)
        # Per-message paths are built as strings: pathlib's joins cost more than the
        # syscalls they name, several times per message.
        self._incoming = f"{self.incoming}{os.sep}"
        self._active = f"{self.active}{os.sep}"

    def claim(self, owner: str) -> None:
        """Take the spool for this process: an exclusive lock on `ROOT/lock`, held until
        `unclaim` or the process ends (the kernel drops it then, however the process died).

        A second process on the same spool would settle incoming/ files whose commit is in
        flight and deliver the same messages twice, so it must stop here, before it touches
        anything. Raises SpoolBusy (naming the holder, as it wrote itself into the file)
        or OSError (the directory cannot be created or written).
        """
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 512).decode("utf-8", "replace").strip()
            os.close(fd)
            raise SpoolBusy(self.lock_path, holder) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{owner}\n".encode(), 0)
        self._lock_fd = fd

    def unclaim(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the lock

    def open(self) -> None:
        """Create the queue directories and check they are writable (raises OSError naming one)."""
        for path in (self.root, self.incoming, self.active):
            path.mkdir(parents=True, exist_ok=True)
            probe = path / f".probe-{os.getpid()}"
            probe.touch()  # os.access says yes to root even on a read-only mount: try it
            probe.unlink()

    # -- acceptance (SMTP side) ---------------------------------------------

    def write_incoming(self, envelope: Envelope, *message: bytes) -> None:
        """Write and fsync the message before the meter commit. Raises OSError.

        The message may come in parts written one after the other (SMTP in's Received
        header, then the message as received): joining them would copy a large message
        once more, on the event loop.
        """
        path = self._incoming + envelope.queue_id
        header = _header(envelope)
        try:
            with open(path, "wb") as handle:
                handle.write(header)
                for part in message:
                    handle.write(part)
                handle.flush()
                os.fsync(handle.fileno())
            self._incoming_sync.sync()
        except OSError:
            _unlink(path)
            raise

    def activate(self, queue_id: str) -> None:
        """Move an accepted message to active/. No fsync: the message is already durable in
        incoming/ and committed in the meter, and a start settles incoming/ against the
        meter, so a rename lost in a power failure is redone then."""
        os.rename(self._incoming + queue_id, self._active + queue_id)

    def discard_incoming(self, queue_id: str) -> None:
        _unlink(self._incoming + queue_id)

    def incoming_ids(self) -> list[str]:
        return sorted(p.name for p in self.incoming.iterdir() if not p.name.startswith("."))

    def enqueue_local(self, envelope: Envelope, message: bytes) -> None:
        """Queue a message the relay made itself (a bounce): straight to active."""
        self.write_incoming(envelope, message)
        self.activate(envelope.queue_id)

    # -- delivery side --------------------------------------------------------

    def active_ids(self) -> list[str]:
        return sorted(p.name for p in self.active.iterdir() if "." not in p.name)

    def size(self, queue_id: str) -> int:
        """Bytes of an active message file (raises FileNotFoundError once it is gone)."""
        return os.stat(self._active + queue_id).st_size

    def read(self, queue_id: str) -> tuple[Envelope, bytes]:
        with open(self._active + queue_id, "rb") as handle:
            header = handle.readline()
            body = handle.read()
        return Envelope(**json.loads(header)), body

    def read_envelope(self, queue_id: str) -> Envelope:
        with open(self._active + queue_id, "rb") as handle:
            return Envelope(**json.loads(handle.readline()))

    def read_head(self, queue_id: str) -> tuple[Envelope, int]:
        """The envelope and the message's size in octets (the file less its envelope line:
        what `unpack` leaves of the inline spool's copy). Raises FileNotFoundError once it is gone."""
        with open(self._active + queue_id, "rb") as handle:
            header = handle.readline()
            size = os.fstat(handle.fileno()).st_size - len(header)
        return Envelope(**json.loads(header)), size

    def load_state(self, envelope: Envelope) -> QueueState:
        try:
            with open(f"{self._active}{envelope.queue_id}.state", "rb") as handle:
                raw = json.loads(handle.read())
        except FileNotFoundError:
            return initial_state(envelope)
        raw["recipients"] = [RecipientState(**r) for r in raw["recipients"]]
        return QueueState(**raw)

    def save_state(self, state: QueueState) -> None:
        path = f"{self._active}{state.queue_id}.state"
        temporary = f"{self._active}.{state.queue_id}.state.tmp"
        with open(temporary, "w") as handle:
            json.dump(asdict(state), handle, separators=(",", ":"))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        _fsync_dir(self.active)

    def remove_state(self, queue_id: str) -> None:
        """Forget the delivery state of a message kept elsewhere (the inline spool)."""
        _unlink(f"{self._active}{queue_id}.state")

    def remove(self, queue_id: str) -> None:
        """Forget a finished message. No fsync: an unlink lost in a power failure can only
        make the message be delivered again (its results are counted once), never lost."""
        _unlink(f"{self._active}{queue_id}.state")
        _unlink(self._active + queue_id)

    def read_with_state(self, queue_id: str) -> tuple[Envelope, bytes, QueueState]:
        """The message and its delivery state in one call (one thread hop per attempt)."""
        envelope, body = self.read(queue_id)
        return envelope, body, self.load_state(envelope)
