"""The books after any session: a stateful property test that hunts for holes (issue 14).

Hypothesis drives whole SMTP sessions over real sockets against one real relay and a
real aiosmtpd upstream, on each store: SQLite, PostgreSQL, PostgreSQL with allowance
leasing. Three accounts on three plans:

- `pw`: AUTH, a roomy email quota, sends from example.com;
- `capped`: AUTH, a hard email quota set a few emails above its usage at the start of
  every example, sends from example.org;
- `office`: no password, bound to the client network 127.0.0.2/32, billed on delivery
  results with a prepaid balance a few emails deep, sends from example.net.

A session: AUTH at any point (its own account, another one, a wrong password), MAIL
(its own domain in any case, another account's, a stranger's, the null sender, with or
without SMTPUTF8), RCPT (repeated addresses and case variants, UTF-8 ones, addresses
the upstream refuses for good or for now), RSET, NOOP, EHLO, HELO and DATA in any
order, pipelined in groups; messages with a bare LF or over the size limit; it ends
with QUIT, a close or a reset at any point, also in the middle of a message and right
after its final dot without waiting for the answer. Payments fail and are fixed between
sessions and inside one; two sessions run at once; the relay stops and starts again
(as for SIGTERM) in the middle of a session, or right after one with its deliveries
and retries under way.

The client keeps a model from the replies it got and the rules of the spec. After
every session, once its holds are released and delivery has drained, it checks:

- the books balance: per account, accepted = delivered + soft-bounced + hard-bounced +
  awaiting a result (read in one snapshot, also before delivery drained), and nothing
  is awaiting or reserved once the sessions are closed and the spool is empty;
- the meter's accepted grew by exactly the distinct recipients of the messages answered
  250 (a repeated recipient counts once), each in the account its transaction began
  in; a message whose client vanished after its final dot counts whole or not at all
  (its campaign tag in the meter's breakdown says which);
- no account holds more than its allowance (the quota, the balance);
- the upstream got exactly the accepted recipients, each once, and results and bounces
  match them: delivered, hard and soft bounces as the upstream answered, one bounce
  report to each sender with failures, and none for a message from the null sender;
- the replies the spec fixes: AUTH inside a transaction is 503; a repeated recipient is
  250; MAIL FROM:<> from an account is taken like any other sender; MAIL after a
  failed payment is 451.

CI runs a bounded, derandomized set of examples (CI=true loads the profile in
tests/conftest.py); MAILMETER_BOOKS_EXAMPLES raises the count for a longer hunt.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import re
import string
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvloop
from aiosmtpd.smtp import SMTP, Envelope, Session
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule, run_state_machine_as_test

from mailmeter.metering.records import Account, Row
from mailmeter.policies.account import Usage
from tests.conftest import PASSWORD, RawSmtp, RelayHarness, Reply, Upstream, UpstreamHandler, free_port
from tests.pgserver import admin_connection, isolated_schema, schema_url

EXAMPLES = int(os.environ.get("MAILMETER_BOOKS_EXAMPLES", "30"))
STEPS = int(os.environ.get("MAILMETER_BOOKS_STEPS", "10"))
# Shrinking replays a failing example hundreds of times (a fresh relay each): minutes. CI
# reports what it found as it found it, with the blob to replay it (@reproduce_failure);
# a developer's run shrinks it.
PHASES = tuple(Phase) if os.environ.get("CI") != "true" else (Phase.explicit, Phase.reuse, Phase.generate)

OFFICE_NETWORK = "127.0.0.2/32"
SOURCES = {"localhost": "127.0.0.1", "office": "127.0.0.2", "stranger": "127.0.0.3"}
DOMAINS = {"pw": "example.com", "capped": "example.org", "office": "example.net"}
MESSAGE_SIZE = 4096
ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
DOLLAR = 1_000_000  # micros: the office plan prices every result at $1, so its balance counts emails

SENDERS = [f"app@{domain}" for domain in DOMAINS.values()] + [
    "App@EXAMPLE.COM",
    "app@Example.Org",
    "<>",
    "ceo@bank.test",
]
RECIPIENTS = [
    "a@dest.test",
    "a@dest.test",
    "A@dest.test",
    "a@DEST.TEST",
    "b@dest.test",
    "B@Dest.Test",
    "c@dest.test",
    "hard@dest.test",
    "Hard@dest.test",
    "soft@dest.test",
    "\u00fc@dest.test",
    "\u00dc@dest.test",
]


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# -- the upstream: refuses hard* for good and soft* for now, in any letter case; no SMTPUTF8 -------


@dataclass
class RefusingHandler(UpstreamHandler):
    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        local = address.partition("@")[0].lower()
        if local.startswith("hard"):
            return "550 5.1.1 No such user"
        if local.startswith("soft"):
            return "451 4.2.0 Mailbox busy, try later"
        envelope.rcpt_tos.append(address)
        return "250 OK"


def outcome_of(address: str) -> str:
    """What becomes of a recipient: a non-ASCII one hard-bounces (5.6.7: the upstream has no SMTPUTF8)."""
    local = address.partition("@")[0].lower()
    if local.startswith("hard") or not address.isascii():
        return "hard_bounced"
    return "soft_bounced" if local.startswith("soft") else "delivered"


# -- sessions as data: what hypothesis draws -------------------------------------------------

# ("AUTH", who) ("MAIL", sender[, "SMTPUTF8"]) ("RCPT", address) ("DATA", mode) ("PAY", account, ok) ("RESTART",) ...
Step = tuple[str, ...]


@dataclass(frozen=True)
class Script:
    source: str  # a key of SOURCES
    groups: tuple[tuple[Step, ...], ...]  # each group is written at once (pipelined), or is one PAY or RESTART
    ending: str  # quit | close | abort

    def __repr__(self) -> str:
        body = " | ".join(" ".join(" ".join(step) for step in group) for group in self.groups)
        return f"Script({self.source}: {body} | {self.ending})"


def auth_step(who: str) -> Step:
    return ("AUTH", who)


@st.composite
def transaction(draw: st.DrawFn, identity: str) -> list[Step]:
    """MAIL, a few RCPTs (repeats and case variants likely), DATA; sometimes an AUTH or RSET inside."""
    pick = draw(st.sampled_from([DOMAINS[identity]] * 6 + ["<>"] * 2 + ["other"]))
    sender = "<>" if pick == "<>" else f"app@{pick}" if pick != "other" else draw(st.sampled_from(SENDERS))
    steps: list[Step] = [("MAIL", sender, "SMTPUTF8") if draw(st.integers(0, 3)) == 0 else ("MAIL", sender)]
    steps += [("RCPT", address) for address in draw(st.lists(st.sampled_from(RECIPIENTS), min_size=1, max_size=6))]
    if draw(st.integers(0, 2)) == 0:  # AUTH inside the transaction (item 1 of issue 14)
        steps.insert(draw(st.integers(1, len(steps))), auth_step(draw(st.sampled_from(["pw", "capped", "wrong"]))))
    if draw(st.integers(0, 9)) == 0:
        steps.insert(draw(st.integers(1, len(steps))), ("RSET",))
    modes = ["send"] * 8 + ["abort_mid", "abort_after_dot", "bare_lf", "oversize"]
    steps.append(("DATA", draw(st.sampled_from(modes))))
    return steps


COMMANDS = st.one_of(
    st.sampled_from([("RSET",), ("NOOP",), ("EHLO",), ("HELO",), ("DATA", "send")]),
    st.sampled_from(["pw", "capped", "office", "wrong"]).map(auth_step),
    st.sampled_from(SENDERS).map(lambda sender: ("MAIL", sender)),
    st.sampled_from(RECIPIENTS).map(lambda address: ("RCPT", address)),
)


@st.composite
def sessions(draw: st.DrawFn, admin: bool = True) -> Script:
    identity = draw(st.sampled_from(["pw", "pw", "capped", "office", "office"]))
    source = "office" if identity == "office" else draw(st.sampled_from(["localhost"] * 5 + ["stranger"]))
    steps: list[Step] = []
    if draw(st.integers(0, 9)) > 0:
        steps.append(("EHLO",))
        if identity != "office" or draw(st.integers(0, 5)) == 0:
            steps.append(auth_step(identity if draw(st.integers(0, 5)) else "wrong"))
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["transaction"] * 5 + ["commands"] + (["pay"] if admin else [])))
        if kind == "transaction":
            steps += draw(transaction(identity))
            if admin and draw(st.integers(0, 9)) == 0:  # the relay restarts in the middle of it
                steps.insert(draw(st.integers(1, len(steps) - 1)), ("RESTART",))
        elif kind == "commands":
            steps += draw(st.lists(COMMANDS, min_size=1, max_size=4))
        else:
            steps.append(("PAY", draw(st.sampled_from(sorted(DOMAINS))), draw(st.sampled_from(["failed", "ok"]))))
    # Pipelining: cut the steps into groups written at once; a group ends at DATA, PAY and RESTART stand alone.
    groups: list[tuple[Step, ...]] = []
    current: list[Step] = []
    for step in steps:
        if step[0] in ("PAY", "RESTART"):
            if current:
                groups.append(tuple(current))
                current = []
            groups.append((step,))
            continue
        current.append(step)
        if step[0] == "DATA" or draw(st.integers(0, 2)) == 0:
            groups.append(tuple(current))
            current = []
    if current:
        groups.append(tuple(current))
    return Script(source, tuple(groups), draw(st.sampled_from(["quit", "quit", "close", "abort"])))


# -- the relay under test ----------------------------------------------------------------------------


@dataclass
class Message:
    """A message the client saw accepted (or left in doubt), as the model expects it."""

    tag: str  # its campaign tag: unique, names it in the meter's breakdown and upstream
    account: str
    sender: str  # "<>" for the null sender
    recipients: list[str]  # distinct recipients, as first spelled


@dataclass
class Rig:
    """What the examples share: the event loop, the upstream, and counters for the summary."""

    loop: asyncio.AbstractEventLoop
    upstream: Upstream
    directory: Path
    store: str  # sqlite | postgres | postgres-leases
    tags: Iterator[int] = field(default_factory=itertools.count)
    examples: Iterator[int] = field(default_factory=itertools.count)
    sessions: int = 0
    stats: Counter[str] = field(default_factory=Counter)

    def run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(coroutine)


@dataclass
class Node:
    """One example's relay: a fresh meter (SQLite file or PostgreSQL schema) and spool."""

    rig: Rig
    harness: RelayHarness
    schema: Any = None  # the isolated_schema context of a PostgreSQL meter

    @classmethod
    async def start(cls, rig: Rig) -> Node:
        directory = rig.directory / f"example-{next(rig.examples)}"
        database: dict[str, Any] = {"path": "meter.db"}
        schema = None
        if rig.store != "sqlite":
            schema = isolated_schema()
            name = await schema.__aenter__()
            database = {
                "url": schema_url(name),
                "pool_size": 4,
                "lease_emails": 50 if rig.store == "postgres-leases" else 0,
                "lease_seconds": 0.5,
            }
        directory.mkdir()
        node = cls(rig, RelayHarness(directory, rig.upstream.port, relay_overrides(database)), schema)
        try:
            await node.harness.start()
            meter = node.relay.meter
            await meter.add_account("pw", PASSWORD, "roomy", [DOMAINS["pw"]], [])
            await meter.add_account("capped", PASSWORD, "capped", [DOMAINS["capped"]], [])
            await meter.add_account("office", None, "results", [DOMAINS["office"]], [OFFICE_NETWORK])
        except BaseException:
            await node.stop()
            raise
        return node

    async def restart(self) -> None:
        """Stop (drain, as for SIGTERM) and start again on the same meter and spool."""
        await self.harness.stop()
        await self.harness.start()

    async def stop(self) -> None:
        try:
            await self.harness.stop()
        finally:
            if self.schema is not None:
                await self.schema.__aexit__(None, None, None)

    @property
    def relay(self) -> Any:
        assert self.harness.relay is not None
        return self.harness.relay

    @property
    def leasing(self) -> bool:
        return self.rig.store == "postgres-leases"


