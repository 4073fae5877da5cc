"""The `mailmeter` command: serve the relay; manage accounts, payments, plans and invoices.

Admin commands open the same database the relay uses (the SQLite file, whose WAL
mode lets both work at once, or the PostgreSQL database every node shares); a
change such as a payment block is seen by the relay at the next SMTP command,
with no restart and no signal.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from datetime import date, datetime, timezone
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

from mailmeter.audit import cli_actor, event_line
from mailmeter.config import Config, ConfigError, database_label, load_config
from mailmeter.logs import configure_logging
from mailmeter.metering.meter import UnknownAccount, UnknownPlan
from mailmeter.metering.records import StoreUnavailable
from mailmeter.service import AdminError, AdminService, Conflict, NotFound, Unavailable, text_problem

DEFAULT_CONFIG = os.environ.get("MAILMETER_CONFIG", "config.yaml")


class CliError(Exception):
    """A bad argument or input file: printed as one line, exit status 2."""


def _emit(data: Any, as_json: bool) -> None:
    if as_json or not isinstance(data, dict | list):
        print(json.dumps(data, indent=2, sort_keys=True))
        return
    items = data if isinstance(data, list) else [data]
    for item in items:
        if isinstance(item, dict):
            print("  ".join(f"{key}={value}" for key, value in item.items()))
        else:
            print(item)


def _run(config: Config, action: Callable[[AdminService], Awaitable[int]]) -> int:
    from mailmeter.control import QueueClient, spool_sockets
    from mailmeter.factory import build_billing, open_meter
    from mailmeter.node import upstream_health

    async def main() -> int:
        store, meter = open_meter(config)
        await store.open()
        try:
            queue = QueueClient(spool_sockets(config), health=partial(upstream_health, config))
            return await action(AdminService(meter, build_billing(config, meter), actor=cli_actor(), queue=queue))
        finally:
            await store.close()

    return asyncio.run(main())


def _read_password(path: str) -> str:
    try:
        source = sys.stdin if path == "-" else open(path)
        with source:
            password = source.readline().rstrip("\r\n")
    except OSError as error:
        raise CliError(f"cannot read the password file {path}: {error.strerror}") from None
    if not password:
        raise CliError(f"the password file {path} is empty: put the password on its first line")
    return password


def cmd_serve(config: Config, args: argparse.Namespace) -> int:
    import uvloop

    from mailmeter.serve import serve

    # uvloop, not asyncio's own loop: the relay is a loop of small socket reads and
    # writes; in bench/run its CPU per message fell from 3.5 to 2.7 ms on uvloop.
    return uvloop.run(serve(Path(args.config), config, worker=args.worker))


def cmd_account_add(config: Config, args: argparse.Namespace) -> int:
    password = _read_password(args.password_file) if args.password_file else None
    if password is None and not args.network:
        raise CliError("give --password-file (for SMTP AUTH) or --network (client IP binding), or both")
    if not args.sender_domain:
        raise CliError("give at least one --sender-domain the account may send from")

    async def action(service: AdminService) -> int:
        account = await service.add_account(
            args.name,
            password,
            args.plan,
            args.sender_domain,
            args.network,
            args.contact,
            args.subscribed_on,
            allow_wide_network=args.allow_wide_network,
            monthly_payment=args.monthly_payment,
        )
        print(f"account {account['name']} added on plan {account['plan']}")
        return 0

    return _run(config, action)


def _new_password(args: argparse.Namespace) -> str | None:
    """`account change`'s new password: --password-file FILE ('-': stdin), or --password, which
    asks for it twice on a terminal and reads the first line of stdin otherwise."""
    if args.password_file:
        return _read_password(args.password_file)
    if not args.password:
        return None
    if not sys.stdin.isatty():
        return _read_password("-")
    import getpass

    first = getpass.getpass("new SMTP password: ")
    if not first:
        raise CliError("the password is empty: type a password")
    if getpass.getpass("again: ") != first:
        raise CliError("the two passwords differ: nothing changed")
    return first


def cmd_account_change(config: Config, args: argparse.Namespace) -> int:
    password = _new_password(args)

    async def action(service: AdminService) -> int:
        account = await service.change_account(
            args.name,
            add_domains=args.add_domain,
            remove_domains=args.remove_domain,
            add_networks=args.add_network,
            remove_networks=args.remove_network,
            add_contacts=args.add_contact,
            remove_contacts=args.remove_contact,
            password=password,
            clear_password=args.no_password,
            allow_wide_network=args.allow_wide_network,
        )
        if args.json:
            _emit(account, True)
            return 0
        print(
            f"account {account['name']} changed: domains {', '.join(account['sender_domains'])};"
            f" networks {', '.join(account['networks']) or '-'}; contacts {', '.join(account['contacts']) or '-'};"
            f" password {'set' if account['has_password'] else 'none'}"
        )
        return 0

    return _run(config, action)


def cmd_account_suspend(config: Config, args: argparse.Namespace) -> int:
    async def action(service: AdminService) -> int:
        suspended = args.sub == "suspend"
        account = await service.suspend(args.name, suspended)
        if suspended:
            print(f"account {account['name']} suspended: open sessions get 452 4.7.1 at their next RCPT (451 at MAIL)")
        else:
            print(f"account {account['name']} resumed: sending resumes at the next SMTP command")
        return 0

    return _run(config, action)


def cmd_account_delete(config: Config, args: argparse.Namespace) -> int:
    async def action(service: AdminService) -> int:
        account = await service.delete_account(args.name, force=args.force)
        print(
            f"account {account['name']} deleted: it can no longer send; its invoices and audit trail are kept"
            " and its name is not reused"
        )
        return 0

    return _run(config, action)


def account_screen(view: dict[str, Any]) -> str:
    """`account show`: everything an operator needs about one account, on one screen."""
    usage = view["usage"]
    code = usage["currency"]
    awaiting = view["awaiting_results"]
    allowed = "no limit" if usage["total_allowed"] is None else f"{usage['total_allowed']:,}"
    remaining = "no limit" if usage["remaining"] is None else f"{usage['remaining']:,}"
    lines = [
        ("account", f"{view['name']} ({view['standing']})"),
        ("plan", f"{view['plan']} ({usage['plan_display_name']}), subscribed {view['subscribed_on']}"),
        ("period", f"{usage['period']} ({usage['period_start'][:10]} to {usage['period_end'][:10]})"),
        (
            "usage",
            f"{usage['accepted']:,} accepted: {usage['delivered']:,} delivered, {usage['soft_bounced']:,} soft"
            f" bounced, {usage['hard_bounced']:,} invalid; {awaiting:,} awaiting a result"
            f" ({usage['deferred']:,} deferred)",
        ),
        ("allowance", f"{allowed} emails this period, {remaining} remaining"),
        (
            "money",
            f"spent {usage['spent']} {code}, unbilled {usage['unbilled']} {code},"
            f" prepaid balance {view['prepaid_balance']} {code}, overdrawn {view['overdrawn']} {code}",
        ),
        ("payment", view["payment_state"] + (f" ({view['payment_detail']})" if view["payment_detail"] else "")),
        ("domains", ", ".join(view["sender_domains"]) or "-"),
        ("networks", ", ".join(view["networks"]) or "-"),
        ("contacts", ", ".join(view["contacts"]) or "-"),
        ("auth", "password set" if view["has_password"] else "no password (network binding only)"),
    ]
    if view["plan_change"]:
        change = view["plan_change"]
        lines.append(("plan change", f"to {change['plan']} from {change['effective']}"))
    if view["deleted_at"]:
        lines.append(("deleted", view["deleted_at"]))
    return "\n".join(f"{key:<11} {value}" for key, value in lines)


def _when(seconds: float | None, empty: str = "-") -> str:
    if not seconds:
        return empty
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def queue_lines(entry: dict[str, Any], recipients: bool = False) -> list[str]:
    """One message as `queue list` (and, with every recipient, `queue show`) prints it."""
    next_attempt = (
        "held"
        if entry["status"] == "held"
        else "now"
        if entry["status"] in ("ready", "active")
        else _when(entry["next_attempt_at"], "now")
    )
    lines = [
        f"{entry['queue_id']}  {entry['status']:<8}  account {entry['account'] or '(bounce)'}"
        f"  from <{entry['sender']}>  size {entry['size']}  received {_when(entry['received_at'])}",
        f"    attempts {entry['attempts']}, last {_when(entry['last_attempt_at'])}, next {next_attempt}",
    ]
    if recipients:
        lines.extend(
            f"    {r['status']:<12} {r['address']}" + (f"  ({r['reply']})" if r["reply"] else "")
            for r in entry["recipients"]
        )
    else:
        lines.append(f"    pending: {', '.join(entry['pending']) or '-'}")
        if entry["last_reply"]:
            lines.append(f"    last reply: {entry['last_reply']}")
    return lines


def upstream_lines(upstreams: list[dict[str, Any]]) -> list[str]:
    """The smarthosts' health, as `queue list` heads its listing and `queue upstreams` prints it."""
    lines = []
    for upstream in upstreams:
        state = "up" if upstream["up"] else f"down until {_when(upstream['down_until'])}"
        line = f"upstream {upstream['position']} {upstream['upstream']}  {state}  failures {upstream['failures']}"
        if upstream["last_error"]:
            line += f"  last error: {upstream['last_error']}"
        lines.append(line)
    return lines


