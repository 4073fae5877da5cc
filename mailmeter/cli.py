"""The `mailmeter` command: serve the relay, manage accounts, read usage.

Admin commands open the same SQLite database the relay uses (WAL mode lets both
work at once); a change such as a payment block is seen by the relay at the
next SMTP command, with no restart and no signal.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from mailmeter.config import Config, ConfigError, load_config
from mailmeter.logs import configure_logging
from metering.meter import Meter, UnknownAccount, UnknownPlan
from metering.sqlite_store import StoreUnavailable

DEFAULT_CONFIG = os.environ.get("MAILMETER_CONFIG", "config.yaml")


class CliError(Exception):
    """An error for the operator: printed as one line, exit status 1."""


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


async def _with_meter(config: Config, action: Callable[[Meter], Awaitable[int]]) -> int:
    from mailmeter.app import open_meter

    store, meter = open_meter(config)
    await store.open()
    try:
        return await action(meter)
    finally:
        await store.close()


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
    from mailmeter.app import serve

    asyncio.run(serve(config))
    return 0


def cmd_account_add(config: Config, args: argparse.Namespace) -> int:
    password = _read_password(args.password_file) if args.password_file else None
    if password is None and not args.network:
        raise CliError("give --password-file (for SMTP AUTH) or --network (client IP binding), or both")
    if not args.sender_domain:
        raise CliError("give at least one --sender-domain the account may send from")

    async def action(meter: Meter) -> int:
        account = await meter.add_account(
            args.name, password, args.plan, args.sender_domain, args.network or []
        )
        print(f"account {account.name} added on plan {account.plan}")
        return 0

    return asyncio.run(_with_meter(config, action))


def cmd_account_list(config: Config, args: argparse.Namespace) -> int:
    async def action(meter: Meter) -> int:
        accounts = await meter.store.list_accounts()
        if args.json:
            _print_json([a.public() for a in accounts])
            return 0
        for account in accounts:
            state = "ok" if account.payment_ok else "payment-failed"
            print(f"{account.name}\t{account.plan}\t{state}\t{','.join(account.domains)}")
        return 0

    return asyncio.run(_with_meter(config, action))


def cmd_account_show(config: Config, args: argparse.Namespace) -> int:
    async def action(meter: Meter) -> int:
        account = await meter.account(args.name)
        data = account.public()
        if args.json:
            _print_json(data)
        else:
            for key, value in data.items():
                print(f"{key}: {value}")
        return 0

    return asyncio.run(_with_meter(config, action))


def cmd_usage(config: Config, args: argparse.Namespace) -> int:
    async def action(meter: Meter) -> int:
        report = (await meter.usage(args.name)).as_json()
        if args.json:
            _print_json(report)
        else:
            for key, value in report.items():
                print(f"{key}: {value}")
        return 0

    return asyncio.run(_with_meter(config, action))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailmeter", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", default=DEFAULT_CONFIG, help=f"config file (default: $MAILMETER_CONFIG or {DEFAULT_CONFIG})"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the relay")
    serve.add_argument("--config", default=argparse.SUPPRESS, help="config file")
    serve.set_defaults(func=cmd_serve)

    account = commands.add_parser("account", help="manage accounts").add_subparsers(dest="account_command", required=True)
    add = account.add_parser("add", help="add an account")
    add.add_argument("name")
    add.add_argument("--password-file", help="file whose first line is the SMTP password ('-' for stdin)")
    add.add_argument("--plan", required=True, help="a plan defined in the config")
    add.add_argument("--sender-domain", action="append", default=[], help="a domain it may send from (repeatable)")
    add.add_argument("--network", action="append", default=[], help="client IP network bound to it (repeatable)")
    add.set_defaults(func=cmd_account_add)
    listing = account.add_parser("list", help="list accounts")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_account_list)
    show = account.add_parser("show", help="show one account")
    show.add_argument("name")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_account_show)

    usage = commands.add_parser("usage", help="an account's usage in its current period")
    usage.add_argument("name")
    usage.add_argument("--json", action="store_true")
    usage.set_defaults(func=cmd_usage)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(Path(args.config))
    except ConfigError as error:
        print(f"mailmeter: config {args.config}: {error}", file=sys.stderr)
        return 2
    configure_logging(config.log.level)
    try:
        return int(args.func(config, args))
    except (CliError, UnknownAccount, UnknownPlan, ValueError) as error:
        print(f"mailmeter: {error}", file=sys.stderr)
        return 1
    except StoreUnavailable as error:
        print(f"mailmeter: the database is unavailable ({error}); check database.path and retry", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
