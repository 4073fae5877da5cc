"""A day of operation, run for real: the script behind docs/operating.md#a-day-of-operation.

It starts `mailmeter serve` in a temporary directory with config.example.yaml, changed
where a demonstration needs it (free ports; two smarthosts: the first refuses connections,
the second is an aiosmtpd sink answering `451 4.2.1` for the mailboxes of busy.example;
a submission listener with a test certificate; the admin API for /metrics; a sending
rate on the plan `starter`), runs an operator's commands against it and prints the
section, every output as the command printed it. It needs the test extra (aiosmtpd,
trustme): `pip install -e '.[test]'`.

    .venv/bin/python docs/day_of_operation.py            # print the section (markdown)
    .venv/bin/python docs/day_of_operation.py --write    # and replace it in docs/operating.md, and
                                                         # README.md's excerpt (between its markers)

Queue ids, times and ports differ from run to run; tests/test_docs.py runs it end to end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trustme
import yaml
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "operating.md"
HEADING = "## A day of operation"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class BusySink:
    """The second smarthost: takes every message, but mailboxes of busy.example get 451."""

    busy = True

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str, options: Any) -> str:
        if self.busy and address.endswith("@busy.example"):
            return "451 4.2.1 Mailbox busy, try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "250 OK"


class Day:
    """The relay of the day, and the section being written."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.parts: list[str] = []
        self.transcript: list[tuple[str, str]] = []  # (command, output) of each command shown
        self.block: list[str] = []
        self.sink = BusySink()
        self.controller = Controller(self.sink, hostname="127.0.0.1", port=free_port())
        self.down_port = free_port()  # nothing listens there: connection refused
        self.smtp_port = free_port()
        self.submission_port = free_port()
        self.api_port = free_port()
        self.token = secrets.token_hex(16)
        self.password = "first secret"
        self.relay: subprocess.Popen[bytes] | None = None
        self.sink_running = False
        self.log = root / "mailmeter.log"
        self.env = {**os.environ, "MAILMETER_CONFIG": str(root / "config.yaml"), "COLUMNS": "100"}
        executable = Path(sys.executable).parent / "mailmeter"
        self.mailmeter = [str(executable)] if executable.exists() else [sys.executable, "-m", "mailmeter.cli"]

    # -- the relay

    def config(self) -> dict[str, Any]:
        config: dict[str, Any] = yaml.safe_load((REPO / "config.example.yaml").read_text())
        smtp = {**config["listen"], "port": self.smtp_port}
        config["listen"] = [smtp, {"address": "127.0.0.1", "port": self.submission_port, "mode": "submission"}]
        config["listen"][1]["auth"] = "required"
        config["tls"].update(certificate="relay.pem", key="relay.key")
        smarthost = {"host": "127.0.0.1", "tls": "none", "timeout": 5}
        config["upstream"] = [{**smarthost, "port": self.down_port}, {**smarthost, "port": self.controller.port}]
        config["delivery"]["upstream_down_seconds"] = 600
        config["api"].update(enabled=True, port=self.api_port, tokens_file="api-tokens")
        config["plans"]["starter"]["sending_rate"] = "100/minute"
        return config

    def start(self) -> None:
        self.controller.start()
        certificate = trustme.CA().issue_cert("mailmeter.localhost")  # the submission listener's STARTTLS
        certificate.cert_chain_pems[0].write_to_path(str(self.root / "relay.pem"))
        certificate.private_key_pem.write_to_path(str(self.root / "relay.key"))
        (self.root / "api-tokens").write_text(f"ops:{self.token}\n")
        os.chmod(self.root / "api-tokens", 0o600)
        (self.root / "config.yaml").write_text(yaml.safe_dump(self.config(), sort_keys=False))
        self.sink_running = True
        with self.log.open("ab") as log:
            self.relay = subprocess.Popen(
                [*self.mailmeter, "serve"], cwd=self.root, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        self.wait(lambda: started(self.log), "the relay to start")

    def stop(self) -> None:
        if self.relay is not None and self.relay.poll() is None:
            self.relay.send_signal(signal.SIGTERM)
            self.relay.wait(30)
        if self.sink_running:
            self.controller.stop()
            self.sink_running = False

    def wait(self, check: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.relay is not None and self.relay.poll() is not None:
                raise SystemExit(f"the relay stopped; its log:\n{self.log.read_text()}")
            value = check()
            if value:
                return value
            time.sleep(0.1)
        raise SystemExit(f"timed out waiting for {what}; the relay's log:\n{self.log.read_text()}")

    # -- the section

    def say(self, text: str) -> None:
        self.flush()
        self.parts.append(text.strip())

    def flush(self) -> None:
        if self.block:
            self.parts.append("```console\n" + "\n".join(self.block).rstrip() + "\n```")
            self.block = []

    def shown(self, command: str, output: str, status: int = 0) -> None:
        if self.block:
            self.block.append("")
        self.block.append(f"$ {command}")
        self.block.extend(output.rstrip("\n").splitlines())
        if status:
            self.block.append(f"(exit {status})")
        self.transcript.append((command, output.rstrip("\n") + (f"\n(exit {status})" if status else "")))

    def run(self, command: str, stdin: str | None = None, keep: Callable[[str], str] | None = None) -> str:
        """`mailmeter ...` (or another shell command) in the day's directory, shown with its output."""
        argv = command.split()
        if argv[0] == "mailmeter":
            argv = [*self.mailmeter, *argv[1:]]
        shell = not command.startswith("mailmeter ")
        done = subprocess.run(
            command if shell else argv, shell=shell, cwd=self.root, env=self.env, input=stdin, capture_output=True,
            text=True, timeout=60,
        )  # fmt: skip
        logged = [line for line in done.stderr.splitlines(keepends=True) if line.startswith('{"')]
        output = done.stdout + "".join(line for line in done.stderr.splitlines(keepends=True) if line not in logged)
        output = output.replace(str(self.root), "/tmp/day")
        shown = f"printf '{stdin.strip()}\\n' | {command}" if stdin is not None else command
        self.shown(shown, keep(output) if keep else output, done.returncode)
        return output

    def send(self, recipients: list[str], sender: str = "news@shop.example") -> None:
        """One message through the relay with smtplib, shown as a line of the client's."""
        with smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=30) as client:
            client.login("shop", self.password)
            refused = client.sendmail(sender, recipients, b"Subject: news\r\n\r\nhello\r\n")
        self.block.append(f"# smtplib: {sender} to {', '.join(recipients)}: accepted")
        for address, (code, reply) in refused.items():
            self.block.append(f"#   except {address}: {code} {reply.decode()}")

    def login(self, password: str) -> None:
        """An AUTH of the account, shown as a line of the client's."""
        with smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=30) as client:
            try:
                code, reply = client.login("shop", password)
            except smtplib.SMTPAuthenticationError as error:
                code, reply = error.smtp_code, error.smtp_error
        self.block.append(f"# smtplib: AUTH as shop with '{password}' -> {code} {reply.decode()}")

    def live_session(self) -> None:
        """An open SMTP session of the account while the operator suspends and resumes it."""
        client = smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=30)
        client.login("shop", self.password)

        def command(line: str) -> None:
            code, reply = client.docmd(line)
            self.block.append(f"C: {line}")
            self.block.append(f"S: {code} {reply.decode()}")

        self.block.append("# an open session of shop, and the operator beside it")
        command("MAIL FROM:<news@shop.example>")
        command("RCPT TO:<f@dest.example>")
        self.run("mailmeter account suspend shop")
        command("RCPT TO:<g@dest.example>")
        self.run("mailmeter account resume shop")
        command("RCPT TO:<g@dest.example>")
        client.rset()
        client.quit()

    def markdown(self) -> str:
        self.flush()
        return HEADING + "\n\n" + "\n\n".join(self.parts) + "\n"