def cmd_queue_list(config: Config, args: argparse.Namespace) -> int:
    async def action(service: AdminService) -> int:
        entries = await service.queue_list(args.account)
        if args.json:
            _emit(entries, True)
            return 0
        for line in upstream_lines(await service.upstreams()):
            print(line)
        for entry in entries:
            print("\n".join(queue_lines(entry)))
        pending = sum(len(entry["pending"]) for entry in entries)
        print(f"-- {len(entries)} message(s), {pending} recipient(s) pending")
        return 0

    return _run(config, action)


def cmd_queue_upstreams(config: Config, args: argparse.Namespace) -> int:
    async def action(service: AdminService) -> int:
        upstreams = await service.upstreams()
        if args.json:
            _emit(upstreams, True)
        else:
            print("\n".join(upstream_lines(upstreams)))
        return 0

    return _run(config, action)


def cmd_queue(config: Config, args: argparse.Namespace) -> int:
    """queue show / hold / release / delete QID."""

    async def action(service: AdminService) -> int:
        if args.sub == "show":
            entry = await service.queue_show(args.queue_id)
        elif args.sub == "delete":
            entry = await service.queue_delete(args.queue_id)
        else:
            entry = await service.queue_hold(args.queue_id, args.sub == "hold")
        if args.json:
            _emit(entry, True)
            return 0
        if args.sub == "delete":
            deleted = [r["address"] for r in entry["recipients"] if r["status"] == "deleted"]
            recorded = "recorded" if entry["reported"] else "to be recorded as soon as the meter answers"
            print(
                f"message {entry['queue_id']} deleted: {len(deleted)} recipient(s) got the final result"
                f" 'deleted by operator' (a soft bounce, {recorded})"
            )
            return 0
        if args.sub != "show":
            print(f"message {entry['queue_id']} {'held' if args.sub == 'hold' else 'released'}:")
        print("\n".join(queue_lines(entry, recipients=True)))
        return 0

    return _run(config, action)


