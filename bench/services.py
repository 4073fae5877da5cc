"""The servers under test and the sink they relay into, as child processes on loopback.

Every process is started in its own session (process group) and its group id
is appended to `<workdir>/pids`, so `bench/run`'s EXIT trap can kill whatever a
crash or a Ctrl-C left behind even if this Python process is gone. Postfix's
master daemonizes itself; its instances are listed in `<workdir>/postfix-instances`
for the same reason. Haraka runs in the foreground: its cluster workers are in
its process group.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

LOOPBACK = "127.0.0.1"
SENDER_DOMAIN = "bench.test"
SENDER = f"sender@{SENDER_DOMAIN}"
RECIPIENT = "rcpt@sink.bench.test"


class ServiceError(RuntimeError):
    """A service did not start, or died, or did not stop."""


# -- ports ------------------------------------------------------------------


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for outgoing ports: listening there could collide with a client."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def port_is_free(port: int) -> bool:
    """True if nothing listens on 127.0.0.1:port or on the wildcard address."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((LOOPBACK, port))
        except OSError:
            return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.2)
        return probe.connect_ex((LOOPBACK, port)) != 0


@dataclass
class PortAllocator:
    """Hands out free loopback ports from `base` upward, outside the ephemeral range."""

    base: int
    given: set[int] = field(default_factory=set)

    def take(self) -> int:
        low, high = ephemeral_range()
        port = self.base
        while port < 65535:
            if low <= port <= high:
                port = high + 1
                continue
            if port not in self.given and port_is_free(port):
                self.given.add(port)
                return port
            port += 1
        raise ServiceError(f"no free loopback port from {self.base} up")