def relay_overrides(database: dict[str, Any]) -> dict[str, Any]:
    return {
        "limits": {"recipients_per_message": 5, "message_size": MESSAGE_SIZE},
        "abuse": {"max_connections_per_client": 1000, "auth_max_failures": 1_000_000, "auth_failure_delay": 0},
        # Deferred recipients expire into soft bounces within a third of a second.
        "delivery": {
            "workers": 2,
            "retry_first_delay": 0.05,
            "retry_factor": 2,
            "retry_max_delay": 0.1,
            "max_age": 0.3,
        },
        "database": database,
        "plans": {
            "roomy": {"email_quota": 1_000_000},
            "capped": {"email_quota": 0},  # raised to a few emails by every example
            "results": {
                "billable": "results",
                "result_prices": {"per": 1, "delivered": "1", "soft_bounced": "1", "invalid": "1"},
                "funding": {"kind": "postpaid", "net_days": 0, "overdraft_allowance": "0"},
            },
        },
    }


@pytest.fixture(params=["sqlite", "postgres", "postgres-leases"])
def rig(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Rig]:
    loop = uvloop.new_event_loop()
    upstream = Upstream(port=free_port(), handler=RefusingHandler())
    if request.param != "sqlite":  # skip (or, with CI=true, fail) at once without a server

        async def reachable() -> None:
            await (await admin_connection()).close()

        loop.run_until_complete(reachable())
    loop.run_until_complete(upstream.start())
    yield Rig(loop, upstream, tmp_path, request.param)
    loop.run_until_complete(upstream.stop())
    loop.close()