def cmd_queue_flush(config: Config, args: argparse.Namespace) -> int:
    async def action(service: AdminService) -> int:
        result = await service.queue_flush(args.queue_id, args.account, args.all)
        if args.json:
            _emit(result, True)
            return 0
        print(f"{len(result['flushed'])} message(s) will be attempted now")
        for skipped in result["skipped"]:
            print(f"  {skipped['queue_id']} not flushed: {skipped['reason']}")
        return 0

    return _run(config, action)


def _simple(
    method: str,
    *fields: str,
    json_flag: bool = True,
    line: Callable[[dict[str, Any]], str] | None = None,
) -> Callable[[Config, argparse.Namespace], int]:
    """A command that calls one service method with the named arguments and prints the result:
    JSON with --json (or always, when the command has no --json flag), else `line` per item."""

    def command(config: Config, args: argparse.Namespace) -> int:
        async def action(service: AdminService) -> int:
            result = getattr(service, method)(*(getattr(args, f) for f in fields))
            if asyncio.iscoroutine(result):
                result = await result
            as_json = getattr(args, "json", False) or not json_flag
            if not as_json and line is not None:
                for item in result if isinstance(result, list) else [result]:
                    print(line(item))
            else:
                _emit(result, as_json)
            return 0

        return _run(config, action)

    return command


def cmd_webhook(config: Config, args: argparse.Namespace) -> int:
    if args.remove == (args.url is not None):
        raise CliError("give --url URL (set the webhook) or --remove (remove it), one of them")
    secret = _read_password(args.secret_file) if args.secret_file else None

    async def action(service: AdminService) -> int:
        if args.remove:
            await service.remove_webhook(args.name)
            print(f"account {args.name}: webhook removed")
            return 0
        kinds = args.events.split(",") if args.events else None
        result = await service.set_webhook(args.name, args.url, kinds, secret)
        if args.json:
            _emit(result, True)
            return 0
        print(f"account {args.name}: events {','.join(result['events'])} go to {result['url']}")
        if secret is None:
            print(f"signing secret (shown once; give it to the account holder): {result['secret']}")
        return 0

    return _run(config, action)