def wait_for_banner(port: int, timeout: float, process: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until an SMTP server on 127.0.0.1:port greets with 220 (then QUIT)."""
    deadline = time.monotonic() + timeout
    last_error = ""
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ServiceError(f"exited with status {process.returncode} before listening on port {port}")
        try:
            with socket.create_connection((LOOPBACK, port), timeout=2) as conn:
                banner = conn.makefile("rb").readline()
                conn.sendall(b"QUIT\r\n")
                if banner.startswith(b"220"):
                    return
                last_error = f"banner {banner!r}"
        except OSError as error:
            last_error = str(error)
        time.sleep(0.1)
    raise ServiceError(f"no SMTP banner on port {port} after {timeout:.0f} s ({last_error})")


# -- processes ---------------------------------------------------------------


@dataclass
class ProcessLedger:
    """Files the bash trap reads to clean up after us, whatever happens to this process."""

    workdir: Path

    def record_group(self, pgid: int) -> None:
        with open(self.workdir / "pids", "a") as ledger:
            ledger.write(f"{pgid}\n")

    def record_postfix(self, config_dir: Path) -> None:
        with open(self.workdir / "postfix-instances", "a") as ledger:
            ledger.write(f"{config_dir}\n")


def spawn(
    ledger: ProcessLedger,
    argv: list[str],
    log: Path,
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    pipe_stdout: bool = False,
) -> subprocess.Popen[bytes]:
    """Start a process in a new session (so Ctrl-C reaches only the harness) and record it."""
    with open(log, "ab") as log_file:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if pipe_stdout else log_file,
            stderr=log_file,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )
    ledger.record_group(process.pid)
    return process


def stop_group(process: subprocess.Popen[bytes], first: signal.Signals = signal.SIGTERM, grace: float = 15.0) -> None:
    """Signal the process group, wait `grace` s, then SIGKILL it."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, first)
        except ProcessLookupError:
            pass
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # stragglers of the group, if any
    except ProcessLookupError:
        pass
    process.wait()


def is_alive(pid: int) -> bool:
    """Alive and not a zombie (PID 1 here does not always reap daemonized orphans)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


# -- the sink ------------------------------------------------------------------

_MESSAGES = re.compile(rb"mesg=(\d+)")


class SmtpSink:
    """Postfix's smtp-sink: the upstream of every relay, and the delivery counter.

    With -c it prints "sess=N quit=N mesg=N" after every event; a reader thread
    keeps the latest message count and the moment it last changed, which is the
    moment the last expected message arrived once the count reaches the total.
    """

    def __init__(self, ledger: ProcessLedger, port: int, log: Path, options: tuple[str, ...] = ()) -> None:
        self.ledger = ledger
        self.port = port
        self.log = log
        self.options = options  # more smtp-sink options (-p: no PIPELINING)
        self.count = 0
        self.changed_at = time.monotonic()
        self._changed = threading.Condition()
        self._process: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        argv = ["smtp-sink", "-c", "-u", "nobody", *self.options, f"{LOOPBACK}:{self.port}", "1024"]
        self._process = spawn(self.ledger, argv, self.log, pipe_stdout=True)
        self._reader = threading.Thread(target=self._read, name="sink-counter", daemon=True)
        self._reader.start()
        wait_for_banner(self.port, 10, self._process)

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        fd = self._process.stdout.fileno()
        pending = b""
        while chunk := os.read(fd, 65536):
            pending += chunk
            *updates, pending = re.split(rb"[\r\n]", pending)
            counts = [int(m.group(1)) for u in updates if (m := _MESSAGES.search(u))]
            if counts and counts[-1] != self.count:
                with self._changed:
                    self.count, self.changed_at = counts[-1], time.monotonic()
                    self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, total: int, timeout: float) -> float | None:
        """Block until `total` messages arrived; the monotonic time they had, or None on timeout."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self.count < total:
                left = deadline - time.monotonic()
                if left <= 0 or (self._process is not None and self._process.poll() is not None):
                    return None
                self._changed.wait(min(left, 1.0))
            return self.changed_at

    def stop(self) -> None:
        if self._process is not None:
            stop_group(self._process, grace=5)
        if self._reader is not None:
            self._reader.join(5)


# -- mailmeter -------------------------------------------------------------------


@dataclass
class MailmeterServer:
    """mailmeter serve with a generated config: SQLite and spool in the workdir.

    The account is bound to 127.0.0.0/8 (no AUTH: smtp-source cannot AUTH), may
    send from bench.test, and is on a plan whose quota is never reached, so the
    full metering path (reserve per RCPT, commit at end of DATA) runs for every
    message without ever refusing one.
    """

    ledger: ProcessLedger
    root: Path
    python: str
    src: Path
    port: int
    workers: int = 4
    log_level: str = "info"
    name: str = "mailmeter"
    processes: int = 1  # listen.processes: relay processes sharing the port
    prefill_accounts: int = 0  # issue 6 item 3: other accounts in the store before the run
    prefill_events: int = 0  # ... and earlier messages with results, over past periods
    inline_spool: bool | None = None  # spool.inline (issue 19 item 3); None: the revision's default
    store_fixture: str = ""  # issue 19 item 5: "big" or ACCOUNTSxEVENTS, bench/big_store.py's cached store
    _process: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        """PYTHONPATH first, so the source under test wins over any installed copy."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.src), env.get("PYTHONPATH", "")]))
        return env

    def write_config(self, upstream_port: int) -> Path:
        """JSON is YAML: no YAML library needed here."""
        config = {
            "node": {"name": "bench", "region": "bench"},
            "hostname": "mailmeter.bench.test",
            "listen": {"address": LOOPBACK, "port": self.port, "processes": self.processes},
            "auth": {"allow_plaintext_on_loopback": True},
            "upstream": {"host": LOOPBACK, "port": upstream_port, "tls": "none", "timeout": 30},
            "delivery": {"workers": self.workers},
            "database": {"path": "meter.db"},
            "spool": {"path": "spool", **({} if self.inline_spool is None else {"inline": self.inline_spool})},
            "log": {"level": self.log_level},
            "plans": {"bench": {"email_quota": 1_000_000_000}},
        }
        path = self.root / "config.yaml"
        path.write_text(json.dumps(config, indent=2))
        return path

    def cli(self, config: Path) -> list[str]:
        return [self.python, "-m", "mailmeter.cli", "--config", str(config)]

    def start(self, upstream_port: int) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.write_config(upstream_port)
        if self.store_fixture:
            self.copy_fixture()
        add = self.cli(config) + [
            "account",
            "add",
            "bench",
            "--plan",
            "bench",
            "--sender-domain",
            SENDER_DOMAIN,
            "--network",
            "127.0.0.0/8",
        ]
        done = subprocess.run(
            add, check=False, cwd=self.root, env=self.env(), capture_output=True, text=True, timeout=60
        )
        if done.returncode != 0:
            raise ServiceError(f"mailmeter account add failed: {done.stderr.strip() or done.stdout.strip()}")
        if self.prefill_accounts or self.prefill_events:
            from meter_latency import prefill  # the same state the meter micro-benchmark is measured on

            prefill(self.root / "meter.db", max(self.prefill_accounts, 1), self.prefill_events)
        self._process = spawn(
            self.ledger, self.cli(config) + ["serve"], self.root / "serve.log", cwd=self.root, env=self.env()
        )
        wait_for_banner(self.port, 30, self._process)

    def copy_fixture(self) -> None:
        """The store starts as a private copy of bench/big_store.py's fixture, built (once per
        schema) by the code under test: its schema, its migrations."""
        argv = [self.python, str(Path(__file__).resolve().parent / "big_store.py")]
        if self.store_fixture != "big":
            accounts, _, events = self.store_fixture.partition("x")
            argv += ["--accounts", accounts, "--events", events]
        argv += ["--copy-to", str(self.root / "meter.db")]
        done = subprocess.run(argv, check=False, env=self.env(), capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise ServiceError(f"bench/big_store.py failed: {done.stderr.strip()[-1000:]}")

    def roots(self) -> list[int]:
        return [self._process.pid] if self._process is not None else []

    def check_alive(self) -> None:
        if self._process is not None and self._process.poll() is not None:
            raise ServiceError(f"mailmeter exited with status {self._process.returncode}")

    def stop(self) -> None:
        if self._process is not None:
            stop_group(self._process, signal.SIGTERM, grace=20)


# -- Postfix ------------------------------------------------------------------------

# Every service runs unchrooted (the private queue has no chroot jail set up);
# no local/virtual/pipe delivery agents: nothing is delivered locally.
_MASTER_SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


@dataclass
class PostfixInstance:
    """A private Postfix: its own config_directory, queue_directory and data_directory.

    Started with `postfix -c DIR start`, so the system's default instance
    (/etc/postfix) is never configured, started or listening on port 25. Stock
    defaults everywhere except what a relay-to-smarthost setup needs.
    """

    ledger: ProcessLedger
    root: Path
    port: int
    policy_socket: Path | None = None
    name: str = "postfix"
    extra_roots: list[int] = field(default_factory=list)

    @property
    def config_dir(self) -> Path:
        return self.root / "conf"

    def main_cf(self, relay_port: int) -> str:
        restrictions = "permit_mynetworks, reject"
        if self.policy_socket is not None:
            restrictions = f"check_policy_service unix:{self.policy_socket}, {restrictions}"
        return "\n".join(
            [
                "compatibility_level = 3.6",
                f"queue_directory = {self.root / 'queue'}",
                f"data_directory = {self.root / 'data'}",
                "mail_owner = postfix",
                "setgid_group = postdrop",
                "myhostname = postfix.bench.test",
                "mydomain = bench.test",
                "inet_interfaces = 127.0.0.1",
                "inet_protocols = ipv4",
                "mynetworks = 127.0.0.0/8",
                "mydestination =",
                "local_recipient_maps =",
                "local_transport = error:local delivery is disabled",
                "alias_maps =",
                "alias_database =",
                f"relayhost = [{LOOPBACK}]:{relay_port}",
                "smtpd_relay_restrictions = permit_mynetworks, reject",
                f"smtpd_recipient_restrictions = {restrictions}",
                f"maillog_file = {self.root / 'maillog'}",
                f"maillog_file_prefixes = {self.root}",
                "",
            ]
        )

    def write_config(self, relay_port: int) -> None:
        for sub in ("conf", "queue", "data"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        shutil.chown(self.root / "data", "postfix", "postfix")
        (self.config_dir / "main.cf").write_text(self.main_cf(relay_port))
        listener = f"{LOOPBACK}:{self.port} inet n - n - - smtpd\n"
        (self.config_dir / "master.cf").write_text(listener + _MASTER_SERVICES)

    def postfix(self, action: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["postfix", "-c", str(self.config_dir), action],
            check=False,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self, relay_port: int) -> None:
        self.write_config(relay_port)
        self.ledger.record_postfix(self.config_dir)
        done = self.postfix("start")
        if done.returncode != 0:
            raise ServiceError(
                f"postfix start failed ({done.stderr.strip()}); see {self.root / 'maillog'}:\n" + self.maillog_tail()
            )
        wait_for_banner(self.port, 30)

    def maillog_tail(self, lines: int = 10) -> str:
        try:
            return "\n".join((self.root / "maillog").read_text().splitlines()[-lines:])
        except OSError:
            return ""

    def master_pid(self) -> int | None:
        try:
            return int((self.root / "queue" / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def roots(self) -> list[int]:
        pid = self.master_pid()
        return ([pid] if pid else []) + self.extra_roots

    def check_alive(self) -> None:
        pid = self.master_pid()
        if pid is None or not is_alive(pid):
            raise ServiceError("the Postfix master is gone")

    def stop(self) -> None:
        pid = self.master_pid()
        if pid is None or not is_alive(pid):
            return
        self.postfix("stop")
        deadline = time.monotonic() + 20
        while is_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if is_alive(pid):
            self.postfix("abort")
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# -- policyd-rate-limit ---------------------------------------------------------------


@dataclass
class PolicydRateLimit:
    """Debian's policyd-rate-limit: a Postfix policy server counting mails in SQLite.

    Private config file, SQLite database in the workdir. With no SASL it counts
    by client IP (limit_by_ip over 127.0.0.0/8); the limits have the shape of
    the package's example (per minute and per day) but are never reached, so it
    always answers "dunno" after recording the mail, as in normal operation.
    debug is off: with it on, every request is echoed to stderr.
    """

    ledger: ProcessLedger
    root: Path
    _process: subprocess.Popen[bytes] | None = None

    @property
    def socket_path(self) -> Path:
        return self.root / "sock" / "policy"

    def write_config(self) -> Path:
        # policyd creates and chowns these (to its own user) itself, one level deep,
        # only when missing or empty: give each its own directory.
        config = {
            "debug": False,
            "user": "policyd-rate-limit",
            "group": "policyd-rate-limit",
            "pidfile": str(self.root / "run" / "policyd.pid"),
            "sqlite_config": {"database": str(self.root / "db" / "policyd.sqlite3")},
            "backend": 0,
            "SOCKET": str(self.socket_path),
            "socket_permission": 0o666,
            "limits": [[100_000_000, 60], [1_000_000_000, 86400]],
            "limits_by_id": {},
            "limit_by_sasl": True,
            "limit_by_sender": False,
            "limit_by_ip": True,
            "limited_networks": ["127.0.0.0/8"],
            "success_action": "dunno",
            "fail_action": "defer_if_permit Rate limit reach, retry later",
            "db_error_action": "dunno",
            "report": False,
            "delay_to_close": 300,
        }
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / "policyd-rate-limit.yaml"
        path.write_text(json.dumps(config, indent=2))
        return path

    def start(self) -> None:
        config = self.write_config()
        self._process = spawn(self.ledger, ["policyd-rate-limit", "--file", str(config)], self.root / "policyd.log")
        deadline = time.monotonic() + 15
        while not self.socket_path.exists():
            if self._process.poll() is not None or time.monotonic() > deadline:
                log = (self.root / "policyd.log").read_text(errors="replace")[-2000:]
                raise ServiceError(f"policyd-rate-limit did not create {self.socket_path}: {log}")
            time.sleep(0.05)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def rows(self) -> int:
        """Mails it recorded: proof that Postfix really asked it, once per RCPT."""
        import sqlite3

        try:
            with sqlite3.connect(self.root / "db" / "policyd.sqlite3") as db:
                return int(db.execute("SELECT COUNT(*) FROM mail_count").fetchone()[0])
        except sqlite3.Error:
            return -1

    def stop(self) -> None:
        if self._process is not None:
            stop_group(self._process, signal.SIGINT, grace=10)  # its unit's KillSignal


# -- Haraka ---------------------------------------------------------------------------

# The bench's local Haraka plugin, listed last. Two jobs:
# - Haraka asks DNS for the client's name on every connection (core, before the
#   `connect` hook) unless a lookup_rdns plugin answers. Postfix's smtpd gets
#   127.0.0.1's name from /etc/hosts; this gives Haraka the same answer without a
#   query, so no DNS traffic leaves the machine under load.
# - A worker listens before its plugins' init_child hooks have run, and
#   haraka-plugin-limit skips counting until its Redis connection is up (it does
#   not wait for it). init_child hooks run in plugin order, each after the one
#   before has finished, so this line, logged from the last one, says the worker
#   counts; the harness waits for one per worker before sending any load.
_HARAKA_READY = "bench: worker ready"
_HARAKA_BENCH_PLUGIN = f"""\
// bench: no DNS query for the client's name (Postfix's smtpd reads it from /etc/hosts)
exports.hook_lookup_rdns = (next) => next(OK, 'localhost')