async def until(check: Callable[[], Any], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.01)


# -- one session, and the client's model of it ------------------------------------------------------


@dataclass
class Model:
    """What the client knows, from its replies and the rules of the spec."""

    payment_ok: dict[str, bool]
    accepted: list[Message] = field(default_factory=list)
    in_doubt: list[Message] = field(default_factory=list)
    refused_tags: set[str] = field(default_factory=set)  # messages never accepted: they must never go out
    violations: list[str] = field(default_factory=list)


@dataclass
class ClientSession:
    node: Node
    model: Model
    script: Script
    client: RawSmtp | None = None
    greeted: bool = False
    extended: bool = False  # greeted with EHLO: MAIL parameters allowed
    authenticated: str | None = None
    transaction: str | None = None  # the account the open transaction began in
    sender: str = ""
    recipients: dict[str, str] = field(default_factory=dict)  # recipient key -> first spelling
    over: bool = False

    @property
    def account(self) -> str | None:
        if self.authenticated is not None:
            return self.authenticated
        return "office" if self.script.source == "office" else None

    def violation(self, text: str) -> None:
        self.model.violations.append(f"{self.script!r}: {text}")

    async def run(self) -> None:
        self.client = await RawSmtp.open(self.node.harness.port, SOURCES[self.script.source])
        assert (await self.client.reply()).code == 220
        for group in self.script.groups:
            if self.over:
                break
            if group[0][0] == "PAY":
                await self.pay(group[0][1], group[0][2] == "ok")
            elif group[0][0] == "RESTART":
                await self.restart()
            else:
                await self.pipeline(group)
        await self.end()

    async def restart(self) -> None:
        """The relay stops (as for SIGTERM) and starts again while this session is open:
        it is told 421 and closed; its open transaction is not accepted (its hold goes)."""
        assert self.client is not None
        await self.node.restart()
        try:
            reply = await self.client.reply()
            if reply.code != 421:
                self.violation(f"a session open at a stop got {reply.code} {reply.text!r}, not 421")
        except (ConnectionError, EOFError, asyncio.IncompleteReadError):
            self.violation("a session open at a stop was closed without a 421")
        self.over = True
        self.transaction = None

    async def pay(self, account: str, ok: bool) -> None:
        await self.node.relay.meter.set_payment(account, ok, "" if ok else "card declined (test)")
        self.model.payment_ok[account] = ok

    async def pipeline(self, group: tuple[Step, ...]) -> None:
        assert self.client is not None
        lines = [self.line(step) for step in group]
        try:
            await self.client.send(b"".join(line.encode() + b"\r\n" for line in lines))
            for step in group:
                reply = await self.client.reply()
                if step[0] == "DATA":
                    await self.data(step[1], reply)
                else:
                    self.track(step, reply)
        except (ConnectionError, EOFError, asyncio.IncompleteReadError) as error:
            self.violation(f"the relay closed the connection unasked ({error!r})")
            self.over = True

    def line(self, step: Step) -> str:
        verb = step[0]
        if verb == "AUTH":
            who = step[1]
            login, password = ("pw", "wrong password") if who == "wrong" else (who, PASSWORD)
            return f"AUTH PLAIN {b64(chr(0) + login + chr(0) + password)}"
        if verb == "MAIL":
            return f"MAIL FROM:<{'' if step[1] == '<>' else step[1]}>" + "".join(f" {p}" for p in step[2:])
        if verb == "RCPT":
            return f"RCPT TO:<{step[1]}>"
        if verb in ("EHLO", "HELO"):
            return f"{verb} client.test"
        return verb  # RSET, NOOP, DATA

    def track(self, step: Step, reply: Reply) -> None:
        verb = step[0]
        if verb in ("EHLO", "HELO"):
            if reply.code == 250:
                self.greeted, self.extended = True, verb == "EHLO"
                self.transaction = None  # a greeting resets the transaction
        elif verb == "RSET":
            if reply.code == 250:
                self.transaction = None
        elif verb == "AUTH":
            if self.transaction is not None:
                self.node.rig.stats["AUTH in a transaction"] += 1
                if reply.code != 503:
                    self.violation(f"AUTH inside a transaction got {reply.code} {reply.text!r}, not 503")
            if reply.code == 235:
                self.authenticated = "pw" if step[1] == "wrong" else step[1]
        elif verb == "MAIL":
            self.expect_mail(step, reply)
            if reply.code == 250:
                assert self.account is not None
                self.transaction, self.sender, self.recipients = self.account, step[1], {}
        elif verb == "RCPT":
            key = step[1].translate(ASCII_LOWER)  # the duplicate rule: ASCII letter case ignored
            if self.transaction is not None and key in self.recipients:
                self.node.rig.stats["repeated RCPT"] += 1
                if reply.code != 250:
                    self.violation(f"a repeated recipient {step[1]} got {reply.code} {reply.text!r}, not 250")
            if reply.code == 250 and self.transaction is not None:
                self.recipients.setdefault(key, step[1])

    def expect_mail(self, step: Step, reply: Reply) -> None:
        """What RFC 5321 and the product fix for MAIL from an account, greeted, outside a transaction."""
        account, sender = self.account, step[1]
        if not self.greeted or account is None or self.transaction is not None:
            return
        if len(step) > 2 and not self.extended:
            return  # parameters after HELO: aiosmtpd's 501
        allowed = sender == "<>" or sender.rpartition("@")[2].lower() == DOMAINS[account]
        if not allowed:
            expected = {550}
        elif not self.model.payment_ok[account]:
            expected = {451}
        else:
            expected = {250, 451}  # 451: the allowance is used up
        if reply.code not in expected:
            self.violation(
                f"{self.line(step)} by {account} got {reply.code} {reply.text!r}, expected {sorted(expected)}"
            )

    async def data(self, mode: str, reply: Reply) -> None:
        assert self.client is not None
        if reply.code != 354:
            return
        tag = f"m{next(self.node.rig.tags)}"
        text = {"bare_lf": "hello\nworld", "oversize": "x" * 76 + ("\r\n" + "x" * 76) * (MESSAGE_SIZE // 78)}
        body = f"Subject: books\r\nX-Mailmeter-Campaign: {tag}\r\n\r\n{text.get(mode, 'hello')}\r\n.\r\n".encode()
        account, message = self.transaction, None
        if account is not None:
            message = Message(tag, account, self.sender, list(self.recipients.values()))
        self.transaction = None  # DATA ends the transaction, whatever its answer
        if mode == "abort_mid":
            await self.client.send(body[: len(body) // 2])
            self.client.writer.transport.abort()
            self.over = True
            self.model.refused_tags.add(tag)
            return
        await self.client.send(body)
        if mode == "abort_after_dot":  # gone before the answer: committed whole or not at all
            self.client.writer.transport.abort()
            self.over = True
            if message is not None:
                self.node.rig.stats["in doubt"] += 1
                self.model.in_doubt.append(message)
            return
        final = await self.client.reply()
        if final.code == 250 and message is not None:
            self.model.accepted.append(message)
        else:
            if final.code == 250:
                self.violation(f"DATA got 250 with no open transaction: {final.text!r}")
            self.model.refused_tags.add(tag)

    async def end(self) -> None:
        assert self.client is not None
        if not self.over:
            if self.script.ending == "quit":
                try:
                    reply = await self.client.command("QUIT")
                    if reply.code != 221:
                        self.violation(f"QUIT got {reply.code}")
                except (ConnectionError, EOFError, asyncio.IncompleteReadError):
                    self.violation("the relay closed the connection before QUIT's answer")
            elif self.script.ending == "abort":
                self.client.writer.transport.abort()
        self.client.close()


# -- the books, read from the meter -------------------------------------------------------------------


async def snapshot(node: Node, name: str) -> tuple[Account, Usage]:
    """The account and its counters in one read: the books must balance in any snapshot."""
    meter = node.relay.meter
    account = await meter.account(name)
    found = await meter.store.account_with_usage(name, meter.period_of(account).key)
    assert found is not None
    return found


async def campaign_counts(node: Node) -> dict[str, int]:
    """Accepted emails per campaign tag, over every account (the meter's breakdown)."""
    meter = node.relay.meter
    counts: dict[str, int] = {}
    for name in DOMAINS:
        account = await meter.account(name)
        rows: list[Row] = list(await meter.store.breakdown(account.id, meter.period_of(account).key))
        for row in rows:
            counts[row["campaign"]] = counts.get(row["campaign"], 0) + int(row["accepted"])
    return counts


_TAG = re.compile(rb"X-Mailmeter-Campaign: (m\d+)")


def test_the_books_balance_after_any_session(rig: Rig) -> None:
    class Books(RuleBasedStateMachine):
        """One example: a few sessions and payment changes, the books checked after each."""

        def __init__(self) -> None:
            super().__init__()
            self.model = Model(payment_ok={name: True for name in DOMAINS})
            self.node: Node | None = None
            self.allowance: dict[str, int] = {}
            self.upstream_seen = len(rig.upstream.handler.messages)

        @initialize(capped_room=st.integers(0, 4), office_room=st.integers(0, 4))
        def start(self, capped_room: int, office_room: int) -> None:
            """A fresh relay and meter; `capped` and `office` may send a few emails."""
            rig.run(self._start(capped_room, office_room))

        async def _start(self, capped_room: int, office_room: int) -> None:
            self.node = await Node.start(rig)
            meter = self.node.relay.meter
            if capped_room:
                await meter.set_email_limit("capped", "quota", capped_room)  # an increase: at once
            if office_room:
                await meter.add_balance("office", office_room * DOLLAR, "test")
            self.allowance = {"capped": capped_room, "office": office_room}

        def teardown(self) -> None:
            if self.node is not None:
                rig.run(self.node.stop())

        @rule(script=sessions())
        def one_session(self, script: Script) -> None:
            rig.run(self._sessions([script]))

        @rule(script=sessions())
        def session_then_restart(self, script: Script) -> None:
            """The relay stops (as for SIGTERM) and starts again on the same meter and spool
            right after the session, with its deliveries and retries still under way."""
            rig.run(self._sessions([script], restart=True))

        @rule(first=sessions(admin=False), second=sessions(admin=False))
        def two_sessions_at_once(self, first: Script, second: Script) -> None:
            rig.run(self._sessions([first, second]))

        @rule(account=st.sampled_from(sorted(DOMAINS)), ok=st.sampled_from([True, True, False]))
        def payment(self, account: str, ok: bool) -> None:
            assert self.node is not None
            rig.run(self.node.relay.meter.set_payment(account, ok, "" if ok else "card declined (test)"))
            self.model.payment_ok[account] = ok

        async def _sessions(self, scripts: list[Script], restart: bool = False) -> None:
            assert self.node is not None
            before = len(self.model.accepted)
            await asyncio.gather(*(ClientSession(self.node, self.model, script).run() for script in scripts))
            if restart:
                await self._balanced("before the restart")
                await self.node.restart()
                rig.stats["restarts"] += 1
            rig.sessions += len(scripts)
            rig.stats["restarts"] += sum(1 for s in scripts for g in s.groups if g[0][0] == "RESTART")
            await self._balanced("right after the session")
            await self._settled()
            await self._balanced("once the spool drained")
            self._check_upstream_and_replies()
            for message in self.model.accepted[before:]:
                rig.stats["messages"] += 1
                rig.stats["recipients"] += len(message.recipients)
                rig.stats["null sender"] += message.sender == "<>"
                rig.stats["bounced"] += any(outcome_of(r) != "delivered" for r in message.recipients)

        async def _balanced(self, when: str) -> None:
            """accepted = delivered + soft + hard + awaiting, in one snapshot; no allowance passed."""
            for name in DOMAINS:
                _, usage = await snapshot(self.node, name)
                results = usage.delivered + usage.soft_bounced + usage.hard_bounced
                assert usage.accepted == results + (usage.awaiting_results or 0), (
                    f"{when}: {name}'s books do not balance: {usage}"
                )
                if name in self.allowance:
                    assert usage.accepted <= self.allowance[name], (
                        f"{when}: {name} accepted {usage.accepted} over its allowance {self.allowance[name]}"
                    )

        async def _settled(self) -> None:
            """Sessions closed, holds released (idle leases given back), in-doubt messages settled, spool drained."""
            assert self.node is not None
            relay = self.node.relay
            await until(lambda: not relay.context.sessions and not relay.context.background, "sessions closed")

            async def reserved() -> dict[str, int]:
                if self.node.leasing:
                    await relay.meter.tend_leases(force=True)
                return {name: (await snapshot(self.node, name))[1].reserved for name in DOMAINS}

            async def nothing_reserved() -> bool:
                return set((await reserved()).values()) == {0}

            try:
                await until(nothing_reserved, "every hold released", timeout=5)
            except AssertionError:
                raise AssertionError(f"holds left once the sessions closed (reserved): {await reserved()}") from None
            counts = await campaign_counts(self.node)
            for message in self.model.in_doubt:
                counted = counts.get(message.tag, 0)
                assert counted in (0, len(message.recipients)), (
                    f"an in-doubt message counted {counted} of its {len(message.recipients)} recipients: {message}"
                )
                if counted and message.recipients:
                    self.model.accepted.append(message)
                else:
                    self.model.refused_tags.add(message.tag)
            self.model.in_doubt.clear()
            await until(lambda: relay.delivery.queue_depth == 0, "the spool drained")

            # Delivery reports every result to the meter before a message leaves the spool.
            for name in DOMAINS:
                _, usage = await snapshot(self.node, name)
                mine = [r for m in self.model.accepted if m.account == name for r in m.recipients]
                outcomes = Counter(outcome_of(r) for r in mine)
                expected = {
                    "accepted": len(mine),
                    "reserved": 0,
                    "awaiting": 0,
                    **{kind: outcomes[kind] for kind in ("delivered", "soft_bounced", "hard_bounced")},
                }
                got = {
                    "accepted": usage.accepted,
                    "reserved": usage.reserved,
                    "awaiting": usage.awaiting_results,
                    "delivered": usage.delivered,
                    "soft_bounced": usage.soft_bounced,
                    "hard_bounced": usage.hard_bounced,
                }
                assert got == expected, (
                    f"{name}: the meter has {got} once the spool drained; the client was answered 250 for "
                    f"{expected}: {[m for m in self.model.accepted if m.account == name]}"
                )

        def _check_upstream_and_replies(self) -> None:
            """The upstream got each accepted recipient once and nothing else; bounces as owed."""
            by_tag = {message.tag: message for message in self.model.accepted}
            received: dict[str, list[str]] = {}
            bounced: dict[str, list[str]] = {}
            for got in rig.upstream.handler.messages[self.upstream_seen :]:
                match = _TAG.search(got.content)
                assert match, f"the upstream got a message that is not the client's: {got.content[:300]!r}"
                tag = match.group(1).decode()
                if got.mail_from == "<>" and b"multipart/report" in got.content:  # (aiosmtpd's null sender)
                    bounced.setdefault(tag, []).extend(got.rcpt_tos)
                    continue
                assert tag not in self.model.refused_tags, f"message {tag} went out but was never accepted"
                assert tag in by_tag, f"the upstream got {tag}, which the client never saw accepted"
                sender = by_tag[tag].sender
                assert got.mail_from == sender, (tag, got.mail_from, sender)
                received.setdefault(tag, []).extend(got.rcpt_tos)
            for tag, message in by_tag.items():
                deliverable = [r for r in message.recipients if outcome_of(r) == "delivered"]
                assert sorted(received.get(tag, [])) == sorted(deliverable), (
                    f"{tag}: the upstream got {received.get(tag, [])}, expected each of {deliverable} once"
                )
                failed = [r for r in message.recipients if outcome_of(r) != "delivered"]
                if message.sender == "<>" or not failed:
                    assert tag not in bounced, f"{tag} from {message.sender} got a bounce report it must not get"
                else:
                    assert bounced.get(tag) and set(bounced[tag]) == {message.sender}, (
                        f"{tag}: failures {failed} owe {message.sender} a bounce report; got {bounced.get(tag)}"
                    )
            assert not set(bounced) - set(by_tag), f"bounce reports for messages never accepted: {bounced}"
            assert not self.model.violations, "\n".join(self.model.violations)

    started = time.monotonic()
    run_state_machine_as_test(
        Books,
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=STEPS,
            deadline=None,
            phases=PHASES,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
        ),
    )
    print(f"books: {rig.sessions} sessions, {dict(rig.stats)}, {time.monotonic() - started:.1f} s")