def cmd_account_token(config: Config, args: argparse.Namespace) -> int:
    async def action(service: AdminService) -> int:
        result = await service.account_token(args.name)
        if args.json:
            _emit(result, True)
        else:
            print(result["token"])
            print(
                f"(the API token of account {args.name}, shown once: its previous token no longer works)",
                file=sys.stderr,
            )
        return 0

    return _run(config, action)


def _event_line(event: dict[str, Any]) -> str:
    tries = event["attempts"]
    last = tries[-1] if tries else None
    outcome = f"last attempt {last['at']}: {last['status_code'] or '-'} {last['error']}".rstrip() if last else ""
    return f"{event['id']}\t{event['created']}\t{event['type']}\t{event['status']}\t{len(tries)} attempts\t{outcome}"


def cmd_payment(config: Config, args: argparse.Namespace) -> int:
    async def action(service: AdminService) -> int:
        account = await service.payment(args.name, args.state, args.reason or "")
        state = (
            "released: sending resumes at the next SMTP command"
            if args.state == "ok"
            else ("blocked: sessions get 451 4.7.1 at their next MAIL or RCPT")
        )
        print(f"account {account['name']} {state}")
        return 0

    return _run(config, action)


def cmd_charge(config: Config, args: argparse.Namespace) -> int:
    async def action(service: AdminService) -> int:
        charge = await service.settle_charge(args.key, args.sub, args.reason or "")
        blocked = "; the account's sending is blocked until `mailmeter payment ok`" if args.sub == "failed" else ""
        print(
            f"charge {charge['key']} ({charge['amount']} {charge['currency']}) marked {args.sub}:"
            f" {charge['status']}{blocked}"
        )
        return 0

    return _run(config, action)


def cmd_account_plan(config: Config, args: argparse.Namespace) -> int:
    async def action(service: AdminService) -> int:
        result = await service.set_plan(args.name, args.plan)
        if args.json:
            _emit(result, True)
            return 0
        if result["change"] in ("unchanged", "cancelled"):
            print(f"account {args.name}: {result['reason']}")
        elif result["at_once"]:
            print(
                f"account {args.name}: {result['change']} from plan {result['from']} to plan {result['to']},"
                f" in force now: {result['reason']}"
            )
        else:
            print(
                f"account {args.name}: {result['change']} from plan {result['from']} to plan {result['to']},"
                f" in force from {result['effective']}: {result['reason']}"
            )
        return 0

    return _run(config, action)


def cmd_account_rate(config: Config, args: argparse.Namespace) -> int:
    async def action(service: AdminService) -> int:
        if args.rate is None:
            result = await service.sending_rate(args.name)
        else:
            result = await service.set_sending_rate(args.name, args.rate)
        if args.json:
            _emit(result, True)
            return 0
        own = result["account_rate"] or f"none (the plan's: {result['plan_rate'] or 'no rate'})"
        print(f"account {args.name}: sending rate {result['rate'] or 'unlimited'} (own setting: {own})")
        return 0

    return _run(config, action)


def cmd_limit(config: Config, args: argparse.Namespace) -> int:
    async def action(service: AdminService) -> int:
        _emit(await service.set_limit(args.name, args.which, args.value), True)
        return 0

    return _run(config, action)


def cmd_db(config: Config, args: argparse.Namespace) -> int:
    """`db upgrade` applies pending schema migrations; `db backup FILE` copies the database online."""
    from mailmeter.factory import open_meter

    where = database_label(config)

    async def main() -> int:
        store, _ = open_meter(config)
        await store.open()  # opening applies the pending migrations (PostgreSQL: under an advisory lock)
        try:
            if args.sub == "upgrade":
                print(f"database {where} is at schema version {await store.schema_version()}")
            else:
                try:
                    await store.backup(Path(args.file))
                except FileExistsError as error:
                    raise CliError(str(error)) from None
                print(f"backed up {where} to {args.file}")
            return 0
        finally:
            await store.close()

    return asyncio.run(main())


def cmd_export(config: Config, args: argparse.Namespace) -> int:
    async def action(service: AdminService) -> int:
        text = await service.export_csv(args.period)
        if args.csv == "-":
            sys.stdout.write(text)
        else:
            Path(args.csv).write_text(text)
            print(f"wrote {text.count(chr(10)) - 1} line items of {args.period} to {args.csv}")
        return 0

    return _run(config, action)