// bench: every plugin before this one (limit and its Redis connection) is initialised
exports.hook_init_child = function (next) {{
    this.lognotice('{_HARAKA_READY}')
    next()
}}
"""


def redis_command(host: str, port: int, db: int, *args: str, timeout: float = 5.0) -> object:
    """One Redis command on database `db` (RESP over a socket: no client library needed).

    Returns the reply: str for simple and bulk strings, int, None, or a list.
    Raises ServiceError if Redis does not answer or answers with an error.
    """

    def encode(*words: str) -> bytes:
        parts = [f"*{len(words)}\r\n".encode()]
        for word in words:
            data = word.encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        return b"".join(parts)

    def read(reader: BinaryIO) -> object:
        line = reader.readline()
        if not line:
            raise ServiceError(f"Redis at {host}:{port} closed the connection")
        kind, rest = line[:1], line[1:-2].decode()
        if kind == b"+":
            return rest
        if kind == b"-":
            raise ServiceError(f"Redis at {host}:{port}: {rest}")
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            return None if size < 0 else reader.read(size + 2)[:-2].decode()
        if kind == b"*":
            count = int(rest)
            return None if count < 0 else [read(reader) for _ in range(count)]
        raise ServiceError(f"Redis at {host}:{port}: unexpected reply {line!r}")

    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            conn.sendall(encode("SELECT", str(db)) + encode(*args))
            reader = conn.makefile("rb")
            read(reader)
            return read(reader)
    except OSError as error:
        raise ServiceError(
            f"Redis at {host}:{port} does not answer ({error}); "
            "haraka-plugin-limit keeps its counters there: start it, or point BENCH_REDIS at one"
        ) from None


@dataclass
class HarakaInstance:
    """A private Haraka (`haraka -i ROOT`, then `haraka -c ROOT`): its config, plugins and queue in ROOT.

    Plugins, in order: `relay` (ACL: relaying for 127.0.0.0/8 only, everyone else
    gets 550 for every recipient), `limit` (haraka-plugin-limit: rate_rcpt_sender
    counts every recipient per sender in Redis, limit never reached),
    `queue/smtp_forward`, and the bench's own `bench` (no DNS query for the
    client's name; a log line once a worker is initialised). Two ways to hand on mail:

    - queue=False (target "haraka"): smtp_forward forwards each message to the
      sink during the client's DATA and answers the client's "." with the sink's
      reply (enable_outbound=true: relayed mail goes through smtp_forward).
      Nothing is written to Haraka's disk: the 250 means the next hop has it.
    - queue=True (target "haraka+queue"): enable_outbound=false, so relayed mail
      goes to Haraka's own outbound queue (the file fsynced, then renamed into
      ROOT/queue, before the 250); outbound delivers it afterwards to the sink,
      which smtp_forward's get_mx route for the recipient's domain names.

    `nodes` worker processes (Node's cluster module) share the port, as
    Postfix's smtpd processes and mailmeter's listen.processes do.
    """

    ledger: ProcessLedger
    root: Path
    home: Path  # the npm install: home/node_modules/Haraka, home/node_modules/haraka-plugin-*
    port: int
    node: str = "node"
    nodes: int = 1
    queue: bool = False
    log_level: str = "notice"
    redis_host: str = LOOPBACK
    redis_port: int = 6379
    redis_db: int = 4
    name: str = "haraka"
    _process: subprocess.Popen[bytes] | None = None

    @property
    def counter_key(self) -> str:
        """The key haraka-plugin-limit increments once per recipient from our sender."""
        return f"rate_rcpt_sender:{SENDER}"

    def haraka(self, *args: str) -> list[str]:
        return [self.node, str(self.home / "node_modules" / "Haraka" / "bin" / "haraka"), *args]

    def config_files(self, sink_port: int) -> dict[str, str]:
        """Every file written over the stock `haraka -i` config, by name."""
        forward = [
            "[main]",
            f"host={LOOPBACK}",
            f"port={sink_port}",
            f"enable_outbound={'false' if self.queue else 'true'}",
        ]
        if self.queue:
            # outbound's next hop for the bench's recipients: smtp_forward's get_mx hook
            # routes a domain that has a section here, so no MX lookup is made.
            forward += ["", f"[{RECIPIENT.partition('@')[2]}]", f"host={LOOPBACK}", f"port={sink_port}"]
        return {
            "me": "haraka.bench.test\n",
            "smtp.ini": "\n".join(
                [
                    "[main]",
                    f"listen={LOOPBACK}:{self.port}",
                    f"nodes={self.nodes}",
                    "force_shutdown_timeout=10",
                    "",
                ]
            ),
            "log.ini": f"[main]\nlevel={self.log_level}\ntimestamps=true\n",
            "plugins": "relay\nlimit\nqueue/smtp_forward\nbench\n",
            "relay.ini": "[relay]\nacl=true\n",
            "relay_acl_allow": "127.0.0.0/8\n",
            "limit.ini": "\n".join(
                [
                    "[redis]",
                    f"host={self.redis_host}",
                    f"port={self.redis_port}",
                    f"db={self.redis_db}",
                    "",
                    "[rate_rcpt_sender]",
                    "enabled=true",
                    "; a billion recipients a day per sender: counted, never reached",
                    "default=1000000000/1d",
                    "",
                ]
            ),
            "smtp_forward.ini": "\n".join(forward) + "\n",
        }

    def start(self, sink_port: int) -> None:
        installed = self.home / "node_modules" / "Haraka" / "bin" / "haraka"
        if not installed.exists():
            raise ServiceError(f"Haraka is not installed in {self.home} (bench/run installs it)")
        self.clear_counter()  # counting starts from zero
        self.root.parent.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            self.haraka("-i", str(self.root)), check=False, capture_output=True, text=True, timeout=60
        )
        if done.returncode != 0:
            raise ServiceError(f"haraka -i {self.root} failed: {(done.stderr or done.stdout).strip()[-500:]}")
        for name, text in self.config_files(sink_port).items():
            (self.root / "config" / name).write_text(text)
        (self.root / "plugins").mkdir(exist_ok=True)
        (self.root / "plugins" / "bench.js").write_text(_HARAKA_BENCH_PLUGIN)
        (self.root / "queue").mkdir(exist_ok=True)
        self._process = spawn(self.ledger, self.haraka("-c", str(self.root)), self.root / "haraka.log", cwd=self.root)
        try:
            wait_for_banner(self.port, 30, self._process)
            self.wait_for_workers(30)
        except ServiceError as error:
            raise ServiceError(f"{self.name}: {error}; see {self.root / 'haraka.log'}:\n{self.log_tail()}") from None

    def wait_for_workers(self, timeout: float) -> None:
        """Until every worker logged that its plugins (and limit's Redis connection) are initialised."""
        deadline = time.monotonic() + timeout
        ready = 0
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                ready = (self.root / "haraka.log").read_text(errors="replace").count(_HARAKA_READY)
            except OSError:
                ready = 0
            if ready >= self.nodes:
                return
            time.sleep(0.1)
        raise ServiceError(f"{ready} of {self.nodes} Haraka workers initialised their plugins after {timeout:.0f} s")

    def log_tail(self, lines: int = 10) -> str:
        try:
            return "\n".join((self.root / "haraka.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def counted(self) -> int | None:
        """Recipients haraka-plugin-limit counted for our sender in Redis; None if the key is missing."""
        value = redis_command(self.redis_host, self.redis_port, self.redis_db, "GET", self.counter_key)
        return int(str(value)) if value is not None else None

    def clear_counter(self) -> None:
        """Leave nothing behind in the machine's Redis."""
        redis_command(self.redis_host, self.redis_port, self.redis_db, "DEL", self.counter_key)

    def queued_files(self) -> int:
        """Messages still in Haraka's outbound queue directory."""
        try:
            return sum(1 for entry in (self.root / "queue").iterdir() if entry.is_file())
        except OSError:
            return 0

    def roots(self) -> list[int]:
        return [self._process.pid] if self._process is not None else []

    def check_alive(self) -> None:
        if self._process is not None and self._process.poll() is not None:
            raise ServiceError(f"{self.name} exited with status {self._process.returncode}:\n{self.log_tail()}")

    def stop(self) -> None:
        if self._process is not None:
            stop_group(self._process, signal.SIGTERM, grace=15)