def api(day: Day, path: str) -> str:
    """GET `path` of the admin API: the day's waits ask it (faster than a command)."""
    with socket.create_connection(("127.0.0.1", day.api_port)) as sock:
        sock.sendall(f"GET {path} HTTP/1.0\r\nAuthorization: Bearer {day.token}\r\n\r\n".encode())
        return b"".join(iter(lambda: sock.recv(65536), b"")).decode().partition("\r\n\r\n")[2]


def queue(day: Day) -> dict[str, str]:
    """The queue: each queue id with its status."""
    return {entry["queue_id"]: entry["status"] for entry in json.loads(api(day, "/v1/queue"))}


def queue_ids(day: Day) -> list[str]:
    return list(queue(day))


def metrics(day: Day) -> str:
    return api(day, "/metrics")


def the_day(day: Day) -> None:
    day.say("""
A day with the commands of this page, run against a real relay by
[day_of_operation.py](day_of_operation.py) (`.venv/bin/python docs/day_of_operation.py
--write` regenerates this section): `mailmeter serve` with `config.example.yaml` in a temporary
directory, changed where the day needs it: a submission listener beside the plain one
(with a test certificate); two smarthosts, the first refusing connections and the second
answering `451 4.2.1` for the mailboxes of busy.example; the admin API on; `sending_rate:
100/minute` on the plan `starter`; and `MAILMETER_CONFIG=config.yaml`, so that no
command needs `--config`. Every output below is what the command printed (`(exit
N)` marks a non-zero exit status; `...` a trimmed one; the temporary directory is shown
as `/tmp/day`; the JSON log line each change also writes, `admin.change`, is left out).
The account commands work on the database the relay uses, and the relay sees each
change at the next SMTP command; the `queue` commands ask the running relay (see
[Commands](#commands)).

The relay started with its two listeners (the second, submission on what is port 587 in
production, requires STARTTLS and AUTH); which version it is; and a new customer, with a
lower sending rate than its plan's:
""")
    day.shown("grep relay.started mailmeter.log", started(day.log))
    day.run("mailmeter --version")
    day.run(
        "mailmeter account add shop --password-file - --plan starter --sender-domain shop.example"
        " --contact ops@shop.example",
        stdin=day.password,
    )
    day.run("mailmeter account rate shop")
    day.run("mailmeter account rate shop 4/minute")

    day.say("""
The customer's application sends two messages (one recipient of the first, and the only
one of the second, are on the busy mailboxes), then a third with two recipients: the
fifth recipient of the minute is past the account's rate and gets `451 4.7.1`, saying
when to retry (the client sends to the others and retries that one later):
""")
    day.send(["a@dest.example", "b@busy.example"])
    day.send(["c@busy.example"])
    day.wait(lambda: list(queue(day).values()) == ["deferred", "deferred"], "two deferred messages")
    day.send(["d@dest.example", "e@dest.example"])
    day.wait(lambda: list(queue(day).values()) == ["deferred", "deferred"], "the third message's delivery")

    day.say("""
The queue, like `mailq`, headed by each smarthost's health: the first is down (it
refused the connection) and skipped until its backoff ends, so every attempt went to
the second at once. Then each message with its account, sender, attempts, next attempt
(the 300 s backoff), the recipients still pending and the last reply:
""")
    first, second = queue_ids(day)
    day.run("mailmeter queue list")
    day.run(f"mailmeter queue show {first}")

    day.say("""
Everything about the account on one screen: standing, plan, this period's usage (what
awaits a result is the mail still in the queue), allowance, money, payment, domains,
networks and contacts:
""")
    day.run("mailmeter account show shop")

    day.say("""
The customer asks for a second sender domain, with a typo in the one to drop: the
change is refused, naming what the account has. Then its password leaks: the new one
works at the next AUTH and the old one no longer does.
""")
    day.run("mailmeter account change shop --remove-domain shop.exmaple")
    day.run("mailmeter account change shop --add-domain news.shop.example")
    day.run("mailmeter account change shop --password-file -", stdin="second secret")
    day.login("first secret")
    day.login("second secret")
    day.password = "second secret"

    day.say("""
The second message should not go out before the customer says so: hold it. The busy
mailboxes are fine again: flush the queue instead of waiting five minutes (a held
message is not flushed). Released, the held message is attempted at once:
""")
    day.run(f"mailmeter queue hold {second}")
    day.sink.busy = False
    day.run("mailmeter queue flush --all")
    day.wait(lambda: queue_ids(day) == [second], "the flushed message to be delivered")
    day.run("mailmeter queue list")
    day.sink.busy = True
    day.run(f"mailmeter queue release {second}")
    day.wait(lambda: queue(day) == {second: "deferred"}, "the released message's attempt")

    day.flush()
    place = len(day.parts)  # the text comes first, with the figures the commands print
    day.run(f"mailmeter queue delete {second}")
    day.run(f"mailmeter queue show {second}")
    keys = ("accepted", "delivered", "soft_bounced", "hard_bounced", "deferred", "reserved", "remaining")
    usage = json.loads(day.run("mailmeter usage shop --json", keep=lambda out: excerpt(json.loads(out), keys)))
    day.flush()
    day.parts.insert(
        place,
        f"""The customer cancels that message: delete it. Its recipient gets the final result
`deleted by operator` (a Soft Bounce, sub-type `deleted_by_operator`), so the books
balance: {usage["accepted"]} accepted = {usage["delivered"]} delivered + {usage["soft_bounced"]} soft bounced +
{usage["hard_bounced"]} hard bounced + {usage["deferred"]} awaiting a result.""",
    )

    day.say("""
An abuse report: suspend the account while it is looked into, then resume it. An open
session of the account (`C:` the client's commands, `S:` the relay's replies) is refused
at its next RCPT and goes on at the one after the resume. (The customer's rate did its
job for the day: back to its plan's first.)
""")
    day.run("mailmeter account rate shop none")
    day.live_session()

    day.say("""
A reload (`systemctl reload mailmeter`, a SIGHUP) after editing the config: the log line
says what changed and what needs a restart ([Reload](#reload)). Then the metrics the
monitoring scrapes: the smarthosts' health and the refusals of the day:
""")
    config = yaml.safe_load((day.root / "config.yaml").read_text())
    config["limits"]["recipients_per_message"] = 50
    config["delivery"]["workers"] = 8
    (day.root / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    day.block.append("# config.yaml: limits.recipients_per_message 100 -> 50, delivery.workers 4 -> 8")
    assert day.relay is not None
    day.shown(f"kill -HUP {day.relay.pid}", "")
    day.relay.send_signal(signal.SIGHUP)
    line = day.wait(lambda: reloaded(day.log), "config.reloaded")
    day.shown("grep config.reloaded mailmeter.log", line)
    text = day.wait(lambda: metrics(day), "/metrics")
    wanted = "^mailmeter_(upstream_up|upstream_failures_total|smtp_refused_total|account_refused_total)"
    day.shown(
        f"curl -sH \"Authorization: Bearer $TOKEN\" localhost:{day.api_port}/metrics | grep -E '{wanted}'",
        "\n".join(line for line in text.splitlines() if re.search(wanted, line)),
    )

    day.say("""
The nightly backup, readable by its owner only (it holds password hashes), and the
audit trail of the day, newest first, each change with its before and after:
""")
    day.run("mailmeter db backup backup.db")
    day.run("ls -l backup.db")
    day.run("mailmeter audit --account shop --limit 4", keep=lambda out: trim(out, 160))

    day.say("""
Deleting the account is refused while its usage is not invoiced; an account that never
sent is deleted at once:
""")
    day.run("mailmeter account delete shop")
    day.run("mailmeter account add trial --password-file - --plan starter --sender-domain trial.example", stdin="x")
    day.run("mailmeter account delete trial")

    day.say("With the relay stopped, the queue commands say so in one line:")
    day.stop()
    day.run("mailmeter queue list", keep=lambda out: out.replace(str(day.root), "/tmp/day"))


def excerpt(data: dict[str, Any], keys: tuple[str, ...]) -> str:
    lines = json.dumps({key: data[key] for key in keys}, indent=2).splitlines()
    return "\n".join([*lines[:-1], "  ...", lines[-1]])


def trim(text: str, width: int) -> str:
    return "\n".join(line if len(line) <= width else line[: width - 4] + " ..." for line in text.splitlines())


def started(log: Path) -> str:
    """The relay's relay.started log line."""
    return next((line for line in log.read_text().splitlines() if "relay.started" in line), "")


def reloaded(log: Path) -> str:
    """The relay's config.reloaded log line (its stderr goes to mailmeter.log)."""
    return next((line for line in log.read_text().splitlines() if "config.reloaded" in line), "")


# README.md's walk-through: these commands of the day (their first words), each output cut to so many lines.
README_COMMANDS = {
    "printf 'first secret\\n' | mailmeter account add": 1,
    "mailmeter account change shop --add-domain": 1,
    "mailmeter queue list": 4,
    "mailmeter queue delete": 1,
    "mailmeter account suspend": 1,
    "grep config.reloaded": 1,
    "mailmeter db backup": 1,
    "ls -l": 1,
}
README_START, README_END = "<!-- day of operation: start -->", "<!-- day of operation: end -->"


def readme_block(transcript: list[tuple[str, str]]) -> str:
    """The README's excerpt of the day: the first run of each of README_COMMANDS, trimmed."""
    lines = []
    for prefix, keep in README_COMMANDS.items():
        command, output = next((c, o) for c, o in transcript if c.startswith(prefix))
        kept = output.splitlines()
        lines += ["" if lines else None, f"$ {command}", *kept[:keep], *(["..."] if len(kept) > keep else [])]
    return "```console\n" + "\n".join(line for line in lines if line is not None) + "\n```"


def write_readme(block: str, readme: Path = REPO / "README.md") -> None:
    text = readme.read_text()
    start = text.index(README_START) + len(README_START)
    readme.write_text(text[:start] + "\n" + block + "\n" + text[text.index(README_END) :])


def write_section(markdown: str, doc: Path = DOC) -> None:
    """Replace the section (from its heading to the next `## `) in docs/operating.md."""
    text = doc.read_text()
    start = text.index(HEADING + "\n")
    end = text.index("\n## ", start + len(HEADING))
    doc.write_text(text[:start] + markdown + text[end:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"replace the section in {DOC.relative_to(REPO)}")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mailmeter-day-") as directory:
        day = Day(Path(directory))
        try:
            day.start()
            the_day(day)
        finally:
            day.stop()
        markdown = day.markdown()
    print(markdown)
    if args.write:
        write_section(markdown)
        write_readme(readme_block(day.transcript))
    return 0


if __name__ == "__main__":
    sys.exit(main())