def cmd_plan_preview(config: Config, args: argparse.Namespace) -> int:
    async def action(service: AdminService) -> int:
        result = service.preview(
            args.plan,
            args.emails,
            args.start,
            args.delivered,
            args.soft_bounced,
            args.invalid,
            args.balance,
            args.event,
        )
        if args.json:
            _emit(result, True)
            return 0
        print(
            f"plan {result['plan']}, period {result['period']}: {result['accepted']:,} accepted, "
            f"{result['refused']:,} refused"
        )
        code = result["currency"]
        for event in result["events"]:
            effect = f": {event['change']}, {event['reason']}" if "change" in event else ""
            print(f"  event after {event['at']:,} emails at {event['time']}: {event['type']}{effect}")
        for run in result["refusals"]:
            print(f"  refused emails {run['first']:,} to {run['last']:,} from {run['at']}: {run['reason']}")
        for charge in result["charges"]:
            print(f"  charge {charge['key']} at {charge['at']}: {charge['amount']} {code}")
        for line in result["invoice"]["lines"]:
            print(f"  invoice line: {line['description']}: {line['amount']} {code}")
        print(f"  invoice total {result['invoice']['total']} {code} on {result['invoice']['invoice_date']}")
        return 0

    return _run(config, action)


PREVIEW_EVENT = "AT:NAME=VALUE"
_EVENT_HELP = (
    "after AT emails attempted: included=N, quota=N, spending=AMOUNT|none, plan=PLAN, top-up=AMOUNT,"
    " payment=failed|ok (repeatable), e.g. 52000:included=60000"
)


def _event(text: str) -> dict[str, Any]:
    """`--event 52000:included=60000` as the service's event {"at", "type", ...}."""
    at_text, _, change = text.partition(":")
    name, equals, value = change.partition("=")
    if not equals or not at_text:
        raise argparse.ArgumentTypeError(f"{text!r}: write an event as {PREVIEW_EVENT}, like 52000:included=60000")
    at = _count(at_text)
    if name in ("included", "quota"):
        return {"at": at, "type": "limit", "which": name, "emails": _count(value)}
    if name == "spending":
        return {"at": at, "type": "limit", "which": "spending", "amount": None if value == "none" else value}
    if name == "plan":
        return {"at": at, "type": "plan", "plan": value}
    if name == "top-up":
        return {"at": at, "type": "top_up", "amount": value}
    if name == "payment":
        return {"at": at, "type": "payment", "state": value}
    raise argparse.ArgumentTypeError(
        f"{text!r}: {name!r} is not an event; use included, quota, spending, plan, top-up or payment"
    )


def _count(text: str) -> int:
    try:
        value = int(text.replace(",", "").replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def installed_version() -> str:
    """The installed package's version (pyproject.toml's), as `mailmeter --version` prints it."""
    try:
        return metadata.version("mailmeter")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed; pip install . to record it)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailmeter", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--version", action="version", version=f"mailmeter {installed_version()}")
    parser.add_argument(
        "--config", default=DEFAULT_CONFIG, help=f"config file (default: $MAILMETER_CONFIG or {DEFAULT_CONFIG})"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def sub(group: Any, name: str, help_text: str, func: Callable[[Config, argparse.Namespace], int]) -> Any:
        command = group.add_parser(name, help=help_text)
        command.add_argument("--config", default=argparse.SUPPRESS, help="config file")
        command.set_defaults(func=func)
        return command

    serve = sub(commands, "serve", "run the relay", cmd_serve)
    serve.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # set by the supervisor

    account = commands.add_parser("account", help="manage accounts").add_subparsers(dest="sub", required=True)
    add = sub(account, "add", "add an account", cmd_account_add)
    add.add_argument("name")
    add.add_argument("--password-file", help="file whose first line is the SMTP password ('-' for stdin)")
    add.add_argument("--plan", required=True, help="a plan defined in the config")
    add.add_argument("--sender-domain", action="append", default=[], help="a domain it may send from (repeatable)")
    add.add_argument("--network", action="append", default=[], help="client IP network bound to it (repeatable)")
    add.add_argument(
        "--allow-wide-network",
        action="store_true",
        help="accept a --network wider than a /16 (IPv4) or /48 (IPv6): every client in it sends"
        " unauthenticated, billed to this account",
    )
    add.add_argument(
        "--contact", action="append", default=[], help="address for usage and billing notices (repeatable)"
    )
    add.add_argument("--subscribed-on", type=date.fromisoformat, help="subscription day (default: today)")
    add.add_argument(
        "--monthly-payment",
        help="prepaid plans: the amount credited each period, like 150.00"
        " (default: the plan's funding.monthly_payment)",
    )
    listing = sub(
        account,
        "list",
        "list accounts",
        _simple(
            "accounts",
            "deleted",
            line=lambda a: (
                f"{a['name']}\t{a['plan']}\t{a['payment_state']}\t{','.join(a['sender_domains'])}"
                + ("\tdeleted" if a["deleted_at"] else "\tsuspended" if a["suspended"] else "")
            ),
        ),
    )
    listing.add_argument("--json", action="store_true")
    listing.add_argument("--deleted", action="store_true", help="list deleted accounts too")
    show = sub(
        account,
        "show",
        "one account on one screen: plan, standing, period usage, payment state, domains, networks",
        _simple("overview", "name", line=account_screen),
    )
    show.add_argument("name")
    show.add_argument("--json", action="store_true")
    change = sub(
        account,
        "change",
        "change sender domains, bound networks, contacts or the password (in force at once)",
        cmd_account_change,
    )
    change.add_argument("name")
    change.add_argument("--add-domain", action="append", default=[], help="a sender domain to add (repeatable)")
    change.add_argument("--remove-domain", action="append", default=[], help="a sender domain to remove")
    change.add_argument("--add-network", action="append", default=[], help="a client network to bind")
    change.add_argument("--remove-network", action="append", default=[], help="a client network to unbind")
    change.add_argument("--add-contact", action="append", default=[], help="a notice address to add")
    change.add_argument("--remove-contact", action="append", default=[], help="a notice address to remove")
    secret = change.add_mutually_exclusive_group()
    secret.add_argument(
        "--password", action="store_true", help="set a new SMTP password: asked on a terminal, else stdin's first line"
    )
    secret.add_argument("--password-file", help="set the SMTP password from FILE's first line ('-' for stdin)")
    secret.add_argument("--no-password", action="store_true", help="remove the password (needs a bound network)")
    change.add_argument(
        "--allow-wide-network", action="store_true", help="accept an --add-network wider than a /16 or /48"
    )
    change.add_argument("--json", action="store_true")
    for verb, what in (
        ("suspend", "stop the account's sending, live (an open session gets 452 4.7.1 at its next RCPT, 451 at MAIL)"),
        ("resume", "let a suspended account send again, live"),
    ):
        pause = sub(account, verb, what, cmd_account_suspend)
        pause.add_argument("name")
    delete = sub(
        account,
        "delete",
        "delete an account (kept with its invoices and audit trail; refused while it has mail in the"
        " queue or usage not invoiced, unless --force)",
        cmd_account_delete,
    )
    delete.add_argument("name")
    delete.add_argument("--force", action="store_true", help="delete even with mail in the queue or usage not invoiced")
    change_plan = sub(
        account,
        "plan",
        "move an account to another plan (an upgrade at once, any other change when the period ends)",
        cmd_account_plan,
    )
    change_plan.add_argument("name")
    change_plan.add_argument("plan", help="a plan defined in the config")
    change_plan.add_argument("--json", action="store_true")

    queue = commands.add_parser("queue", help="the running relay's queue").add_subparsers(dest="sub", required=True)
    queue_list = sub(queue, "list", "the messages in the queue, oldest first (like mailq)", cmd_queue_list)
    queue_list.add_argument("--account", help="only this account's messages")
    queue_list.add_argument("--json", action="store_true")
    upstreams = sub(
        queue,
        "upstreams",
        "each smarthost's health: up or down until when, failures, last error (as queue list heads it)",
        cmd_queue_upstreams,
    )
    upstreams.add_argument("--json", action="store_true")
    for verb, what in (
        ("show", "one message: every recipient with its state and last reply"),
        ("hold", "keep a message from being attempted until it is released"),
        ("release", "release a held message: it is attempted at once"),
        (
            "delete",
            "delete a message: its pending recipients get the final result 'deleted by operator'"
            " (a soft bounce), so the books still balance",
        ),
    ):
        one = sub(queue, verb, what, cmd_queue)
        one.add_argument("queue_id", metavar="QID")
        one.add_argument("--json", action="store_true")
    flush = sub(queue, "flush", "attempt now: one message, an account's, or all (like postqueue -f)", cmd_queue_flush)
    flush.add_argument("queue_id", metavar="QID", nargs="?")
    flush.add_argument("--account", help="every message of this account")
    flush.add_argument("--all", action="store_true", help="every message in the queue")
    flush.add_argument("--json", action="store_true")
    rate = sub(
        account,
        "rate",
        "set an account's sending rate (live at the next RCPT), or show it without RATE",
        cmd_account_rate,
    )
    rate.add_argument("name")
    rate.add_argument(
        "rate",
        nargs="?",
        help="like 100/minute (per second, minute, hour or day); none: the plan's rate; unlimited: no rate",
    )
    rate.add_argument("--json", action="store_true")
    webhook = sub(account, "webhook", "set or remove the account's webhook for its events", cmd_webhook)
    webhook.add_argument("name")
    webhook.add_argument("--url", help="where the events are POSTed (http:// or https://)")
    webhook.add_argument(
        "--events",
        help="comma-separated kinds: delivered,deferred,bounced,usage_alert,payment (default: all)",
    )
    webhook.add_argument(
        "--secret-file", help="file whose first line is the signing secret (default: a new random one, printed)"
    )
    webhook.add_argument("--remove", action="store_true", help="remove the webhook: no more events are recorded")
    webhook.add_argument("--json", action="store_true")
    token = sub(account, "token", "a new API token for the account itself (printed once)", cmd_account_token)
    token.add_argument("name")
    token.add_argument("--json", action="store_true")
    events = sub(
        account,
        "events",
        "the account's latest events and their webhook delivery log, newest first",
        _simple("events", "name", "limit", line=_event_line),
    )
    events.add_argument("name")
    events.add_argument("--limit", type=int, default=100, help="at most this many events (1-1000, default 100)")
    events.add_argument("--json", action="store_true")

    suppression = commands.add_parser(
        "suppression", help="recipients refused for an account because they hard-bounced"
    ).add_subparsers(dest="sub", required=True)
    suppressed = sub(
        suppression,
        "list",
        "the account's suppressed recipients",
        _simple(
            "suppressions",
            "name",
            line=lambda e: f"{e['address']}\t{e['suppressed_at']}\t{e['reason']}\t{e['detail']}",
        ),
    )
    suppressed.add_argument("name")
    suppressed.add_argument("--json", action="store_true")
    unsuppress = sub(
        suppression,
        "remove",
        "take a recipient off the account's list (its next RCPT is accepted)",
        _simple("remove_suppression", "name", "address", json_flag=False),
    )
    unsuppress.add_argument("name")
    unsuppress.add_argument("address")

    usage = sub(commands, "usage", "an account's usage in its current period", _simple("usage", "name"))
    usage.add_argument("name")
    usage.add_argument("--json", action="store_true")

    payment = sub(commands, "payment", "block (failed) or release (ok) an account's sending, live", cmd_payment)
    payment.add_argument("state", choices=["failed", "ok"])
    payment.add_argument("name")
    payment.add_argument("--reason", help="why, kept with the account")

    balance = commands.add_parser("balance", help="prepaid balances").add_subparsers(dest="sub", required=True)
    top_up = sub(balance, "add", "top up a prepaid balance", _simple("add_balance", "name", "amount", json_flag=False))
    top_up.add_argument("name")
    top_up.add_argument("amount", help="in the billing currency's minor units at most: 25.00 (USD), 2500 (JPY)")
    monthly = sub(
        balance,
        "monthly",
        "set the monthly payment credited to a prepaid balance, from the next period on",
        _simple("set_monthly_payment", "name", "amount", json_flag=False),
    )
    monthly.add_argument("name")
    monthly.add_argument("amount", help="in the billing currency, like 150.00")

    repay = sub(
        commands, "repay", "settle an account's whole overdrawn amount", _simple("repay", "name", json_flag=False)
    )
    repay.add_argument("name")

    limit = sub(
        commands, "limit", "change an account's limits (increase at once, email decrease at period end)", cmd_limit
    )
    limit.add_argument(
        "which",
        choices=["included", "quota", "spending"],
        help="included: monthly email limit past which overage is billed; quota: hard email cap;"
        " spending: spending limit (amount, or 'none')",
    )
    limit.add_argument("name")
    limit.add_argument("value")

    charge = commands.add_parser("charge", help="charges: in-period and invoice collections").add_subparsers(
        dest="sub", required=True
    )
    charge_list = sub(
        charge,
        "list",
        "an account's charges and their state",
        _simple(
            "charges",
            "name",
            "status",
            line=lambda c: f"{c['key']}\t{c['amount']} {c['currency']}\t{c['status']}\t{c['description']}",
        ),
    )
    charge_list.add_argument("name")
    charge_list.add_argument("--status", help="only charges in this state (e.g. recorded: waiting for collection)")
    charge_list.add_argument("--json", action="store_true")
    for state, what in (
        ("collected", "the external system collected the charge"),
        ("failed", "collecting the charge failed: blocks the account's sending, live"),
    ):
        settle = sub(charge, state, f"mark a charge {state} ({what})", cmd_charge)
        settle.add_argument("key", help="the charge's key (mailmeter charge list ACCOUNT)")
        settle.add_argument("--reason", help="what the collecting system said, kept with the charge")

    invoice = commands.add_parser("invoice", help="invoices").add_subparsers(dest="sub", required=True)
    invoice_list = sub(
        invoice,
        "list",
        "an account's invoices",
        _simple(
            "invoices",
            "name",
            line=lambda i: (
                f"{i['id']}\t{i['period']}\t{i['invoice_date']}\t{i['total']} {i['currency']}"
                f"\t{i['amount_due']} {i['currency']}\t{i['status']}"
            ),
        ),
    )
    invoice_list.add_argument("name")
    invoice_list.add_argument("--json", action="store_true")
    invoice_show = sub(invoice, "show", "one invoice", _simple("invoice", "id", json_flag=False))
    invoice_show.add_argument("id")
    invoice_show.add_argument("--json", action="store_true")

    billing = commands.add_parser("billing", help="the billing job").add_subparsers(dest="sub", required=True)
    sub(billing, "run", "close ended periods and collect pending charges now", _simple("run_billing", json_flag=False))

    database = commands.add_parser("db", help="the meter database").add_subparsers(dest="sub", required=True)
    sub(database, "upgrade", "apply pending schema migrations", cmd_db)
    backup = sub(database, "backup", "copy the database to FILE while the relay runs", cmd_db)
    backup.add_argument("file")

    export = sub(commands, "export", "every line item of a period, as CSV", cmd_export)
    export.add_argument("--period", required=True, help="YYYY-MM")
    export.add_argument("--csv", required=True, help="output file ('-' for stdout)")

    audit = sub(
        commands,
        "audit",
        "the admin changes, newest first (who, what, before and after)",
        _simple("audit", "account", "limit", line=event_line),
    )
    audit.add_argument("--account", help="only this account's changes")
    audit.add_argument("--limit", type=int, default=100, help="at most this many events (1-1000, default 100)")
    audit.add_argument("--json", action="store_true")

    plan = commands.add_parser("plan", help="plans").add_subparsers(dest="sub", required=True)
    plan_preview = sub(plan, "preview", "what a period of N emails costs on a plan", cmd_plan_preview)
    plan_preview.add_argument("plan")
    plan_preview.add_argument("--emails", type=_count, required=True)
    plan_preview.add_argument("--start", type=date.fromisoformat, help="first day (default: today)")
    plan_preview.add_argument("--delivered", type=_count)
    plan_preview.add_argument("--soft-bounced", type=_count, default=0)
    plan_preview.add_argument("--invalid", type=_count, default=0)
    plan_preview.add_argument("--balance", help="prepaid balance to start from, like 90.00")
    plan_preview.add_argument(
        "--event", type=_event, action="append", default=[], metavar=PREVIEW_EVENT, help=_EVENT_HELP
    )
    plan_preview.add_argument("--json", action="store_true")
    return parser


def bad_argument(args: argparse.Namespace) -> str | None:
    """The first argument that is not text the meter can store or look up (service.text_problem)."""
    for key, value in vars(args).items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str):
                problem = text_problem(item)
                if problem is not None:
                    return f"{key.replace('_', '-')}: {problem}"
    return None


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done; 1 it could not be done (no such account or queue id, a conflict, the
    database or the relay unavailable); 2 bad input: a bad argument or config, named in one line on stderr."""
    args = build_parser().parse_args(argv)
    problem = bad_argument(args)
    if problem is not None:
        print(f"mailmeter: {problem}", file=sys.stderr)
        return 2
    try:
        config = load_config(Path(args.config))
    except ConfigError as error:
        print(f"mailmeter: config {args.config}: {error}", file=sys.stderr)
        return 2
    configure_logging(config.log.level)
    try:
        return int(args.func(config, args))
    except (NotFound, Conflict, Unavailable, UnknownAccount, UnknownPlan) as error:
        print(f"mailmeter: {str(error).strip(chr(34))}", file=sys.stderr)
        return 1
    except (CliError, AdminError, ValueError) as error:
        print(f"mailmeter: {str(error).strip(chr(34))}", file=sys.stderr)
        return 2
    except StoreUnavailable as error:
        print(
            f"mailmeter: the database is unavailable ({error}); check database.path or database.url and retry",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
